"""The engine end to end on real (tiny and SmolLM2) checkpoints: every optimization leaves the
greedy output unchanged, the block pool is accounted for, and the API behaves."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlsyskit.engine import LLM, Checkpoint, SamplingParams, load_checkpoint
from mlsyskit.errors import UserError

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SYSTEM = "You are a careful assistant who answers questions about Shakespeare's plays briefly. "
TEXTS = [
    "To be, or not to be",
    SYSTEM + "Who is Hamlet?",
    "A",
    SYSTEM + "Who wrote Macbeth, and when was it first performed?",
    "Now is the winter of our discontent made glorious summer by this sun of York",
    SYSTEM + "Name one comedy.",
]


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir"])
def ckpt(request: pytest.FixtureRequest) -> Checkpoint:
    return load_checkpoint(request.getfixturevalue(request.param))


def _ids(ckpt: Checkpoint) -> list[list[int]]:
    return [ckpt.tokenizer.encode(t) for t in TEXTS]


def _greedy(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


def _assert_pool_empty(llm: LLM) -> None:
    u = llm.engine.kv_usage()
    assert u["blocks_used"] == 0 and u["blocks_free"] == u["blocks_total"], u


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"batching": "static", "max_num_seqs": 4},
        {"max_num_batched_tokens": 7, "max_prefill_tokens": 7},  # chunked prefill: every prompt split into chunks
        {"max_num_batched_tokens": 7},  # small chunks while decoding, whole prompts when nothing decodes
        {"paged": False},
        {"prefix_caching": False},
        {"block_size": 4, "max_num_seqs": 2},
    ],
    ids=["continuous", "static", "chunked", "chunked-while-decoding", "unpaged", "no-prefix-cache", "small-blocks"],
)
def test_greedy_output_is_the_same_in_every_mode(ckpt: Checkpoint, variant: dict) -> None:
    prompts = _ids(ckpt)
    reference = _greedy(LLM(ckpt, kv_cache=False), prompts)
    assert all(len(r) == GREEDY.max_tokens for r in reference)
    llm = LLM(ckpt, **variant)
    assert _greedy(llm, prompts) == reference
    # one at a time (no batching) too, and a second pass that hits the prefix cache
    assert [_greedy(llm, [p])[0] for p in prompts] == reference
    _assert_pool_empty(llm)


def test_preemption_under_a_tiny_pool_completes_every_request(ckpt: Checkpoint) -> None:
    prompts = _ids(ckpt)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    reference = _greedy(LLM(ckpt), prompts, params)
    # 12 blocks of 4 tokens: the largest request needs 10 of them, all six together far more
    llm = LLM(ckpt, block_size=4, num_kv_blocks=12, prefix_caching=False)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == reference
    assert llm.engine.scheduler.num_preemptions > 0
    assert sum(o.num_preemptions for o in outs) == llm.engine.scheduler.num_preemptions
    _assert_pool_empty(llm)


def test_prefix_blocks_are_shared_and_reused(ckpt: Checkpoint) -> None:
    tok = ckpt.tokenizer
    a, b = tok.encode(SYSTEM + "Who is Hamlet?"), tok.encode(SYSTEM + "Name one comedy.")
    shared_tokens = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    llm = LLM(ckpt, block_size=4)
    eng = llm.engine
    eng.add_request(a, GREEDY, request_id="a")
    eng.step()  # a's prompt is computed and its full blocks registered
    eng.add_request(b, GREEDY, request_id="b")
    eng.step()
    usage = eng.kv_usage()
    assert usage["blocks_shared"] == shared_tokens // 4  # b reads a's blocks while a runs
    outs = {}
    while eng.has_unfinished():
        outs.update({o.request_id: o for o in eng.step() if o.finished})
    assert outs["b"].num_prefix_cached_tokens == (shared_tokens // 4) * 4
    _assert_pool_empty(llm)
    # after both finished, the cached blocks still serve a third request
    again = llm.generate([b], GREEDY)[0]
    assert again.num_prefix_cached_tokens == ((len(b) - 1) // 4) * 4
    assert again.token_ids == outs["b"].token_ids


def test_pool_accounting_shows_the_waste_of_unpaged_storage(ckpt: Checkpoint) -> None:
    prompts = _ids(ckpt)[:3]
    fill = {}
    for paged in (True, False):
        llm = LLM(ckpt, paged=paged, block_size=4, max_model_len=60)
        eng = llm.engine
        for p in prompts:
            eng.add_request(p, GREEDY)
        eng.step()
        u = eng.kv_usage()
        assert u["tokens_stored"] == sum(len(p) for p in prompts)
        fill[paged] = u["fill_ratio"]
        while eng.has_unfinished():
            eng.step()
        _assert_pool_empty(llm)
    assert fill[True] > 0.5 > fill[False]


def test_streaming_deltas_add_up_and_abort_frees_blocks(ckpt: Checkpoint) -> None:
    llm = LLM(ckpt)
    prompt = _ids(ckpt)[1]
    final = llm.generate([prompt], GREEDY)[0]
    deltas = list(llm.stream(prompt, GREEDY))
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert "".join(d.delta for d in deltas) == final.text
    for _out in llm.stream(prompt, GREEDY):
        assert llm.engine.kv_usage()["blocks_used"] > 0
        break  # the client goes away: the request is aborted at once
    _assert_pool_empty(llm)
    assert not llm.engine.has_unfinished()


def test_stop_strings_end_the_text_before_the_stop(ckpt: Checkpoint) -> None:
    llm = LLM(ckpt)
    prompt = _ids(ckpt)[0]
    full = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop
    out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    streamed = "".join(d.delta for d in llm.stream(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])))
    assert streamed == out.text


def test_seeded_sampling_is_reproducible_whatever_the_batch(ckpt: Checkpoint) -> None:
    llm = LLM(ckpt)
    prompts = _ids(ckpt)
    p = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, top_p=0.95, seed=7, ignore_eos=True)
    alone = llm.generate([prompts[0]], p)[0].token_ids
    batched = llm.generate(prompts, [p] + [SamplingParams(max_tokens=10, temperature=1.0, seed=i) for i in range(5)])
    assert batched[0].token_ids == alone
    other = llm.generate([prompts[0]], SamplingParams(max_tokens=10, temperature=1.0, top_k=50, top_p=0.95, seed=8, ignore_eos=True))[0]
    assert other.token_ids != alone


def test_bad_requests_get_clear_errors(tiny_gpt2_dir: Path) -> None:
    llm = LLM(tiny_gpt2_dir)
    with pytest.raises(UserError, match="the prompt has 70 tokens but the context holds 64"):
        llm.generate([[5] * 70])
    with pytest.raises(UserError, match="prompt is empty"):
        llm.generate([""])
    with pytest.raises(UserError, match="outside the vocabulary"):
        llm.generate([[10**6]])
    with pytest.raises(UserError, match="KV blocks"):
        LLM(tiny_gpt2_dir, num_kv_blocks=1, block_size=4).generate([[5] * 10])
    with pytest.raises(UserError, match="unknown batching"):
        LLM(tiny_gpt2_dir, batching="dynamic")
    assert not llm.engine.has_unfinished()
    # a request that reaches the end of the context stops there with "length"
    out = llm.generate([[5] * 60], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4


def test_smollm2_chat_answers_and_stops_at_end_of_turn(smollm2_checkpoint: Checkpoint) -> None:
    llm = LLM(smollm2_checkpoint)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=30, temperature=0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # <|im_end|>, not the token limit
    assert "<|im_end|>" not in out.text
