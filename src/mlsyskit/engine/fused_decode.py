"""Decode steps with one C call per layer (``csrc/decode.c`` via :mod:`mlsyskit.quant.kernels`).

A decode step of a small model at batch 1 is short enough that PyTorch's per-op cost (~35 ops
per layer: norms, RoPE, the KV write, SwiGLU, residual adds) rivals the matrix products. For the
Llama family with quantized weights (a GGUF file run natively, or ``mlsyskit quantize``
layers) the decode rows of a step, up to ``MAX_ROWS`` (64) of them, run each layer as one
call instead (in a step that also prefills, the prefill rows go through the modules apart);
prefill chunks and larger batches keep the module path, whose dense GEMMs win there. Up to 64
rows the integer kernels beat the module path's dequantize + bf16 GEMM and its per-op cost
(measured on 64 requests at once, SmolLM2 Q4_1, 2 threads: 16.2-16.7 s against 18.2-22.3 s
when the fused steps stopped at 31 rows; ``benchmarks/engine_profile.py --together``).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor

from mlsyskit.engine.attention import PagedKVCache
from mlsyskit.models.blocks import RMSNorm
from mlsyskit.models.transformer import Transformer
from mlsyskit.quant import kernels
from mlsyskit.quant.linear import BlockLinear, QuantLinear

MAX_ROWS = 64  # decode rows a fused step takes (see the module docs)


class ThreadTuner:
    """Picks how many threads the fused decode steps use, by timing them.

    A parallel region ends when its slowest thread does; on a machine where another process
    holds a core, that thread waits for its time slice, and two threads can be many times
    slower than one (measured here at a load of 8 on 2 cores: a median step of 560 ms with 2
    threads, 77 ms with 1). After the first ``window`` steps, and again every ``period`` steps,
    the other choice is tried for ``window`` steps and kept if its median step is 10 % faster;
    each failed try doubles the period (up to ``max_period``), so a bad choice costs little.
    The kernels' results do not depend on the thread count.
    """

    def __init__(self, window: int = 3, period: int = 32, max_period: int = 2048) -> None:
        self.window, self.base_period, self.max_period = window, period, max_period
        self.period = period
        self.current: int | None = None
        self.recent: list[float] = []  # step times with the current choice
        self.trial: list[float] = []  # step times with the alternative, while trying it
        self.next_trial = window  # step count at which the next try starts
        self.steps = 0

    def choices(self) -> tuple[int, int]:
        """(the default: torch's thread count, the alternative: 1)."""
        best = torch.get_num_threads()
        return best, 1

    def threads(self) -> int:
        """The thread count for the next step."""
        first, other = self.choices()
        if self.current not in (first, other):  # first use, or torch's thread count changed
            self.current, self.recent, self.trial, self.period = first, [], [], self.base_period
            self.next_trial = self.steps + self.window
        if first != other and self.steps >= self.next_trial:
            return other if self.current == first else first
        return self.current

    def record(self, threads: int, seconds: float) -> None:
        """The wall time of a step run with ``threads``."""
        self.steps += 1
        if threads == self.current:
            self.recent = (self.recent + [seconds])[-self.window :]
            return
        self.trial.append(seconds)
        if len(self.trial) < self.window:
            return
        if self.recent and statistics.median(self.trial) < 0.9 * statistics.median(self.recent):
            self.current, self.recent, self.period = threads, self.trial, self.base_period
        else:
            self.period = min(2 * self.period, self.max_period)
        self.trial = []
        self.next_trial = self.steps + self.period


def kernel_weight(m: object) -> kernels.QWeight | None:
    """The kernels' view of a quantized linear layer without a bias, else None."""
    if isinstance(m, (QuantLinear, BlockLinear)) and m._qw is not None:
        return m._qw
    return None


class FusedDecoder:
    """The model's layers as :class:`mlsyskit.quant.kernels.DecodeLayer` descriptors."""

    @staticmethod
    def supports(model: Transformer, kv: PagedKVCache | None) -> bool:
        """Llama family, every projection quantized with a kernel, float32 norms and KV pool."""
        cfg = model.cfg
        if cfg.gpt2 or kv is None or not kv.in_place_decode or cfg.head_dim > 512:
            return False
        for layer in model.layers:
            attn, ffn = layer.attn, layer.ffn
            weights = [getattr(attn, "qkv", None), attn.o_proj, getattr(ffn, "gate_up", None), ffn.down]
            if any(kernel_weight(w) is None for w in weights):
                return False
            if any(w.bias is not None for w in weights[1:]):
                return False
            if weights[0].bias is not None and weights[0].bias.dtype != torch.float32:
                return False
            norms = (layer.attn_norm, layer.ffn_norm)
            if not all(isinstance(n, RMSNorm) and n.weight.dtype == torch.float32 for n in norms):
                return False
        return True

    def __init__(self, model: Transformer, kv: PagedKVCache, max_rows: int = MAX_ROWS) -> None:
        cfg = model.cfg
        self.model = model
        self.max_rows = max_rows
        self.dims = kernels.DecodeDims(
            cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, kv.block_size,
            int(kv.k.dtype == torch.float16), model.layers[0].attn_norm.eps,
            model.rope_cos.data_ptr(), model.rope_sin_signed.data_ptr(),
        )
        self.layers = []
        for i, layer in enumerate(model.layers):
            w = [kernel_weight(m) for m in (layer.attn.qkv, layer.attn.o_proj, layer.ffn.gate_up, layer.ffn.down)]
            bias = layer.attn.qkv.bias
            self.layers.append(kernels.DecodeLayer(
                *(q.address for q in w), *(len(q.parts) for q in w),
                0 if bias is None else bias.data_ptr(),
                layer.attn_norm.weight.data_ptr(), layer.ffn_norm.weight.data_ptr(),
                kv.k[i].data_ptr(), kv.v[i].data_ptr(),
            ))
        per_row = 2 * cfg.dim + (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        per_row += cfg.n_heads * cfg.head_dim + 3 * cfg.hidden_dim
        self.scratch = torch.empty(max_rows * per_row, dtype=torch.float32)
        self.tuner = ThreadTuner()
        self.stats = None  # profiling: a ctypes array the layers add their phase times to

    def profile(self, on: bool = True) -> None:
        """Start (or stop) adding each layer phase's time to ``self.stats``, seconds summed over
        layers and steps, in the order of :data:`mlsyskit.quant.kernels.DECODE_PHASES`."""
        import ctypes

        self.stats = (ctypes.c_double * len(kernels.DECODE_PHASES))() if on else None

    def forward(
        self, ids: Tensor, pos: Tensor, slots: Tensor, tables: Tensor, lens: Tensor, x: Tensor | None = None
    ) -> Tensor:
        """Hidden states (B, dim) after the last layer for B decode tokens: ``ids`` (B,) token ids,
        ``pos`` (B,) int32 positions, ``slots``/``tables``/``lens`` as for the paged attention;
        ``x``: the layers' input (B, dim) instead of the tokens' embeddings (a pipeline stage)."""
        if not 0 < len(ids) <= self.max_rows:  # the scratch holds max_rows rows
            raise ValueError(f"a fused decode step takes 1 to {self.max_rows} rows, not {len(ids)}")
        x = (self.model.embed(ids) if x is None else x).float().contiguous()
        for layer in self.layers:
            kernels.decode_layer(layer, self.dims, x, pos, slots, tables, lens, self.scratch, stats=self.stats)
        return x

    def timed(self) -> _TimedStep:
        """``with decoder.timed():`` around a decode step (layers and logits): the kernels
        inside use the tuner's thread count and the step's time goes back to it."""
        return _TimedStep(self.tuner)


class _TimedStep:
    def __init__(self, tuner: ThreadTuner) -> None:
        self.tuner = tuner

    def __enter__(self) -> None:
        self.threads = self.tuner.threads()
        self.ctx = kernels.using_threads(self.threads)
        self.ctx.__enter__()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.ctx.__exit__(*exc)
        if exc[0] is None:
            self.tuner.record(self.threads, time.perf_counter() - self.t0)

