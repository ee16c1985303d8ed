"""Local client training: one sequential reference path and one vectorized path.

Both paths see exactly the same mini-batches (the order comes from a seed per
(run, round, client)), use plain SGD as in McMahan et al., and optionally FedProx's
proximal term, so they agree to float rounding. The vectorized path trains a group of
clients at once with `torch.func.vmap` over stacked parameters: one wide step instead
of K small ones, with no per-client model or DataLoader.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from mlsyskit.fl.params import ParamSpec, get_flat, set_flat


@dataclass(frozen=True)
class LocalTraining:
    """How each client trains: E epochs of SGD with batch size B (None = full batch)."""

    epochs: int
    batch_size: int | None
    lr: float
    mu: float = 0.0  # FedProx proximal weight


def batch_plan(num_samples: int, batch_size: int | None, epochs: int, seed: list[int]) -> list[np.ndarray]:
    """The client's mini-batches (positions into its own samples), reshuffled every epoch."""
    rng = np.random.default_rng(seed)
    b = num_samples if batch_size is None else min(batch_size, num_samples)
    batches = []
    for _ in range(epochs):
        perm = rng.permutation(num_samples)
        batches.extend(perm[i : i + b] for i in range(0, num_samples, b))
    return batches


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample; sequence targets (B, T) are averaged over T."""
    if y.dim() == 1:
        return F.cross_entropy(logits, y, reduction="none")
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return loss.view(y.shape).mean(dim=1)


@dataclass
class ClientBatch:
    """The clients trained together: their data indices and batch plans."""

    indices: list[np.ndarray]  # per client: indices into the training tensors
    plans: list[list[np.ndarray]]  # per client: batches (positions into indices)
    flip_labels: list[bool]  # label-flip attack per client


def train_sequential(
    model: nn.Module,
    global_w: torch.Tensor,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    clients: ClientBatch,
    cfg: LocalTraining,
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path: train each client in turn on one reused model.

    Returns (K, P) client models and (K,) mean training losses.
    """
    params = list(model.parameters())
    anchor = list(ParamSpec.of(model).unflatten(global_w).values()) if cfg.mu > 0 else None
    out, losses = [], []
    for idx, plan, flip in zip(clients.indices, clients.plans, clients.flip_labels, strict=True):
        set_flat(model, global_w)
        total = 0.0
        for pos in plan:
            sel = torch.from_numpy(idx[pos])
            x, y = train_x[sel], train_y[sel]
            if flip:
                y = num_classes - 1 - y
            loss = per_sample_loss(model(x), y).mean()
            total += float(loss.detach())
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss = loss + 0.5 * cfg.mu * prox
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                torch._foreach_add_(params, grads, alpha=-cfg.lr)
        out.append(get_flat(model))
        losses.append(total / max(len(plan), 1))
    return torch.stack(out), torch.tensor(losses)


def _padded_plan(clients: ClientBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, S, B) gather indices and 0/1 mask: client k's step s, padded where it has none."""
    k = len(clients.indices)
    steps = max(len(p) for p in clients.plans)
    width = max((len(b) for p in clients.plans for b in p), default=1)
    index = np.zeros((k, steps, width), dtype=np.int64)
    mask = np.zeros((k, steps, width), dtype=np.float32)
    for c, (idx, plan) in enumerate(zip(clients.indices, clients.plans, strict=True)):
        for s, pos in enumerate(plan):
            index[c, s, : len(pos)] = idx[pos]
            mask[c, s, : len(pos)] = 1.0
    return torch.from_numpy(index), torch.from_numpy(mask)


def train_vectorized(
    model: nn.Module,
    global_w: torch.Tensor,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    clients: ClientBatch,
    cfg: LocalTraining,
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train K clients at once: vmap(grad) over stacked parameters, one SGD step per batch.

    Clients are ordered by their number of steps, longest first, so the clients still
    training at step s are a prefix of the stack: each step runs on a view of just those,
    and a client with little data costs nothing once it is done. A client's last, smaller
    batch is padded with zero-weight samples.
    """
    spec = ParamSpec.of(model)
    k = len(clients.indices)
    order = sorted(range(k), key=lambda c: -len(clients.plans[c]))
    steps = [len(clients.plans[c]) for c in order]
    clients = ClientBatch(
        [clients.indices[c] for c in order], [clients.plans[c] for c in order], [clients.flip_labels[c] for c in order]
    )
    stacked = spec.unflatten(global_w.expand(k, -1))
    anchor = spec.unflatten(global_w) if cfg.mu > 0 else None
    index, mask = _padded_plan(clients)
    flip = torch.tensor(clients.flip_labels)
    mu = cfg.mu

    def client_loss(
        params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, m: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        data_loss = (per_sample_loss(functional_call(model, params, (x,)), y) * m).sum() / m.sum()
        loss = data_loss
        if anchor is not None:
            prox = sum(((params[name] - anchor[name]) ** 2).sum() for name in spec.names)
            loss = loss + 0.5 * mu * prox
        return loss, data_loss.detach()  # report the data loss, as the reference does

    step_fn = vmap(grad_and_value(client_loss, has_aux=True))
    names = list(spec.names)
    loss_sum = torch.zeros(k)
    for s in range(index.shape[1]):
        a = sum(n > s for n in steps)  # clients still training: a prefix of the stack
        live = {n: stacked[n][:a] for n in names}  # views: updating them updates the stack
        sel = index[:a, s]
        x, y = train_x[sel], train_y[sel]
        y = torch.where(flip[:a].view(-1, *([1] * (y.dim() - 1))), num_classes - 1 - y, y)
        grads, (_, loss) = step_fn(live, x, y, mask[:a, s])
        torch._foreach_add_([live[n] for n in names], [grads[n] for n in names], alpha=-cfg.lr)
        loss_sum[:a] += loss.detach()
    inverse = torch.argsort(torch.tensor(order))
    mean_loss = loss_sum / torch.tensor([max(n, 1) for n in steps], dtype=torch.float32)
    return spec.flatten(stacked, batch_dims=1)[inverse], mean_loss[inverse]


@torch.no_grad()  # not inference_mode: the model's weights must stay usable for training
def evaluate(
    model: nn.Module, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500
) -> tuple[float, float]:
    """Accuracy and mean loss of parameters `w` (per character for sequence data).

    Images go through in channels-last layout, which oneDNN's convolutions run faster.
    """
    set_flat(model, w)
    image = x.dim() == 4
    if image:
        model.to(memory_format=torch.channels_last)
    correct, loss_sum, count = 0.0, 0.0, 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        logits = model(xb.contiguous(memory_format=torch.channels_last) if image else xb)
        yb = y[i : i + batch_size]
        loss_sum += float(per_sample_loss(logits, yb).sum())
        hit = (logits.argmax(-1) == yb).float()
        correct += float(hit.mean(dim=1).sum() if hit.dim() > 1 else hit.sum())
        count += len(yb)
    return correct / count, loss_sum / count
