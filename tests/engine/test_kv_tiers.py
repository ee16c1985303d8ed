"""KV tiers under the block pool: swap instead of recompute, prefix blocks reused from host
memory and from disk (across a restart), files that are not ours ignored, every block and slot
given back, and the flags' errors. Greedy output must not change in any of these."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mlsyskit.engine import LLM, Checkpoint, SamplingParams, load_checkpoint
from mlsyskit.engine.kv_cost import SwapPolicy
from mlsyskit.engine.kv_tiers import MAGIC, SUFFIX
from mlsyskit.errors import UserError

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
SYSTEM = "You are a careful assistant who answers questions about Shakespeare's plays briefly. "
TEXTS = [SYSTEM + q for q in ("Who is Hamlet?", "Who wrote Macbeth, and when?", "Name one comedy.", "Who is Puck?")]
TINY = {"block_size": 4, "num_kv_blocks": 14}  # four requests together need far more


@pytest.fixture(scope="module")
def ckpt(tiny_llama_dir: Path) -> Checkpoint:
    return load_checkpoint(tiny_llama_dir)


def _ids(ckpt: Checkpoint) -> list[list[int]]:
    return [ckpt.tokenizer.encode(t) for t in TEXTS]


def _greedy(llm: LLM, prompts: list, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


def _assert_all_back(llm: LLM) -> None:
    u = llm.engine.kv_usage()
    assert u["blocks_used"] == 0 and u["blocks_free"] == u["blocks_total"], u
    assert u.get("tier_cpu_blocks_swapped", 0) == 0, u
    tiers = llm.engine.kv_tiers
    if tiers is not None:
        assert len(tiers.host.free) + len(tiers.host.cached) == tiers.host.n_slots


@pytest.fixture(scope="module")
def reference(ckpt: Checkpoint) -> list[list[int]]:
    return _greedy(LLM(ckpt, kv_cache=False), _ids(ckpt))


@pytest.mark.parametrize("preemption", ["swap", "recompute", "auto"])
def test_greedy_output_is_the_same_with_swap_and_recompute(ckpt: Checkpoint, reference: list, preemption: str) -> None:
    llm = LLM(ckpt, **TINY, kv_offload="cpu", preemption=preemption, prefix_caching=False)
    assert _greedy(llm, _ids(ckpt)) == reference
    u = llm.engine.kv_usage()
    assert u["preemptions"] > 0
    if preemption == "recompute":
        assert u["preemptions_swapped"] == 0 and u["tier_blocks_swapped_out"] == 0
    else:  # on a CPU a copy is far cheaper than a prefill: auto swaps too
        assert u["preemptions_swapped"] == u["preemptions"]
        assert u["tier_blocks_swapped_in"] == u["tier_blocks_swapped_out"] > 0
        assert u["tier_bytes_pool_to_cpu"] == u["tier_bytes_cpu_to_pool"] > 0
    _assert_all_back(llm)


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_conversations_second_turn_hits_the_tier_after_eviction(ckpt: Checkpoint, prefetch: bool) -> None:
    a, *others = _ids(ckpt)
    turn1 = _greedy(LLM(ckpt, kv_cache=False), [a])[0]
    turn2 = a + turn1 + ckpt.tokenizer.encode(" And Ophelia?")
    expected = _greedy(LLM(ckpt, kv_cache=False), [turn2])[0]
    llm = LLM(ckpt, **TINY, kv_offload="cpu", kv_prefetch=prefetch)
    assert _greedy(llm, [a])[0] == turn1
    for p in others:  # other conversations take every pool block: turn 1's blocks are evicted
        _greedy(llm, [[7, 8, 9] + p[::-1]])
    pool_hit = llm.engine.block_manager.prefix_hits
    assert _greedy(llm, [turn2])[0] == expected
    u = llm.engine.kv_usage()
    full_blocks = (len(a) + len(turn1) - 1) // 4  # the KV turn 1 left: prompt + reply, full blocks only
    assert u["tier_hit_tokens"] >= 4 * (full_blocks - 2), u  # nearly all of it came back from the tier
    assert u["tier_cpu_hits"] > 0 and u["tier_bytes_cpu_to_pool"] > 0 and u["tier_copy_s"] > 0
    # the loads were copied on the worker thread during the step, or (prefetch off) before it
    assert u["tier_loads_overlapped" if prefetch else "tier_loads_sync"] >= u["tier_cpu_hits"], u
    assert u["tier_loads_sync" if prefetch else "tier_loads_overlapped"] == 0, u
    if not prefetch:  # every copy ran on the engine's thread
        assert u["tier_copy_wait_s"] >= u["tier_load_wait_s"] >= u["tier_copy_s"] > 0
    assert llm.engine.block_manager.prefix_hits - pool_hit >= u["tier_hit_tokens"]
    # without the tier the same run recomputes turn 1: no hit survives the other conversations
    plain = LLM(ckpt, **TINY)
    _greedy(plain, [a])
    for p in others:
        _greedy(plain, [[7, 8, 9] + p[::-1]])
    before = plain.engine.block_manager.prefix_hits
    assert _greedy(plain, [turn2])[0] == expected
    assert plain.engine.block_manager.prefix_hits - before < u["tier_hit_tokens"]
    _assert_all_back(llm)


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_greedy_output_is_the_same_with_loads_copied_before_the_step(ckpt: Checkpoint, reference: list, offload: str,
                                                                     tmp_path: Path) -> None:
    """The naive switch (kv_prefetch=False) and the overlapped copy give the same tokens, with
    swaps and tier hits (two rounds: the second finds the first's prefixes in a tier)."""
    outs = {}
    for prefetch in (True, False):
        kw = {"kv_offload_dir": tmp_path / str(prefetch)} if offload == "disk" else {}
        llm = LLM(ckpt, **TINY, kv_offload=offload, preemption="swap", kv_prefetch=prefetch, **kw)
        outs[prefetch] = [_greedy(llm, _ids(ckpt)), _greedy(llm, [[7] + p for p in _ids(ckpt)]), _greedy(llm, _ids(ckpt))]
        u = llm.engine.kv_usage()
        assert u["tier_blocks_swapped_in"] > 0 and u["tier_cpu_hits"] + u.get("tier_disk_hits", 0) > 0, u
        _assert_all_back(llm)
    assert outs[True][0] == outs[True][2] == reference
    assert outs[True] == outs[False]


def test_staged_loads_arrive_layer_by_layer_and_before_reuse(ckpt: Checkpoint) -> None:
    """KVTiers alone: a staged load is in the pool once wait_layer/complete say so, its host
    slot goes back to the cache, and a block about to be reused gets its copy first."""
    import torch

    from mlsyskit.engine.kv_tiers import KVTiers, chain_key, root_key

    k = torch.randn(3, 6, 4, 2, 8)
    v = torch.randn(3, 6, 4, 2, 8)
    tiers = KVTiers(k, v, host_bytes=4 * 2 * k[:, 0].nbytes, identity="x", block_size=4)
    toks = (1, 2, 3, 4)
    key = chain_key(root_key("x"), toks)
    want_k, want_v = k[:, 0].clone(), v[:, 0].clone()
    tiers.save(0, key, toks)  # block 0's KV kept in the host tier
    assert tiers.load(5, key, toks) == "cpu"
    assert key not in tiers.host.cached  # held while staged: an eviction cannot take its slot
    tiers.start()
    for layer in range(3):
        tiers.wait_layer(layer)
        assert torch.equal(k[layer, 5], want_k[layer]) and torch.equal(v[layer, 5], want_v[layer])
    tiers.complete()
    assert key in tiers.host.cached and not tiers.staged and tiers.usage()["loads_overlapped"] == 1
    k[:, 4] = 0
    assert tiers.load(4, key, toks) == "cpu"
    assert tiers.pending(torch.tensor([[4, 1]])) and not tiers.pending(torch.tensor([[2, 3]]))
    tiers.settle([3])  # another block: nothing copied yet
    assert tiers.staged and not torch.equal(k[:, 4], want_k)
    tiers.settle([4])  # block 4 is about to be read or reused: its copy is done first
    assert not tiers.staged and torch.equal(k[:, 4], want_k) and torch.equal(v[:, 4], want_v)
    tiers.close()


def test_tier_prefix_off_keeps_only_swapped_blocks(ckpt: Checkpoint, reference: list) -> None:
    llm = LLM(ckpt, **TINY, kv_offload="cpu", preemption="swap", kv_tier_prefix=False)
    assert _greedy(llm, _ids(ckpt)) == reference
    assert _greedy(llm, _ids(ckpt)) == reference
    u = llm.engine.kv_usage()
    assert u["tier_cpu_blocks_cached"] == 0 and u["tier_cpu_hits"] == 0 and u["preemptions_swapped"] > 0


def _disk_llm(ckpt: Checkpoint, d: Path) -> LLM:
    return LLM(ckpt, **TINY, kv_offload="disk", kv_offload_dir=d)


def test_disk_tier_is_reused_after_a_restart_and_bad_files_are_ignored(
    ckpt: Checkpoint, tmp_path: Path, tiny_qwen2_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = _ids(ckpt)[0]
    turn2 = a + ckpt.tokenizer.encode(" And who is Ophelia, his love?")
    expected = _greedy(LLM(ckpt, kv_cache=False), [turn2])[0]
    first = _disk_llm(ckpt, tmp_path)
    _greedy(first, [a])
    first.close()  # the pool's cached blocks go to disk too
    files = sorted(tmp_path.glob(f"*{SUFFIX}"))
    assert len(files) >= len(a) // 4
    assert first.engine.kv_usage()["tier_bytes_to_disk"] > 0

    # a restarted engine (a fresh LLM on the same directory) loads the prefix from disk
    second = _disk_llm(ckpt, tmp_path)
    assert _greedy(second, [turn2])[0] == expected
    u = second.engine.kv_usage()
    assert u["tier_disk_hits"] >= len(a) // 4 - 1 and u["tier_disk_hit_rate"] > 0.5, u
    assert u["tier_bytes_disk_to_pool"] > 0 and u["tier_disk_files_rejected"] == 0
    _assert_all_back(second)

    # corrupt one block's payload, give another a foreign model identity, add junk
    payload = bytearray(files[1].read_bytes())
    payload[-1] ^= 0xFF
    files[1].write_bytes(bytes(payload))
    raw = files[2].read_bytes()
    n = struct.unpack("<I", raw[8:12])[0]
    meta = json.loads(raw[12 : 12 + n])
    meta["model"] = "0" * 64
    new = json.dumps(meta).encode().ljust(n)  # same length: the payload stays where it was
    files[2].write_bytes(raw[:8] + struct.pack("<I", n) + new + raw[12 + n :])
    (tmp_path / ("ab" * 32 + SUFFIX)).write_bytes(MAGIC + b"\xff\xff")
    caplog.set_level(logging.WARNING, logger="mlsyskit.engine.kv_tiers")
    third = _disk_llm(ckpt, tmp_path)  # the foreign and junk files are dropped from the index
    assert third.engine.kv_usage()["tier_disk_files_rejected"] == 2
    assert _greedy(third, [turn2])[0] == expected  # the corrupt block is recomputed, never loaded
    u = third.engine.kv_usage()
    assert u["tier_disk_files_rejected"] == 3 and u["tier_disk_hits"] == 1, u  # the chain breaks at block 1
    text = caplog.text
    assert "another model identity" in text and "checksum mismatch" in text and "unreadable header" in text

    # another model on the same directory: every file is foreign, nothing is loaded
    other = LLM(load_checkpoint(tiny_qwen2_dir), **TINY, kv_offload="disk", kv_offload_dir=tmp_path)
    assert other.engine.kv_usage()["tier_disk_blocks"] == 0


def test_disk_tier_survives_a_process_restart(ckpt: Checkpoint, tiny_llama_dir: Path, tmp_path: Path) -> None:
    a = _ids(ckpt)[1]
    first = _disk_llm(ckpt, tmp_path / "kv")
    expected = _greedy(first, [a])
    first.close()
    code = (
        "import json, sys; from mlsyskit.engine import LLM, SamplingParams\n"
        "llm = LLM(sys.argv[1], block_size=4, num_kv_blocks=14, kv_offload='disk', kv_offload_dir=sys.argv[2])\n"
        "o = llm.generate([json.loads(sys.argv[3])], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))\n"
        "print(json.dumps({'ids': o[0].token_ids, 'hits': llm.engine.kv_usage()['tier_disk_hits']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny_llama_dir), str(tmp_path / "kv"), json.dumps(a)],
                         capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ids"] == expected[0] and got["hits"] >= len(a) // 4 - 1


def test_every_block_and_slot_is_back_after_abort(ckpt: Checkpoint) -> None:
    llm = LLM(ckpt, **TINY, kv_offload="cpu", preemption="swap")
    eng = llm.engine
    rids = [eng.add_request(p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)) for p in _ids(ckpt)]
    while eng.kv_usage()["preemptions_swapped"] == 0 or eng.kv_usage()["tier_cpu_blocks_swapped"] == 0:
        assert eng.has_unfinished()
        eng.step()
    for r in rids:  # one of them is swapped out, waiting: its host slots must come back too
        eng.abort(r)
    assert not eng.has_unfinished()
    _assert_all_back(llm)


def test_native_quantized_weights_tier_hits_match_pool_hits(tiny_llama_q_gguf: Path) -> None:
    """Native Q4/Q8 blocks and a float16 KV pool: a prefix loaded from the tier gives what the
    same prefix found in the pool gives (the same bytes of KV)."""
    big = LLM(tiny_llama_q_gguf, block_size=4)
    assert big.engine.kv_dtype.is_floating_point and big.engine.kv_cache.k.dtype.itemsize == 2
    ids = _ids(big.checkpoint)
    turn2 = ids[0] + big.tokenizer.encode(" And who is Ophelia?")
    _greedy(big, [ids[0]])
    expected = _greedy(big, [turn2])[0]  # prefix from the pool
    small = LLM(tiny_llama_q_gguf, **TINY, kv_offload="cpu")
    _greedy(small, [ids[0]])
    for p in ids[1:]:
        _greedy(small, [[7, 8, 9] + p[::-1]])
    assert _greedy(small, [turn2])[0] == expected
    assert small.engine.kv_usage()["tier_hit_tokens"] > 0
    _assert_all_back(small)


def test_smollm2_native_swap_completes_and_returns_every_block(smollm2_path: Path) -> None:
    llm = LLM(smollm2_path, num_kv_blocks=12, kv_offload="cpu", preemption="swap")
    prompts = [f"Count to {i}: one, two, three," for i in (5, 6, 7, 8)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert all(len(o.token_ids) == 40 for o in outs)
    assert llm.engine.kv_usage()["preemptions_swapped"] > 0
    _assert_all_back(llm)


def test_cost_model_prefers_the_cheaper_move() -> None:
    p = SwapPolicy("auto", bytes_per_token=1000.0, copy_bytes_per_s=1e6)  # 1000 tok/s each way
    assert p.prefer_swap(100)  # nothing timed yet: a copy is assumed cheaper
    p.observe_prefill(10_000, 1.0)  # prefill at 10k tok/s: 5x faster than swapping (2 copies)
    assert not p.prefer_swap(100) and p.recompute_seconds(100) < p.swap_seconds(100)
    assert SwapPolicy("swap", 1000.0, 1e6, 1e9).prefer_swap(100)
    assert not SwapPolicy("recompute", 1.0, 1e12).prefer_swap(100)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kv_offload": "gpu"}, "unknown kv_offload 'gpu'"),
        ({"preemption": "later"}, "unknown preemption 'later'"),
        ({"preemption": "swap"}, "needs a tier to swap to"),
        ({"kv_offload": "disk"}, "needs kv_offload_dir"),
        ({"kv_offload": "cpu", "kv_offload_gib": 0}, "kv_offload_gib must be positive"),
        ({"kv_offload": "cpu", "kv_disk_gib": -1}, "kv_disk_gib must be positive"),
        ({"kv_offload": "cpu", "kv_offload_dir": "x"}, "only used with kv_offload='disk'"),
        ({"kv_offload": "cpu", "kv_cache": False}, "needs the KV cache"),
    ],
)
def test_bad_tier_options_are_one_line_user_errors(ckpt: Checkpoint, kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as e:
        LLM(ckpt, **kwargs)
    assert "\n" not in str(e.value)


def test_disk_dir_that_is_a_file_is_a_user_error(ckpt: Checkpoint, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="cannot use kv_offload_dir"):
        LLM(ckpt, kv_offload="disk", kv_offload_dir=f / "sub")


def test_cli_flags(tmp_path: Path) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlsyskit", *argv], capture_output=True, text=True, timeout=120)

    bad = run("generate", "--prompt", "hi", "--kv-offload", "gpu")
    assert bad.returncode == 2 and "invalid choice: 'gpu'" in bad.stderr
    bad = run("generate", "--prompt", "hi", "--preemption", "swap", "--max-tokens", "2")
    assert bad.returncode != 0 and "needs a tier to swap to" in bad.stderr and "Traceback" not in bad.stderr
    plan = run("plan-memory", "--model", str(Path(__file__).parents[2] / "examples" / "llama-2-7b-config.json"),
               "--gpu-gib", "16", "--json")
    assert plan.returncode == 0, plan.stderr
    p = json.loads(plan.stdout)
    assert p["kv_bytes_per_token"] == 2 * 32 * 32 * 128 * 2  # 512 KiB: Llama-2-7B has no GQA
    assert 6.7e9 < p["params"] < 6.8e9
    assert p["tokens_fit"] == int(p["kv_budget_bytes"] // p["kv_bytes_per_token"]) and 4000 < p["tokens_fit"] < 6000
    bad = run("plan-memory", "--model", str(tmp_path / "none.json"), "--gpu-gib", "16")
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_serve_metrics_show_the_tiers(ckpt: Checkpoint) -> None:
    import asyncio

    from mlsyskit.engine import LLMEngine
    from mlsyskit.serve.metrics import ServerMetrics
    from mlsyskit.serve.service import EngineService

    engine = LLMEngine(ckpt, **TINY, kv_offload="cpu", preemption="swap")
    service = EngineService(engine, model_name="tiny")
    metrics = ServerMetrics(service)

    async def main() -> None:
        await service.start()
        try:
            await asyncio.gather(*(service.generate(p, GREEDY) for p in _ids(ckpt)))
        finally:
            await service.stop()

    asyncio.run(main())
    text = metrics.render()[0].decode()
    u = engine.kv_usage()
    assert u["tier_bytes_pool_to_cpu"] > 0
    assert f'mlsyskit_kv_tier_bytes_total{{direction="pool_to_cpu",model="tiny"}} {u["tier_bytes_pool_to_cpu"]}' in text
    assert 'mlsyskit_kv_tier_blocks{kind="swapped",model="tiny",tier="cpu"} 0.0' in text
    assert 'mlsyskit_kv_tier_hit_rate{model="tiny",tier="cpu"}' in text
    assert "mlsyskit_kv_tier_copy_wait_seconds_total" in text
    assert f'mlsyskit_kv_preemptions_swapped_total{{model="tiny"}} {float(u["preemptions_swapped"])}' in text
    assert u["preemptions_swapped"] > 0


def test_no_kv_prefetch_flag_reaches_the_engine_options() -> None:
    import argparse

    from mlsyskit.engine.cli import kv_tier_kwargs, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    on = parser.parse_args(["generate", "--prompt", "hi", "--kv-offload", "cpu"])
    off = parser.parse_args(["generate", "--prompt", "hi", "--kv-offload", "cpu", "--no-kv-prefetch"])
    assert kv_tier_kwargs(on)["kv_prefetch"] is True and kv_tier_kwargs(off)["kv_prefetch"] is False
