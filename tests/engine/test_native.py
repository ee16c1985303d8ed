"""GGUF weights run natively: Q4_0 / Q4_1 / Q8_0 blocks stay memory-mapped, the kernels compute on
them (activations rounded to int8 per block, as llama.cpp does), and the result stays close to
the float32 reference (``dtype="float32"``, which dequantizes on load)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mlsyskit.engine import LLM, SamplingParams
from mlsyskit.models.checkpoint import load_checkpoint
from mlsyskit.models.transformer import RowEmbedding
from mlsyskit.quant import kernels
from mlsyskit.quant.linear import BlockLinear, model_bytes, set_prefill_dtype

from .conftest import np_view_of_file

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"no compiled kernels: {kernels.status()}")
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPT = "The quick brown fox jumps over the lazy dog. Une phrase en français, 123 + 456 = 579."


def _file_view(layer: BlockLinear) -> bool:
    return all(np_view_of_file(p.data) for p in layer.block_weight.parts)


@pytest.mark.parametrize("fixture", ["tiny_llama_q_gguf", "tiny_qwen2_q_gguf"])
def test_blocks_stay_in_the_file_and_compute_like_the_float32_reference(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    native, ref = LLM(path), LLM(path, dtype="float32")
    model = native.engine.model
    linears = [m for m in model.modules() if isinstance(m, BlockLinear)]
    assert {f for m in linears for f in m.formats} == {"Q4_0", "Q4_1", "Q8_0"}
    assert all(_file_view(m) for m in linears)  # read-only views of the mapping: nothing copied
    assert isinstance(model.embed, RowEmbedding)
    if fixture == "tiny_qwen2_q_gguf":  # tied: one Q8_0 table is both the lookup and the head
        assert model.lm_head is model.embed.layer and model.layers[0].attn.qkv.bias is not None
    ids = torch.tensor([native.tokenizer.encode(PROMPT)[:40]])
    with torch.no_grad():
        want = ref.engine.model(ids)
        # 40 rows: one dense GEMM per layer on the dequantized blocks; in float32 exactly the
        # reference, in bf16 (the engine's choice on CPUs with AMX / AVX-512 BF16) close to it
        assert F.cosine_similarity(model(ids)[0], want[0], dim=-1).min() > 0.99
        set_prefill_dtype(model, torch.float32)
        assert torch.equal(model(ids), want)
        # 5 rows: the integer kernels; close, not equal (int8 activations)
        a, b = model(ids[:, :5])[0], want[0, :5]
    assert F.cosine_similarity(a, b, dim=-1).min() > 0.99


def test_fused_decode_matches_the_module_path_and_ignores_its_neighbours(tiny_qwen2_q_gguf: Path) -> None:
    """Decode rows run one C call per layer; the same rows through the PyTorch modules agree to
    int8-rounding noise, and a row's result does not depend on the other rows of its step."""
    llm = LLM(tiny_qwen2_q_gguf)
    runner = llm.engine.runner
    assert runner.fused is not None
    prompts = [llm.tokenizer.encode(t) for t in ("To be, or not to be", "A", "Now is the winter of our discontent")]
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(p, GREEDY, request_id=str(i))
    eng.step()  # all three prompts prefilled; the next step decodes all three
    seqs = list(eng.scheduler.running)
    saved = runner.kv.k.clone(), runner.kv.v.clone()

    def logits(batch: list, fused: bool) -> list[torch.Tensor]:
        runner.kv.k.copy_(saved[0])
        runner.kv.v.copy_(saved[1])
        f, runner.fused = runner.fused, (runner.fused if fused else None)
        try:
            with torch.inference_mode():
                return runner._forward(batch)
        finally:
            runner.fused = f

    together = logits([(s, 1) for s in seqs], fused=True)
    alone = [logits([(s, 1)], fused=True)[0] for s in seqs]
    assert all(torch.equal(a, b) for a, b in zip(together, alone, strict=True))
    modules = logits([(s, 1) for s in seqs], fused=False)
    for a, b in zip(together, modules, strict=True):
        assert F.cosine_similarity(a, b, dim=0) > 0.999
    while eng.has_unfinished():
        eng.step()


def test_quantized_directories_use_the_fused_decoder(tiny_llama_dir: Path) -> None:
    llm = LLM(tiny_llama_dir, quantization="int4-g32")
    assert llm.engine.runner.fused is not None
    out = llm.generate(["Once upon a time"], GREEDY)[0]
    assert len(out.token_ids) == GREEDY.max_tokens


def test_smollm2_native_is_small_and_close_to_float32(smollm2_checkpoint) -> None:
    native = LLM()
    model = native.engine.model
    assert sum(isinstance(m, BlockLinear) for m in model.modules()) == 4 * 30 + 1
    # the Q4_1/Q8_0 blocks (~96 MB, memory-mapped) and float norms: no float32 copy (~540 MB)
    assert model_bytes(model) < 120e6
    ref = LLM(smollm2_checkpoint)
    ids = torch.tensor([native.tokenizer.encode(PROMPT)])
    with torch.no_grad():
        a, b = model(ids[:, :8])[0], ref.engine.model(ids[:, :8])[0]
    assert F.cosine_similarity(a, b, dim=-1).min() > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75
    # Greedy text: the int8 activations move logits by a few hundredths, so at a near tie native
    # greedy can take the other token (which one depends on the CPU's kernel variant: "Hello, my
    # name is Alex, and I'm a" went " professional" in float32, " brilliant" natively, 0.02 apart).
    # So: float32, teacher-forced on native's own greedy text, rates every native pick within
    # 0.5 logit of its best (the logits span ~35), and agrees exactly on most steps.
    exact = steps = 0
    for prompt in ("def fibonacci(n):", "1, 2, 3, 4,", "Hello, my name is", "The capital of France is"):
        out = native.generate([prompt], GREEDY)[0]
        seq = torch.tensor([out.prompt_token_ids + out.token_ids])
        with torch.no_grad():
            logits = ref.engine.model(seq)[0][len(out.prompt_token_ids) - 1 : -1]
        gap = logits.max(-1).values - logits.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert float(gap.max()) < 0.5, (prompt, out.text, gap.tolist())
        exact, steps = exact + int((gap == 0).sum()), steps + len(out.token_ids)
    assert exact >= 0.9 * steps
    # teacher-forced on float32's own greedy continuation: native picks the same next token
    # almost everywhere
    ids = ref.generate(["To be, or not to be"], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    seq = torch.tensor([ids.prompt_token_ids + ids.token_ids])
    with torch.no_grad():
        agree = (model(seq)[0].argmax(-1) == ref.engine.model(seq)[0].argmax(-1)).float().mean()
    assert agree >= 0.9
    # (not "What is the capital of France?": its first token is a near tie in float32 too, "The"
    # 25.33 against "L" 25.24, and native goes on "L'Étoile, la Marseillaise...")
    out = native.chat([{"role": "user", "content": "Name the capital of France."}], SamplingParams(max_tokens=30, temperature=0))[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_without_a_compiler_gguf_weights_are_dequantized_and_it_says_so_once(tmp_path: Path, tiny_llama_q_gguf: Path) -> None:
    code = f"""
from mlsyskit.engine import LLM, SamplingParams
from mlsyskit.quant.linear import BlockLinear
llm = LLM({str(tiny_llama_q_gguf)!r})
assert not any(isinstance(m, BlockLinear) for m in llm.engine.model.modules())
assert llm.engine.runner.fused is None and not llm.engine.kv_cache.in_place_decode
print(llm.generate(["Once upon a time"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].token_ids)
"""
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "MLSYSKIT_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("compiled kernels unavailable") == 1, r.stderr
    ref = LLM(tiny_llama_q_gguf, dtype="float32").generate(["Once upon a time"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert r.stdout.strip() == str(ref.token_ids)


def test_native_checkpoint_refuses_quantization_and_float_dtype_keeps_reference(tiny_llama_q_gguf: Path) -> None:
    ck = load_checkpoint(tiny_llama_q_gguf, native=True)
    from mlsyskit.errors import UserError

    with pytest.raises(UserError, match="already quantized"):
        LLM(ck, quantization="int8")
    ref = LLM(tiny_llama_q_gguf, dtype="float32")
    assert not any(isinstance(m, BlockLinear) for m in ref.engine.model.modules())


def test_thread_tuner_keeps_the_faster_choice() -> None:
    from mlsyskit.engine.fused_decode import ThreadTuner

    torch.set_num_threads(2)  # the autouse fixture restores it
    for slow in (2, 1):  # the machine makes 2 threads slow, then 1 thread slow
        tuner, used = ThreadTuner(window=3, period=8), []
        for _ in range(200):
            n = tuner.threads()
            used.append(n)
            tuner.record(n, 0.5 if n == slow else 0.1)
        fast = 3 - slow
        assert tuner.current == fast
        assert used[-100:].count(slow) <= 3  # after backing off, the slow choice is rarely tried
