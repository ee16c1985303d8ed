"""`mlsyskit hpc logreg`: federated logistic regression over MPI ranks.

Rank 0 is the server, ranks 1..P-1 the clients, each holding its own (non-IID by default)
shard. Every round: the server broadcasts the weights (MPI_Bcast); each client runs
--local-steps full-batch gradient steps of multinomial logistic regression on its shard and
sends back only its model update (MPI_Gather); the server aggregates (sample-weighted mean or a
robust rule) and applies it. Data never leave a rank. With --mask the updates are pairwise
masked (mlsyskit.hpc.secagg): the server sees random-looking messages whose sum is the sum of
the weighted updates. --malicious K turns clients 1..K into attackers; a detector flags updates
far from the coordinate-wise median. The result is checked against scikit-learn's
LogisticRegression fitted on the pooled training data.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlsyskit.errors import UserError
from mlsyskit.hpc import mpi, robust, secagg

DATASETS = ("synthetic", "mnist-5k")
ATTACKS = ("sign-flip", "scale", "noise")
PARTITIONS = ("iid", "shards", "dirichlet")


@dataclass
class LogRegConfig:
    dataset: str = "synthetic"
    data_dir: str | None = None
    rounds: int = 30
    lr: float | None = None  # default per dataset
    local_steps: int = 5
    l2: float = 1e-4
    partition: str = "shards"
    alpha: float = 0.5
    malicious: int = 0
    attack: str = "sign-flip"
    attack_scale: float = 10.0
    strategy: str = "mean"
    trim_ratio: float = 0.25
    krum_f: int = 1
    mask: bool = False
    seed: int = 0
    reference: bool = True  # fit scikit-learn on the pooled data to compare

    def validate(self, clients: int) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        need(clients >= 1, "hpc logreg needs a server and at least one client: run it with `mpiexec -n 3 mlsyskit hpc logreg ...` (rank 0 is the server)")
        need(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; use synthetic or mnist-5k")
        need(self.rounds >= 1, f"--rounds must be at least 1, got {self.rounds}")
        need(self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.local_steps >= 1, f"--local-steps must be at least 1, got {self.local_steps}")
        need(self.l2 >= 0, f"--l2 must be >= 0, got {self.l2}")
        need(self.partition in PARTITIONS, f"unknown partition {self.partition!r}; use iid, shards or dirichlet")
        need(self.alpha > 0, f"--alpha must be positive, got {self.alpha}")
        need(0 <= self.malicious <= clients, f"--malicious {self.malicious}: there are {clients} clients (ranks 1..{clients})")
        need(self.attack in ATTACKS, f"unknown attack {self.attack!r}; use {', '.join(ATTACKS)}")
        need(self.strategy in robust.STRATEGIES, f"unknown strategy {self.strategy!r}; use {', '.join(robust.STRATEGIES)}")
        need(0 <= self.trim_ratio < 0.5, f"--trim-ratio must be in [0, 0.5), got {self.trim_ratio}")
        need(self.krum_f >= 0, f"--krum-f must be >= 0, got {self.krum_f}")
        need(not (self.mask and self.strategy != "mean"),
             f"--mask hides each client's update, and --strategy {self.strategy} needs them; use --strategy mean with --mask")
        need(not (self.mask and clients < 2), "--mask needs at least 2 clients (mpiexec -n 3): with one client its update is the sum")
        need(not (self.strategy == "krum" and clients <= 2 * self.krum_f + 2),
             f"krum tolerating --krum-f {self.krum_f} needs more than {2 * self.krum_f + 2} clients; got {clients}")


def load(cfg: LogRegConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, str]:
    """(train X, train y, test X, test y, classes, test source); X with a bias column."""
    if cfg.dataset == "synthetic":
        rng = np.random.default_rng(2024)
        d, k = 20, 3
        centres = rng.standard_normal((k, d)) * 0.5
        y = rng.integers(0, k, 4000)
        x = centres[y] + rng.standard_normal((4000, d))
        tx, ty, vx, vy, source = x[:3000], y[:3000], x[3000:], y[3000:], "1,000 held-out synthetic samples"
    else:
        from mlsyskit.data import load_dataset

        ds = load_dataset("mnist-5k", cfg.data_dir)
        tx, ty = ds.train_x.reshape(len(ds.train_y), -1).double().numpy(), ds.train_y.numpy()
        vx, vy = ds.test_x.reshape(len(ds.test_y), -1).double().numpy(), ds.test_y.numpy()
        k, source = ds.num_classes, ds.test_source
    bias = lambda a: np.hstack([a, np.ones((len(a), 1))])  # noqa: E731
    return bias(tx), ty.astype(np.int64), bias(vx), vy.astype(np.int64), k, source


def split(labels: np.ndarray, clients: int, scheme: str, seed: int, alpha: float = 0.5) -> list[np.ndarray]:
    """Sample indices per client, the rules of ``mlsyskit.data.partition`` (iid; shards: sort
    by label, 2 shards per client, McMahan et al.; dirichlet: per-class proportions ~ Dir(alpha)).
    Written here in numpy because importing ``mlsyskit.data`` imports torch, and every rank
    would pay for it."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if clients > n or (scheme == "shards" and 2 * clients > n):
        raise UserError(f"{clients} clients is too many for {n:,} training samples")
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), clients)
    elif scheme == "shards":
        shards = np.array_split(np.argsort(labels, kind="stable"), 2 * clients)
        parts = [np.concatenate([shards[s] for s in row]) for row in rng.permutation(2 * clients).reshape(clients, 2)]
    else:
        for _ in range(100):
            buckets: list[list[np.ndarray]] = [[] for _ in range(clients)]
            for c in np.unique(labels):
                members = rng.permutation(np.flatnonzero(labels == c))
                cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(members)).astype(np.int64)
                for i, chunk in enumerate(np.split(members, cuts)):
                    buckets[i].append(chunk)
            parts = [np.concatenate(b) for b in buckets]
            if min(len(p) for p in parts) > 0:
                break
        else:
            raise UserError(f"--partition dirichlet with --alpha {alpha} left a client without data; use a larger alpha")
    return [np.sort(p.astype(np.int64)) for p in parts]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def loss_and_accuracy(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    p = _softmax(x @ w)
    return float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean()), float((p.argmax(1) == y).mean())


def local_update(w: np.ndarray, x: np.ndarray, y: np.ndarray, steps: int, lr: float, l2: float) -> np.ndarray:
    """Full-batch gradient descent on the client's cross-entropy + l2/2 |w|^2; w_new - w."""
    onehot = np.eye(w.shape[1])[y]
    v = w.copy()
    for _ in range(steps):
        v -= lr * (x.T @ (_softmax(x @ v) - onehot) / len(y) + l2 * v)
    return v - w


def attack(update: np.ndarray, kind: str, scale: float, rng: np.random.Generator) -> np.ndarray:
    if kind == "sign-flip":
        return -scale * update
    if kind == "scale":
        return scale * update
    return rng.normal(0.0, scale * float(update.std()) + 1e-12, update.shape)


def _exchange_seeds(comm: Any, rank: int, clients: int) -> dict[int, int]:
    """Pairwise seeds between client ranks, sent client to client (never via rank 0)."""
    seeds: dict[int, int] = {}
    for peer in range(1, clients + 1):
        if peer == rank:
            continue
        if rank < peer:
            seeds[peer] = secrets.randbits(63)
            comm.send(seeds[peer], dest=peer, tag=7)
        else:
            seeds[peer] = comm.recv(source=peer, tag=7)
    return seeds


def run_logreg(cfg: LogRegConfig) -> dict[str, Any]:
    comm = mpi.world()
    rank, size = comm.Get_rank(), comm.Get_size()
    clients = size - 1
    error = None
    try:
        cfg.validate(clients)
        tx, ty, vx, vy, k, source = load(cfg)
    except UserError as e:
        error = str(e)
    mpi.fail_all(comm, error)
    lr = cfg.lr if cfg.lr is not None else {"synthetic": 0.5, "mnist-5k": 0.1}[cfg.dataset]
    error, parts = None, []
    try:
        parts = split(ty, clients, cfg.partition, cfg.seed, cfg.alpha)
    except UserError as e:
        error = str(e)
    mpi.fail_all(comm, error)
    d = tx.shape[1]
    w = np.zeros((d, k))
    size_msg = d * k + 1  # the update, then the client's sample count
    malicious = list(range(1, cfg.malicious + 1))
    seeds = _exchange_seeds(comm, rank, clients) if cfg.mask and rank > 0 else {}
    rng = np.random.default_rng([cfg.seed, rank])
    if rank > 0:
        xi, yi = tx[parts[rank - 1]], ty[parts[rank - 1]]
    history: list[float] = []
    flagged_rounds: dict[int, int] = {}
    compute_s = bcast_s = wait_s = gather_s = agg_s = 0.0
    dtype = np.uint64 if cfg.mask else np.float64
    recv = np.zeros((size, size_msg), dtype=dtype) if rank == 0 else None
    comm.Barrier()
    t_start = time.perf_counter()
    for rnd in range(cfg.rounds):
        t0 = time.perf_counter()
        comm.Bcast(w, root=0)
        t1 = time.perf_counter()
        if rank > 0:
            delta = local_update(w, xi, yi, cfg.local_steps, lr, cfg.l2)
            if rank in malicious:
                delta = attack(delta, cfg.attack, cfg.attack_scale, rng)
            n_i = float(len(yi))
            if cfg.mask:
                msg = secagg.mask(secagg.encode(np.append(n_i * delta.ravel(), n_i)), rank, seeds, rnd)
            else:
                msg = np.append(delta.ravel(), n_i)
        else:
            msg = np.zeros(size_msg, dtype=dtype)
        t2 = time.perf_counter()
        comm.Barrier()  # the server's wait here is the clients' compute, not communication
        t3 = time.perf_counter()
        comm.Gather(msg, recv, root=0)
        t4 = time.perf_counter()
        if rank == 0:
            if cfg.mask:
                total = secagg.unmask_sum(recv[1:])
                w += (total[:-1] / total[-1]).reshape(d, k)
            else:
                updates, weights = recv[1:, :-1], recv[1:, -1]
                for i in robust.flag_outliers(updates) if clients >= 3 else []:
                    flagged_rounds[i + 1] = flagged_rounds.get(i + 1, 0) + 1
                agg = robust.aggregate(updates, weights, cfg.strategy, trim_ratio=cfg.trim_ratio, krum_f=cfg.krum_f)
                w += agg.reshape(d, k)
            history.append(round(loss_and_accuracy(w, vx, vy)[1], 4))
        t5 = time.perf_counter()
        bcast_s += t1 - t0
        compute_s += t2 - t1
        wait_s += t3 - t2
        gather_s += t4 - t3
        agg_s += t5 - t4
    wall = time.perf_counter() - t_start
    compute_max = comm.reduce(compute_s, op=mpi.mpi_module().MAX, root=0)
    if rank != 0:
        return {}
    test_loss, test_acc = loss_and_accuracy(w, vx, vy)
    sk_acc, sk_s, sk_converged = reference(tx, ty, vx, vy) if cfg.reference else (None, None, None)
    flagged = sorted(r for r, c in flagged_rounds.items() if c > cfg.rounds // 2)
    return {
        "dataset": cfg.dataset, "ranks": size, "clients": clients, "rounds": cfg.rounds, "partition": cfg.partition,
        "strategy": cfg.strategy, "mask": cfg.mask, "lr": lr, "local_steps": cfg.local_steps,
        "test_accuracy": test_acc, "test_loss": test_loss, "sklearn_accuracy": sk_acc,
        "accuracy_gap": None if sk_acc is None else sk_acc - test_acc, "sklearn_converged": sk_converged,
        "test_source": source,
        "malicious": malicious, "attack": cfg.attack if malicious else None,
        "flagged": flagged if not cfg.mask else None,
        "server_saw": "masked messages; only their sum is meaningful" if cfg.mask else "each client's update",
        "client_samples": [int(len(p)) for p in parts],
        "history": history,
        "compute_s": compute_max, "bcast_s": bcast_s, "server_wait_s": wait_s, "gather_s": gather_s,
        "comm_s": bcast_s + gather_s, "aggregate_eval_s": agg_s, "wall_s": wall, "sklearn_s": sk_s,
        "bytes_per_round": 8 * size_msg * clients * 2, "mpi": mpi.library(),
    }


def reference(tx: np.ndarray, ty: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> tuple[float, float, bool]:
    """scikit-learn's LogisticRegression (lbfgs, C=1) on the pooled training data: (test
    accuracy, seconds to fit, converged)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as converged = False
        ref = LogisticRegression(max_iter=1000).fit(tx[:, :-1], ty)
    seconds = time.perf_counter() - t0
    return float(ref.score(vx[:, :-1], vy)), seconds, bool(int(np.max(ref.n_iter_)) < 1000)


def summary_line(r: dict[str, Any]) -> str:
    text = (f"logistic regression over {r['clients']} client rank(s), {r['rounds']} rounds ({r['strategy']}"
            f"{', masked' if r['mask'] else ''}): test accuracy {r['test_accuracy']:.4f}"
            + (f", scikit-learn on the pooled data {r['sklearn_accuracy']:.4f}" if r["sklearn_accuracy"] is not None else "")
            + f"; compute {r['compute_s']:.3f} s, communication {r['comm_s']:.3f} s")
    if r["malicious"]:
        text += f"; malicious ranks {r['malicious']} ({r['attack']}), flagged {r['flagged']}"
    return text
