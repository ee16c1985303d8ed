"""Speculative decoding by prompt lookup: greedy output is exactly the output without it (float32
and the native quantized path, alone and in mixed continuous batches), drafts are really
accepted and rejected, every KV block goes back to the pool, and sampled requests get the
target distribution (rejection sampling)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlsyskit.engine import LLM, Checkpoint, SamplingParams, load_checkpoint
from mlsyskit.engine.sequence import Sequence
from mlsyskit.engine.speculative import NgramProposer, accept
from mlsyskit.errors import UserError
from mlsyskit.quant import kernels

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
SHAKESPEARE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
)


def _prompts(tok: object) -> list[list[int]]:
    """Prompts whose continuations repeat earlier n-grams (drafts get made) and some that don't."""
    return [
        [5, 6, 7, 8, 9] * 4,
        tok.encode(SHAKESPEARE + "First Citizen:\nBefore we"),
        [3],
        list(range(10, 30)) + list(range(10, 15)),
        tok.encode("Speak, speak. Speak, speak. Speak,"),
        [40, 41, 42, 43] * 5,
    ]


def _run(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


def _assert_pool_empty(llm: LLM) -> None:
    u = llm.engine.kv_usage()
    assert u["blocks_used"] == 0 and u["blocks_free"] == u["blocks_total"], u


def _assert_drafts_were_judged(llm: LLM, both: bool = True) -> None:
    st = llm.engine.spec_stats()
    assert st["verify_steps"] > 0, st
    if both:  # some accepted, some rejected: the rollback ran
        assert 0 < st["accepted_tokens"] < st["draft_tokens"], st


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> Checkpoint:
    return load_checkpoint(tiny_llama_dir)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"num_speculative_tokens": 2, "ngram_max": 2, "batching": "static", "max_num_seqs": 4},
        {"num_speculative_tokens": 7, "max_num_batched_tokens": 9, "max_prefill_tokens": 9},  # the budget cuts drafts
        {"block_size": 4, "num_kv_blocks": 24},  # a tiny pool: preemptions between verify steps
        {"prefix_caching": False, "ngram_min": 2},
    ],
    ids=["continuous", "static-k2", "small-budget", "preempting", "no-prefix-cache"],
)
def test_float32_greedy_output_is_unchanged(llama: Checkpoint, variant: dict) -> None:
    prompts = _prompts(llama.tokenizer)
    reference = _run(LLM(llama), prompts)
    llm = LLM(llama, speculative="ngram", **variant)
    assert _run(llm, prompts) == reference  # a batch mixing drafting and plain sequences
    assert [_run(llm, [p])[0] for p in prompts] == reference  # and one at a time
    _assert_drafts_were_judged(llm, both=not variant)
    _assert_pool_empty(llm)
    if "num_kv_blocks" in variant:
        assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.skipif(not kernels.available(), reason=f"no compiled kernels: {kernels.status()}")
def test_native_quantized_greedy_output_is_unchanged_with_more_rows_than_a_fused_call(tiny_llama_q_gguf: Path) -> None:
    """Drafts of up to 12 tokens: 13 verify rows, more than the integer kernels take row by row
    (7), so the step is split into chunks; each row is still computed as the single-token
    decode computes it, so the tokens are bit-for-bit those without drafting. A batch of 18
    such sequences (100+ verify rows a step) runs and gives every block back."""
    plain = LLM(tiny_llama_q_gguf)
    prompts = _prompts(plain.tokenizer)
    reference = [_run(plain, [p])[0] for p in prompts]
    llm = LLM(tiny_llama_q_gguf, speculative="ngram", num_speculative_tokens=12)
    assert llm.engine.runner.fused is not None
    rows = []
    fwd = llm.engine.runner.fused.forward
    llm.engine.runner.fused.forward = lambda ids, *a, **k: rows.append(len(ids)) or fwd(ids, *a, **k)
    assert [_run(llm, [p])[0] for p in prompts] == reference
    assert kernels.TILE_ROWS in rows  # a verify step split into chunks of 7 rows
    assert all(len(o) == GREEDY.max_tokens for o in _run(llm, prompts * 3))
    _assert_drafts_were_judged(llm)
    _assert_pool_empty(llm)


@pytest.mark.skipif(not kernels.available(), reason=f"no compiled kernels: {kernels.status()}")
def test_smollm2_native_output_is_unchanged_and_drafts_are_accepted(smollm2_path: Path) -> None:
    passage = SHAKESPEARE.strip()
    plain, spec = LLM(smollm2_path), LLM(smollm2_path, speculative="ngram")
    chat = [[{"role": "user", "content": f"{passage}\n\nRepeat the text above."}],
            [{"role": "user", "content": "What is the capital of France?"}]]
    prompts = [plain.chat_prompt(c) for c in chat]
    params = SamplingParams(max_tokens=32, temperature=0)
    # one at a time, and both at once (the same prefill step in both runs: a prefill's bf16
    # GEMMs round by the step's shape, drafting or not)
    assert [_run(spec, [p], params)[0] for p in prompts] == [_run(plain, [p], params)[0] for p in prompts]
    assert _run(spec, prompts, params) == _run(plain, prompts, params)
    st = spec.engine.spec_stats()
    assert st["accepted_tokens"] > 10 and st["mean_accepted"] > 1.0, st  # the reply repeats itself and the text
    _assert_pool_empty(spec)


def test_abort_mid_generation_frees_every_block(llama: Checkpoint) -> None:
    llm = LLM(llama, speculative="ngram")
    prompts = _prompts(llama.tokenizer)
    rids = [llm.engine.add_request(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)) for p in prompts]
    for _ in range(40):  # until some draft was verified
        llm.engine.step()
        if llm.engine.spec_stats()["verify_steps"]:
            break
    assert llm.engine.spec_stats()["verify_steps"] > 0 and llm.engine.has_unfinished()
    for rid in rids:
        llm.engine.abort(rid)
    assert not llm.engine.has_unfinished()
    _assert_pool_empty(llm)
    # streaming: breaking out aborts too; the deltas still add up to the text
    stream = llm.stream(prompts[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    outs = [next(stream) for _ in range(3)]
    stream.close()
    assert "".join(o.delta for o in outs) == outs[-1].text
    _assert_pool_empty(llm)


def test_stop_and_length_end_inside_an_accepted_draft(llama: Checkpoint) -> None:
    prompts = _prompts(llama.tokenizer)
    for params in (SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
                   SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)):
        want = LLM(llama).generate(prompts, params)
        got = LLM(llama, speculative="ngram", num_speculative_tokens=6).generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert all(len(o.token_ids) == params.max_tokens and o.finish_reason == "length" for o in got)
    # a stop string: the text ends before it, the same as without drafting
    text = LLM(llama).generate(prompts[1], GREEDY)[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
        a = LLM(llama).generate(prompts[1], p)[0]
        b = LLM(llama, speculative="ngram").generate(prompts[1], p)[0]
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason) == (a.text, "stop")


def test_rejection_sampling_keeps_the_target_distribution() -> None:
    """A draft token the model finds unlikely: the first emitted token is still distributed as
    the model's own (within 4 standard errors over 6000 draws), drafted or not."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    p = logits[0].softmax(-1)
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(1)
    n = 6000
    counts = torch.zeros(5)
    lengths = []
    for _ in range(n):
        out = accept(logits, [3], params, g)
        counts[out[0]] += 1
        lengths.append(len(out))
    freq = counts / n
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 4 * se + 1e-3).all(), (freq, p)
    # accepted (two tokens out) about as often as p(draft)
    assert abs(sum(x == 2 for x in lengths) / n - float(p[3])) < 0.02
    # greedy: the matching prefix plus the model's next token
    assert accept(torch.eye(5)[[1, 2, 4]], [1, 3], SamplingParams(temperature=0), None) == [1, 2]


def test_sampled_requests_are_reproducible_with_a_seed(llama: Checkpoint) -> None:
    prompts = _prompts(llama.tokenizer)
    params = SamplingParams(max_tokens=16, temperature=0.8, top_k=20, seed=7, ignore_eos=True)
    a = _run(LLM(llama, speculative="ngram"), prompts, params)
    b = _run(LLM(llama, speculative="ngram"), prompts[::-1], params)[::-1]
    assert a == b and all(len(x) == 16 for x in a)


def test_proposer_looks_up_the_longest_earlier_ngram() -> None:
    prop = NgramProposer(k=3, ngram_max=2, ngram_min=1)
    seq = Sequence([1, 2, 3, 4, 5, 9, 2, 3], SamplingParams())
    assert prop.propose(seq, 10) == [4, 5, 9]  # "2 3" occurred at 1..2
    seq.token_ids.append(7)
    assert prop.propose(seq, 10) == []  # 7 never occurred before
    seq.token_ids.append(5)
    assert prop.propose(seq, 10) == [9, 2, 3]  # only "5" matches (its first occurrence)
    assert prop.propose(seq, 1) == [9]
    assert prop.propose(seq, 0) == []


def test_bad_options_get_clear_errors(llama: Checkpoint) -> None:
    with pytest.raises(UserError, match="speculative method"):
        LLM(llama, speculative="eagle")
    with pytest.raises(UserError, match="num_speculative_tokens"):
        LLM(llama, speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(UserError, match="ngram_min"):
        LLM(llama, speculative="ngram", ngram_max=1, ngram_min=2)
    with pytest.raises(UserError, match="KV cache"):
        LLM(llama, speculative="ngram", kv_cache=False)


def test_generate_cli_takes_the_flag(tiny_llama_dir: Path) -> None:
    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlsyskit.cli", "generate", "--model", str(tiny_llama_dir),
                               "--prompt", "Speak, speak. Speak, speak. Speak,", "--max-tokens", "12",
                               "--temperature", "0", "--threads", "1", *extra], capture_output=True, text=True, timeout=300)

    plain, spec = run(), run("--speculative", "ngram", "--num-speculative-tokens", "3")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout and plain.stdout.strip()
    bad = run("--speculative", "ngram", "--num-speculative-tokens", "0")
    assert bad.returncode != 0 and "num_speculative_tokens" in bad.stderr and "Traceback" not in bad.stderr
