"""The configuration of one training run: every flag of `mlsyskit train` but the launch ones.

Each field's metadata holds its flag help, so `--help` is generated from this one place.
Imports nothing heavy: `mlsyskit train --help` reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlsyskit.errors import UserError

DATASETS = ("mnist-5k", "mnist", "shakespeare", "stl10", "synthetic")
IMAGE_MODELS = ("2nn", "cnn", "mlp", "logreg")  # mlsyskit.models, 28x28x1 inputs only
CHAR_MODELS = ("transformer", "lstm")
OWN_MODELS = ("stl10-cnn", "ffn")  # mlsyskit.train.models, any image or feature shape
MODELS = OWN_MODELS + IMAGE_MODELS + CHAR_MODELS
OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_MODEL = {"stl10": "stl10-cnn", "synthetic": "ffn", "shakespeare": "transformer"}  # else cnn

# What --resume may change; everything else must match the run being continued (it would
# change the trajectory). World size may change: the global batches do not depend on it.
RESUMABLE = ("epochs", "max_steps", "threads", "checkpoint_every", "profile", "profile_steps",
             "target_accuracy", "backend", "device")


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    model: str | None = _f(None, "model: stl10-cnn (conv-BN-ReLU x3, any image size), ffn (Linear-BatchNorm-ReLU, any input), 2nn, cnn, mlp, logreg (MNIST, mlsyskit.models), transformer, lstm (shakespeare); default stl10-cnn for stl10, ffn for synthetic, transformer for shakespeare, else cnn")
    dataset: str = _f("mnist-5k", "data set: mnist-5k, mnist, shakespeare, stl10 (DATA_DIR/stl10_binary/*.bin), synthetic (Gaussian classes, 32 features, 4 classes)")
    data_dir: str | None = _f(None, "folder with the data files (default: $MLSYSKIT_DATA_DIR, then the cache)")
    epochs: int = _f(1, "epochs (passes over the training set)")
    batch_size: int = _f(64, "GLOBAL batch per optimizer step, split over ranks and --grad-accum micro-batches (must divide by world size x grad-accum); the last incomplete batch of an epoch is dropped")
    lr: float = _f(0.05, "learning rate")
    optimizer: str = _f("sgd", "optimizer: sgd (momentum --momentum) or adam")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(0.0, "weight decay (L2 for sgd, Adam's for adam)")
    seed: int = _f(0, "random seed: the initial weights and the per-epoch shuffling (same on every rank)")
    grad_accum: int = _f(1, "micro-batches per optimizer step; under DDP the first K-1 skip the gradient all-reduce (no_sync)")
    precision: str = _f("fp32", "fp32, bf16 (autocast) or fp16 (autocast and a GradScaler)")
    backend: str = _f("auto", "process-group back end under torchrun: auto (nccl on GPU, gloo on CPU), gloo, nccl")
    device: str = _f("auto", "auto (cuda:LOCAL_RANK when a GPU is visible), cpu, cuda")
    threads: int | None = _f(None, "torch CPU threads per process (default: torch's choice; torchrun sets OMP_NUM_THREADS=1)")
    eval_batch_size: int = _f(500, "evaluation batch per rank")
    train_limit: int | None = _f(None, "use a fixed random subset of N training samples (the same for every --seed)")
    test_limit: int | None = _f(None, "evaluate on a fixed random subset of N test samples")
    seq_len: int = _f(80, "characters per example (shakespeare)")
    hidden: str = _f("256,256", "hidden widths of the ffn model, comma-separated")
    sync_bn: bool = _f(True, "BatchNorm statistics over the global batch under DDP (SyncBatchNorm; --no-sync-bn: per rank)")
    max_steps: int | None = _f(None, "stop after this many optimizer steps in total (a checkpoint is written; --resume continues)")
    checkpoint_every: int = _f(0, "also checkpoint every this many optimizer steps (0: at the end of each epoch only)")
    target_accuracy: float | None = _f(None, "record the training time until the test accuracy first reaches this, in (0, 1]")
    profile: bool = _f(False, "profile optimizer steps 2..1+PROFILE_STEPS with torch.profiler and write trace_rank<R>.json (Chrome trace) in the run directory")
    profile_steps: int = _f(3, "optimizer steps in the --profile trace")
    out: str | None = _f(None, "run directory (default runs/train-<dataset>-<model>-<time>)")

    def resolved(self) -> TrainConfig:
        """Fill the dataset-dependent defaults and check every value."""
        cfg = dataclasses.replace(self, model=self.model or DEFAULT_MODEL.get(self.dataset, "cnn"))
        cfg.validate()
        return cfg

    def hidden_sizes(self) -> tuple[int, ...]:
        try:
            sizes = tuple(int(s) for s in self.hidden.split(",") if s.strip())
        except ValueError:
            raise UserError(f"--hidden {self.hidden!r}: give comma-separated positive integers, e.g. 256,256") from None
        if not sizes or min(sizes) < 1:
            raise UserError(f"--hidden {self.hidden!r}: give comma-separated positive integers, e.g. 256,256")
        return sizes

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        need(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; use one of {', '.join(DATASETS)}")
        need(self.model in MODELS, f"unknown model {self.model!r}; use one of {', '.join(MODELS)}")
        char = self.dataset == "shakespeare"
        if char:
            need(self.model in CHAR_MODELS, f"model {self.model!r} does not read text; use {' or '.join(CHAR_MODELS)} with shakespeare")
        else:
            need(self.model not in CHAR_MODELS, f"model {self.model!r} reads characters; use it with --dataset shakespeare")
        if self.model in IMAGE_MODELS:
            need(self.dataset in ("mnist", "mnist-5k"), f"model {self.model!r} takes 28x28 grayscale digits; use it with mnist or mnist-5k (stl10-cnn and ffn take any images)")
        need(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}")
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.momentum >= 0, f"--momentum must be >= 0, got {self.momentum}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; use sgd or adam")
        need(self.precision in PRECISIONS, f"unknown precision {self.precision!r}; use fp32, bf16 or fp16")
        need(self.backend in BACKENDS, f"unknown backend {self.backend!r}; use auto, gloo or nccl")
        need(self.device in DEVICES, f"unknown device {self.device!r}; use auto, cpu or cuda")
        need(self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}")
        need(self.eval_batch_size >= 1, f"--eval-batch-size must be at least 1, got {self.eval_batch_size}")
        for name in ("train_limit", "test_limit"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"--{name.replace('_', '-')} must be at least 1, got {v}")
        need(self.seq_len >= 2, f"--seq-len must be at least 2, got {self.seq_len}")
        need(self.profile_steps >= 1, f"--profile-steps must be at least 1, got {self.profile_steps}")
        need(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}")
        need(self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        need(self.target_accuracy is None or 0 < self.target_accuracy <= 1, f"--target-accuracy must be in (0, 1], got {self.target_accuracy}")
        if self.model == "ffn":
            self.hidden_sizes()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fields_help() -> list[dataclasses.Field]:
    """The fields of TrainConfig, in flag order."""
    return list(dataclasses.fields(TrainConfig))
