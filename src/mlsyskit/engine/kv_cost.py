"""The cost model of moving KV blocks: swap or recompute a preempted sequence, and what it
would take to keep a model's whole KV cache in host memory (``mlsyskit plan-memory``).

Swapping a sequence of ``n`` tokens moves ``n * kv_bytes_per_token`` bytes out and the same
back in; recomputing it runs ``n`` tokens of prefill. Both rates are measured on the running
engine (a copy of a few MiB at start-up, prefill steps as they run), so the choice follows the
machine: on a CPU a copy is ~100x cheaper than a prefill; over a slow link it may not be.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "int8": 1, "fp8": 1}


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype_bytes: float) -> float:
    """Keys and values of one token in every layer."""
    return 2.0 * n_layers * n_kv_heads * head_dim * dtype_bytes


def measure_copy_bandwidth(nbytes: int = 16 << 20, repeats: int = 3) -> float:
    """Bytes/s of a tensor copy in host memory (the best of ``repeats``; the first copy faults
    the destination's pages in and is not counted)."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / max(best, 1e-9)


@dataclass
class SwapPolicy:
    """``mode`` "swap" / "recompute" forces the choice; "auto" swaps when moving the KV out and
    back costs less than recomputing its tokens at the prefill rate measured so far."""

    mode: str
    bytes_per_token: float
    copy_bytes_per_s: float
    prefill_tokens_per_s: float | None = None  # None until a prefill step has been timed

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """Fold one prefill step's rate into the estimate (exponential average)."""
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        p = self.prefill_tokens_per_s
        self.prefill_tokens_per_s = rate if p is None else 0.8 * p + 0.2 * rate

    def swap_seconds(self, n_tokens: int) -> float:
        return 2.0 * n_tokens * self.bytes_per_token / self.copy_bytes_per_s

    def recompute_seconds(self, n_tokens: int) -> float | None:
        p = self.prefill_tokens_per_s
        return None if p is None else n_tokens / p

    def prefer_swap(self, n_tokens: int) -> bool:
        if self.mode != "auto":
            return self.mode == "swap"
        r = self.recompute_seconds(n_tokens)
        # no prefill timed yet: a copy in memory is assumed cheaper (it is by ~100x on a CPU)
        return r is None or self.swap_seconds(n_tokens) < r


@dataclass
class MemoryPlan:
    """Where a model's KV cache fits (see :func:`plan_memory`)."""

    params: float
    weight_bytes: float
    kv_bytes_per_token: float
    kv_budget_bytes: float
    tokens_fit: int
    rows: list[dict[str, float]]  # per context length: bytes per generated token from host, tok/s bound


def count_params(n_layers: int, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden_dim: int,
                 vocab: int, tied: bool, gated: bool = True) -> float:
    """Weights of a decoder-only transformer (norms and biases left out: < 0.1 %)."""
    attn = dim * n_heads * head_dim * 2 + dim * n_kv_heads * head_dim * 2
    mlp = (3 if gated else 2) * dim * hidden_dim
    return float(n_layers * (attn + mlp) + vocab * dim * (1 if tied else 2))


def plan_memory(
    params: float, weight_dtype_bytes: float, kv_bytes_token: float, gpu_gib: float, *,
    reserve_gib: float = 1.0, contexts: tuple[int, ...] = (1024, 2048, 4096, 8192),
    link_bytes_per_s: float = 25e9, hbm_bytes_per_s: float = 900e9,
) -> MemoryPlan:
    """How many tokens of KV fit next to the weights on a ``gpu_gib`` GPU (``reserve_gib`` kept
    for activations and the allocator), and, if all KV lived in host memory instead, the bytes
    each generated token must copy over the host link (every cached token's K and V, every
    step) and the decode rate that link allows, against the rate the GPU's memory allows."""
    weights = params * weight_dtype_bytes
    budget = max(0.0, gpu_gib * GIB - weights - reserve_gib * GIB)
    rows = []
    for ctx in contexts:
        per_token = ctx * kv_bytes_token
        rows.append({
            "context": ctx,
            "kv_bytes": per_token,
            "fits_on_gpu": float(per_token <= budget),
            "host_bytes_per_generated_token": per_token,
            "tok_s_bound_host_link": link_bytes_per_s / per_token,
            "tok_s_bound_gpu_memory": hbm_bytes_per_s / (weights + min(per_token, budget)),
        })
    return MemoryPlan(params, weights, kv_bytes_token, budget, int(budget // kv_bytes_token), rows)
