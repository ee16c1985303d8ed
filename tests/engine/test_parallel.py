"""Tensor and pipeline parallel inference: real worker processes (2 or 4 ranks, gloo over
127.0.0.1) against one process, on the tiny checkpoints of tests/conftest.py."""

from __future__ import annotations

import gc
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mlsyskit.engine.llm import LLM
from mlsyskit.engine.model_runner import StepRow
from mlsyskit.engine.parallel import Placement, WorkerError, micro_batches
from mlsyskit.engine.sampling import SamplingParams
from mlsyskit.errors import UserError
from mlsyskit.models.config import TransformerConfig
from mlsyskit.models.gguf_loader import BlockTensor, BlockWeight
from mlsyskit.quant.model_io import load_checkpoint

PROMPTS = [[1, 5, 9, 300, 42, 7], [1, 77, 88], [1, 2000, 3000, 4000, 17, 18, 19, 20, 21, 22]]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _run(llm: LLM) -> tuple[list[list[int]], dict[tuple[int, ...], torch.Tensor]]:
    """Greedy token ids of PROMPTS and the logits of every sampled position."""
    llm.engine.runner.logits_log = []
    outs = llm.generate(PROMPTS, GREEDY)
    logits = dict(llm.engine.runner.logits_log)
    llm.engine.runner.logits_log = None
    return [o.token_ids for o in outs], logits


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> tuple[list[list[int]], dict]:
    return _run(LLM(tiny_llama_dir, dtype="float32"))


@pytest.mark.parametrize("tp,pp,allreduce", [(2, 1, "shm"), (2, 1, "gloo"), (1, 2, "shm"), (2, 2, "shm")],
                         ids=["tp2", "tp2-gloo", "pp2", "tp2xpp2"])
def test_parallel_logits_equal_one_process(tiny_llama_dir: Path, reference, tp: int, pp: int, allreduce: str) -> None:
    want_ids, want = reference
    with LLM(tiny_llama_dir, dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp,
             parallel_allreduce=allreduce) as llm:
        assert (llm._parallel.shm is not None) == (tp > 1 and allreduce == "shm")
        cfg = llm.checkpoint.config
        kv = llm.engine.kv_cache
        # rank 0 holds only its shard: its layers and KV heads
        assert kv.k.shape[0] == cfg.n_layers // pp and kv.k.shape[3] == cfg.n_kv_heads // tp
        assert llm.engine.model.layers[0].attn.n_heads == cfg.n_heads // tp
        got_ids, got = _run(llm)
        stats = llm.engine.runner.group.stats
        procs = llm._parallel.procs
        assert len(procs) == tp * pp - 1
    assert got_ids == want_ids
    assert set(got) == set(want) and len(got) == len(PROMPTS) * GREEDY.max_tokens
    for k, row in want.items():
        torch.testing.assert_close(got[k], row, rtol=0, atol=1e-5)
    assert (stats.allreduce_calls > 0) == (tp > 1) and (stats.p2p_bytes > 0) == (pp > 1)
    assert all(p.exitcode == 0 for p in procs)  # close() stopped every worker


def test_native_quantized_tp_greedy_equals_one_process(tiny_llama_q_gguf: Path) -> None:
    one = LLM(tiny_llama_q_gguf)
    want, _ = _run(one)
    with LLM(tiny_llama_q_gguf, tensor_parallel_size=2) as llm:
        qkv = llm.engine.model.layers[0].attn.qkv
        assert type(qkv).__name__ == "BlockLinear"  # the file's blocks, split, not dequantized
        assert qkv.out_features == one.engine.model.layers[0].attn.qkv.out_features // 2
        got, _ = _run(llm)
    assert got == want


def test_pipeline_with_native_weights_keeps_fused_decode(tiny_llama_q_gguf: Path) -> None:
    want, _ = _run(LLM(tiny_llama_q_gguf))
    with LLM(tiny_llama_q_gguf, pipeline_parallel_size=2) as llm:
        assert llm.engine.runner.fused is not None
        got, _ = _run(llm)
    assert got == want


def test_killed_worker_gives_clear_error(tiny_llama_dir: Path) -> None:
    llm = LLM(tiny_llama_dir, dtype="float32", tensor_parallel_size=2)
    proc = llm._parallel.procs[0]
    os.kill(proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 .* exited with code -9"):
        llm.generate(PROMPTS, GREEDY)
    assert time.monotonic() - t0 < 10
    with pytest.raises(WorkerError, match="closed"):
        llm.generate(PROMPTS, GREEDY)
    llm.close()


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 1)], ids=["pp2", "tp2-shm"])
def test_worker_killed_mid_generation(tiny_llama_dir: Path, tp: int, pp: int) -> None:
    """Rank 0 is blocked in a socket receive (PP) or spinning on shared memory (TP) when its
    peer dies: either way one line within seconds."""
    llm = LLM(tiny_llama_dir, dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp)
    proc = llm._parallel.procs[0]
    stream = llm.stream(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    next(stream)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(5)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1"):
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 10


def test_garbage_collected_llm_leaves_no_workers(tiny_llama_dir: Path) -> None:
    llm = LLM(tiny_llama_dir, dtype="float32", pipeline_parallel_size=2)
    procs = llm._parallel.procs
    assert procs[0].is_alive()
    del llm
    gc.collect()
    assert all(p.exitcode is not None for p in procs)


def test_bad_splits_are_clear_errors(tiny_llama_dir: Path) -> None:
    with pytest.raises(UserError, match="exceeds the model's 2 KV heads"):
        LLM(tiny_llama_dir, dtype="float32", tensor_parallel_size=4)
    with pytest.raises(UserError, match="exceeds the model's 2 layers"):
        LLM(tiny_llama_dir, dtype="float32", pipeline_parallel_size=3)
    with pytest.raises(UserError, match="positive integer"):
        LLM(tiny_llama_dir, dtype="float32", tensor_parallel_size=0)
    with pytest.raises(UserError, match="quantization"):
        LLM(tiny_llama_dir, dtype="float32", tensor_parallel_size=2, quantization="int8")


def test_block_split_refused() -> None:
    """6 heads of 8 dims in 3 KV groups over 2 ranks: rank 1's attention output columns are
    32..48, and 48 falls inside a 32-value block."""
    cfg = TransformerConfig("llama", vocab_size=64, dim=48, n_layers=1, n_heads=6, n_kv_heads=3,
                            hidden_dim=64, max_seq_len=16, head_dim=8)
    w = BlockWeight((BlockTensor("Q8_0", np.zeros((48, 2 * 34), dtype=np.uint8)),), (48, 64))
    with pytest.raises(UserError, match="split a 32-value quantization block"):
        Placement(2, 1).check(cfg, {"layers.0.ffn.down.weight": w})
    Placement(2, 1).check(cfg, {"layers.0.ffn.down.weight": torch.zeros(48, 64)})  # float: any split


def test_shards_hold_only_their_part(tiny_llama_dir: Path) -> None:
    ckpt = load_checkpoint(tiny_llama_dir, dtype=torch.float32)
    cfg, sd = ckpt.config, ckpt.state_dict
    parts = [Placement(2, 2, r).shard(cfg, sd) for r in range(4)]
    for local, shard in parts:
        assert local.n_layers == 1 and local.n_heads == 2 and local.n_kv_heads == 1 and local.hidden_dim == 64
        assert shard["layers.0.attn.qkv.weight"].shape == (4 * 16, 64)
        assert shard["layers.0.ffn.down.weight"].shape == (64, 64)
        assert not any(k.startswith("layers.1.") for k in shard)
    # the two TP shards of a stage, put back together, are the original weight
    down = torch.cat([parts[2][1]["layers.0.ffn.down.weight"], parts[3][1]["layers.0.ffn.down.weight"]], dim=1)
    assert torch.equal(down, sd["layers.1.ffn.down.weight"])


def test_micro_batches_balance_tokens_and_put_decodes_first() -> None:
    rows = [StepRow([1] * n, 0, [0], True) for n in (1, 30, 1, 20, 12)]
    mbs = micro_batches(rows, 2)
    assert sorted(i for mb in mbs for i in mb) == list(range(5))
    loads = [sum(len(rows[i].tokens) for i in mb) for mb in mbs]
    assert max(loads) - min(loads) <= 12
    for mb in mbs:
        n = [len(rows[i].tokens) for i in mb]
        assert n == sorted(n, key=lambda k: k != 1)


TORCHRUN_SCRIPT = """
import os, sys
from mlsyskit.engine.llm import LLM
from mlsyskit.engine.sampling import SamplingParams
if __name__ == "__main__":
    llm = LLM(sys.argv[1], dtype="float32", tensor_parallel_size=1, pipeline_parallel_size=2)
    out = llm.generate([%r], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    print("RANK", os.environ["RANK"], out[0].token_ids, flush=True)
    llm.close()
"""


def test_torchrun_rank0_drives_others_serve(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT % (PROMPTS[0],))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(script), str(tiny_llama_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RANK")]
    want = LLM(tiny_llama_dir, dtype="float32").generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert lines == [f"RANK 0 {want[0].token_ids}"]  # rank 1 served and exited inside LLM(...)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_tensor_parallel_other_architectures(arch: str, request: pytest.FixtureRequest) -> None:
    """Qwen2's q/k/v biases and tied head, GPT-2's fused c_attn rows and row-parallel biases
    (added on one rank only)."""
    path = request.getfixturevalue(f"tiny_{arch}_dir")
    want_ids, want = _run(LLM(path, dtype="float32"))
    with LLM(path, dtype="float32", tensor_parallel_size=2) as llm:
        got_ids, got = _run(llm)
    assert got_ids == want_ids
    for k, row in want.items():
        torch.testing.assert_close(got[k], row, rtol=0, atol=1e-5)


def test_shared_sum_adds_and_notices_a_dead_or_hung_peer() -> None:
    import threading

    from mlsyskit.engine.parallel import SHM_CHUNK, SharedSum

    p = Placement(2, 1)
    slots, flags = SharedSum.allocate(p)
    ranks = [SharedSum(slots, flags, p.at(r), 30.0, lambda: None) for r in range(2)]
    x = [torch.randn(SHM_CHUNK + 5), torch.randn(SHM_CHUNK + 5)]  # two rounds: a chunk and a tail
    want = x[0] + x[1]
    got = [t.clone() for t in x]
    threads = [threading.Thread(target=ranks[r], args=(got[r],)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert torch.equal(got[0], want) and torch.equal(got[1], want)
    slots, flags = SharedSum.allocate(p)
    with pytest.raises(RuntimeError, match="rank 1 exited"):
        SharedSum(slots, flags, p, 30.0, lambda: "rank 1 exited")(torch.ones(8))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out"):
        SharedSum(slots, flags, p, 0.2, lambda: None)(torch.ones(8))
    assert time.monotonic() - t0 < 5
