"""The three correctness guarantees of `mlsyskit train`: DDP on 2 processes (a real torchrun
launch) == 1 process, accumulation over K micro-batches == one K-times-larger batch, resume ==
an uninterrupted run (also across world sizes)."""

import json

import pytest

from mlsyskit.train import TrainConfig, resume, train

# ffn: Linear-BatchNorm-ReLU x2 (SyncBatchNorm under DDP) on 1,024 synthetic samples
FFN = dict(dataset="synthetic", model="ffn", hidden="64,64", train_limit=1024, test_limit=512,
           batch_size=64, lr=0.05, epochs=1)
# McMahan's 784-64-10 MLP on real MNIST digits (no BatchNorm: micro-batches change nothing)
MLP = dict(dataset="mnist-5k", model="mlp", train_limit=768, test_limit=500, batch_size=128,
           lr=0.1, epochs=2)


def _argv(kw: dict) -> list[str]:
    return [x for k, v in kw.items() for x in ("--" + k.replace("_", "-"), str(v))]


def test_ddp_two_processes_equals_one_process_then_resumes_on_one(tmp_path, torchrun, compare):
    """One torchrun launch of 2 ranks: global batch 64 as 2 ranks x 2 micro-batches of 16
    (no_sync on the first; BatchNorm statistics synchronised over the 32 samples of each
    micro-step) == one process with batch 64 in 2 micro-batches of 32: the same epoch-1 metrics
    (distributed evaluation) and weights within 1e-5 when it stops mid-epoch 2 (--max-steps 21);
    resumed on ONE process it ends on the uninterrupted single-process run."""
    kw = dict(FFN, grad_accum=2, epochs=2)
    whole = train(TrainConfig(**kw, out=str(tmp_path / "whole")))
    train(TrainConfig(**kw, max_steps=21, out=str(tmp_path / "one")))
    two = torchrun([*_argv(kw), "--max-steps", "21", "--out", str(tmp_path / "two")])
    assert two["world_size"] == 2 and two["steps"] == 21 and two["epochs_run"] == 1 and not two["complete"]
    assert compare.max_diff(tmp_path / "one", tmp_path / "two") < 1e-5
    (r1,), (r2,) = compare.rows(tmp_path / "one"), compare.rows(tmp_path / "two")
    assert r1["test_accuracy"] == r2["test_accuracy"] and r1["step"] == r2["step"] == 16
    for key in ("train_loss", "test_loss"):
        assert abs(r1[key] - r2[key]) < 1e-5
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["world_size"] == 2 and config["backend"] == "gloo" and config["sync_bn"] is True
    assert config["micro_batch_per_rank"] == 16
    # rank 0 alone wrote the run directory
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "checkpoint.safetensors", "config.json", "metrics.jsonl", "model.safetensors", "summary.json"]
    done = resume(tmp_path / "two", {})
    assert done["complete"] and done["steps"] == whole["steps"] == 32 and done["world_size"] == 1
    assert compare.max_diff(tmp_path / "whole", tmp_path / "two") < 1e-5
    for a, b in zip(compare.rows(tmp_path / "whole"), compare.rows(tmp_path / "two"), strict=True):
        assert a["test_accuracy"] == b["test_accuracy"] and a["epoch"] == b["epoch"]
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and abs(a["test_loss"] - b["test_loss"]) < 1e-5
    assert whole["final_accuracy"] > 0.8  # 4 classes: chance is 0.25


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_big_batch(tmp_path, compare, k):
    """K micro-batches of 128/K == one batch of 128 (one process): same weights within 1e-5."""
    kw = {**MLP, "epochs": 1}
    train(TrainConfig(**kw, out=str(tmp_path / "big")))
    train(TrainConfig(**kw, grad_accum=k, out=str(tmp_path / "acc")))
    assert compare.max_diff(tmp_path / "big", tmp_path / "acc") < 1e-5
    # and the test is sensitive: a different batch order gives different weights
    train(TrainConfig(**kw, seed=1, out=str(tmp_path / "other")))
    assert compare.max_diff(tmp_path / "big", tmp_path / "other") > 1e-3


def test_resume_equals_uninterrupted_bitwise(tmp_path, compare):
    """fp16 autocast with a GradScaler, Adam, BatchNorm: stopped mid-epoch 1 (after a
    --checkpoint-every checkpoint), resumed, stopped in epoch 2, resumed: bit-identical to an
    uninterrupted run (model, optimizer, scaler, sampler position and running loss restored)."""
    kw = dict(FFN, precision="fp16", optimizer="adam", lr=0.01, epochs=2, checkpoint_every=5)
    whole = train(TrainConfig(**kw, out=str(tmp_path / "whole")))
    out = tmp_path / "cut"
    assert train(TrainConfig(**kw, max_steps=7, out=str(out)))["complete"] is False
    assert resume(out, {"max_steps": 20})["steps"] == 20
    done = resume(out, {})  # no --max-steps: to the end
    assert done["complete"] and done["steps"] == whole["steps"] == 32
    assert compare.models_equal(tmp_path / "whole", out)
    assert compare.rows(tmp_path / "whole") == compare.rows(out)
    config = json.loads((out / "config.json").read_text())
    assert [r["at_step"] for r in config["resumed"]] == [7, 20]
