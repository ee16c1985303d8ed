"""Data-parallel training on PyTorch's own machinery: DistributedDataParallel over a gloo or
nccl process group, DistributedSampler, autocast and GradScaler, torch.profiler.

One code path for one process and for every rank of a torchrun launch. A global batch of B
samples per optimizer step is split into world_size x grad_accum micro-batches; whatever the
world size and K, optimizer step i of an epoch sees samples perm[i*B:(i+1)*B] of that
epoch's permutation (DistributedSampler's, seeded by --seed and the epoch), so runs with
different world sizes or K follow the same trajectory up to float rounding (tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from mlsyskit.errors import UserError
from mlsyskit.runtime import keep_freed_memory
from mlsyskit.train import rundir
from mlsyskit.train.config import RESUMABLE, TrainConfig
from mlsyskit.train.data import TrainData, load_train_data
from mlsyskit.train.dist import DistContext, setup
from mlsyskit.train.models import build
from mlsyskit.train.syncbn import convert_sync_batchnorm

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _default_out(cfg: TrainConfig) -> str:
    return f"runs/train-{cfg.dataset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: TrainConfig, *, progress: bool = False) -> dict[str, Any]:
    """Run ``cfg`` from scratch (a new run directory; only rank 0 writes it); the summary."""
    cfg = cfg.resolved()
    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=_default_out(cfg))
    return _launch(cfg, resuming=False, progress=progress)


def resume(run_dir: str | Path, given: dict[str, Any], *, progress: bool = False) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its last checkpoint. ``given``: flags set on the
    command line; only those in RESUMABLE may differ from the run's config.json; --max-steps
    applies to this invocation only (without it the run continues to its last epoch)."""
    path = Path(run_dir)
    saved = rundir.read_json(path / rundir.CONFIG).get("config")
    if not isinstance(saved, dict):
        raise UserError(f"{path / rundir.CONFIG} has no 'config' section; is {path} a run of mlsyskit train?")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    changed = {}
    for key, value in given.items():
        if key == "out" or value is None or getattr(cfg, key) == value:
            continue
        if key not in RESUMABLE:
            raise UserError(
                f"--{key.replace('_', '-')} {value} differs from the run being resumed "
                f"({getattr(cfg, key)}); only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} may change"
            )
        changed[key] = value
    # --max-steps is a stop for one invocation: resumed without it, the run goes to the end
    changed["max_steps"] = given.get("max_steps")
    cfg = dataclasses.replace(cfg, **changed, out=str(path)).resolved()
    return _launch(cfg, resuming=True, progress=progress)


def _launch(cfg: TrainConfig, *, resuming: bool, progress: bool) -> dict[str, Any]:
    ctx = setup(cfg.backend, cfg.device)
    try:
        return _Run(cfg, ctx, resuming, progress).run()
    finally:
        ctx.close()


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on a GPU; the process's peak resident set (VmHWM)
    on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction)


class _Run:
    def __init__(self, cfg: TrainConfig, ctx: DistContext, resuming: bool, progress: bool) -> None:
        self.cfg, self.ctx, self.resuming = cfg, ctx, resuming
        self.progress = progress and ctx.is_root
        self.out = Path(cfg.out)
        self.device = ctx.device

    # -- setup -------------------------------------------------------------------------------
    def _prepare(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        keep_freed_memory()
        if cfg.precision == "fp16" and self.device.type == "cpu" and not hasattr(torch.amp, "GradScaler"):
            raise UserError("--precision fp16 on the CPU needs torch>=2.3 (torch.amp.GradScaler); use bf16")
        self.data: TrainData = load_train_data(cfg)
        world, k = ctx.world_size, cfg.grad_accum
        if cfg.batch_size % (world * k):
            raise UserError(
                f"--batch-size {cfg.batch_size} (global) must be a multiple of world size x --grad-accum "
                f"= {world} x {k} = {world * k}"
            )
        self.micro = cfg.batch_size // (world * k)
        n = len(self.data.train_y)
        self.steps_per_epoch = n // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set ({n} samples)")
        torch.manual_seed(cfg.seed)
        model = build(cfg, self.data.input_shape, self.data.num_classes)
        self.parameters = sum(p.numel() for p in model.parameters())
        self.has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if ctx.distributed and cfg.sync_bn and self.has_bn:
            model = convert_sync_batchnorm(model, self.device, ctx.bn_group)
        self.core = model.to(self.device)
        self.opt = _optimizer(cfg, self.core)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.pos = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "loss_partial": 0.0,
                    "train_s_partial": 0.0, "elapsed_s": 0.0}
        ck = rundir.load_checkpoint(self.out) if self.resuming else None
        if ck is not None:
            model_state, optim_state, meta = ck
            try:
                self.core.load_state_dict(model_state)
                self.opt.load_state_dict(optim_state)
            except (RuntimeError, ValueError, KeyError) as e:
                raise UserError(f"checkpoint in {self.out} does not fit this model ({e})") from None
            if meta.get("scaler"):
                self.scaler.load_state_dict(meta["scaler"])
            if meta.get("rng_torch") is not None:
                torch.set_rng_state(meta["rng_torch"])
            self.pos = {k: meta[k] for k in self.pos}
        if self.resuming:
            self.rows = self.ctx.root_then_share(self._truncate_metrics)
        else:
            self.rows = []
            self.ctx.root_then_share(self._new_run_dir)
        self.model: nn.Module = self.core
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.core, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.sampler = DistributedSampler(range(n), num_replicas=world, rank=ctx.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=False)

    def _config_record(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "world_size": self.ctx.world_size, "backend": self.ctx.backend,
                "device": str(self.device), "parameters": self.parameters, "steps_per_epoch": self.steps_per_epoch,
                "micro_batch_per_rank": self.micro, "sync_bn": bool(self.ctx.distributed and self.cfg.sync_bn and self.has_bn),
                "test_source": self.data.test_source, "torch": torch.__version__,
                "peak_mem": "cuda max_memory_allocated" if self.device.type == "cuda" else "process peak RSS (VmHWM), max over ranks"}

    def _new_run_dir(self) -> None:
        rundir.new_run_dir(self.out)
        rundir.write_json(self.out / rundir.CONFIG, self._config_record())

    def _truncate_metrics(self) -> list[dict[str, Any]]:
        rows = rundir.read_metrics(self.out, upto_epoch=self.pos["epoch"])
        rundir.rewrite_metrics(self.out, rows)
        record = rundir.read_json(self.out / rundir.CONFIG)
        record.setdefault("resumed", []).append({"at_step": self.pos["global_step"], "world_size": self.ctx.world_size,
                                                  "config": self.cfg.to_dict()})
        rundir.write_json(self.out / rundir.CONFIG, record)
        return rows

    # -- one optimizer step ----------------------------------------------------------------
    def _step(self, idx: torch.Tensor, step: int) -> torch.Tensor:
        """Forward and backward over the K micro-batches of optimizer step ``step`` of this
        rank's epoch indices, then the optimizer step; the sum of the micro-batch losses."""
        cfg, k, micro = self.cfg, self.cfg.grad_accum, self.micro
        total = torch.zeros((), dtype=torch.float64)
        for j in range(k):
            chunk = idx[(step * k + j) * micro:(step * k + j + 1) * micro]
            x, y = self.data.batch("train", chunk, self.device)
            # under DDP the first K-1 micro-batches only accumulate locally; the last one's
            # backward all-reduces the summed gradients
            sync = self.model.no_sync() if (self.ctx.distributed and j < k - 1) else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=AUTOCAST.get(cfg.precision), enabled=cfg.precision != "fp32"):
                    loss = _loss(self.model(x), y)
                self.scaler.scale(loss / k).backward()
            total += loss.detach().double().cpu()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return total

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(test loss, test accuracy) over the whole test set: each rank scores every
        world_size-th sample, the sums are all-reduced."""
        cfg, data = self.cfg, self.data
        self.core.eval()
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = count = 0
        for chunk in torch.arange(self.ctx.rank, len(data.test_y), self.ctx.world_size).split(cfg.eval_batch_size):
            x, y = data.batch("test", chunk, self.device)
            with torch.autocast(self.device.type, dtype=AUTOCAST.get(cfg.precision), enabled=cfg.precision != "fp32"):
                logits = self.core(x)
            loss_sum += _loss(logits, y, "sum").double().cpu()
            correct += int((logits.argmax(-1) == y).sum())
            count += y.numel()
        self.core.train()
        loss_sum, correct, count = self.ctx.all_reduce([float(loss_sum), correct, count])
        return loss_sum / count, correct / count

    # -- checkpoints -------------------------------------------------------------------------
    def _checkpoint(self, local_loss: float) -> None:
        """Every rank: the epoch's running loss (sum of step losses); rank 0: write the checkpoint."""
        (loss_partial,) = self.ctx.all_reduce([local_loss / (self.cfg.grad_accum * self.ctx.world_size)])
        meta = {**self.pos, "loss_partial": loss_partial,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
        if self.ctx.is_root:
            rundir.save_checkpoint(self.out, self.core.state_dict(), self.opt.state_dict(), meta)
        self.ctx.barrier()

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._prepare()
        cfg, ctx = self.cfg, self.ctx
        total_steps = self.steps_per_epoch * cfg.epochs
        last = min(total_steps, cfg.max_steps) if cfg.max_steps is not None else total_steps
        bar = None
        if self.progress and self.pos["global_step"] < last:
            from tqdm import tqdm

            bar = tqdm(total=last, initial=self.pos["global_step"], unit="step", desc="train", leave=False)
        prof, profiled, steps_here = None, 0, 0
        stopped = False
        per_rank = self.steps_per_epoch * cfg.grad_accum * self.micro
        while self.pos["global_step"] < last:
            epoch = self.pos["epoch"]
            self.sampler.set_epoch(epoch)
            idx = torch.tensor(list(self.sampler)[:per_rank], dtype=torch.int64)
            # loss_partial: the sum of the step losses so far in this epoch (a step's loss is the
            # mean of its K x world micro-batch losses); every rank starts with its share
            local_loss = self.pos["loss_partial"] * cfg.grad_accum
            t0 = time.perf_counter() - self.pos["train_s_partial"]
            while self.pos["step_in_epoch"] < self.steps_per_epoch and self.pos["global_step"] < last:
                if cfg.profile and prof is None and profiled == 0 and steps_here == 1:
                    prof = self._start_profiler()
                with torch.profiler.record_function("train_step"):
                    local_loss += float(self._step(idx, self.pos["step_in_epoch"]))
                self.pos["step_in_epoch"] += 1
                self.pos["global_step"] += 1
                steps_here += 1
                if bar is not None:
                    bar.update(1)
                if prof is not None:
                    profiled += 1
                    if profiled == cfg.profile_steps:
                        prof = self._stop_profiler(prof)
                mid_epoch = self.pos["step_in_epoch"] < self.steps_per_epoch
                if mid_epoch and (self.pos["global_step"] == last or
                                  (cfg.checkpoint_every and self.pos["global_step"] % cfg.checkpoint_every == 0)):
                    self.pos["train_s_partial"] = time.perf_counter() - t0
                    self._checkpoint(local_loss)
                    stopped = self.pos["global_step"] == last
            if stopped:
                break
            train_s = time.perf_counter() - t0
            if prof is not None:
                prof = self._stop_profiler(prof)
            (loss_sum,) = ctx.all_reduce([local_loss / (cfg.grad_accum * ctx.world_size)])
            test_loss, test_acc = self.evaluate()
            self.pos["elapsed_s"] += train_s
            row = {
                "epoch": epoch + 1, "step": self.pos["global_step"],
                "train_loss": loss_sum / self.steps_per_epoch,
                "test_loss": test_loss, "test_accuracy": test_acc,
                "samples_per_s": self.steps_per_epoch * cfg.batch_size / train_s if train_s > 0 else None,
                "epoch_s": train_s, "elapsed_s": self.pos["elapsed_s"],
                "peak_mem_mb": ctx.all_reduce([peak_memory_mb(self.device)], op="max")[0],
                "world_size": ctx.world_size,
            }
            self.rows.append(row)
            if ctx.is_root:
                rundir.append_metrics(self.out, row)
            self.pos.update(epoch=epoch + 1, step_in_epoch=0, loss_partial=0.0, train_s_partial=0.0)
            self._checkpoint(0.0)
            if bar is not None:
                bar.set_postfix(epoch=epoch + 1, acc=f"{test_acc:.4f}")
        if bar is not None:
            bar.close()
        if prof is not None:
            self._stop_profiler(prof)
        return self._finish(complete=self.pos["global_step"] >= total_steps)

    def _start_profiler(self) -> Any:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        prof = profile(activities=acts, record_shapes=True, profile_memory=True)
        prof.start()
        return prof

    def _stop_profiler(self, prof: Any) -> None:
        """Stop ``prof`` and write this rank's Chrome trace; None (the profiler is done)."""
        prof.stop()
        prof.export_chrome_trace(str(self.out / f"trace_rank{self.ctx.rank}.json"))
        return None

    def _finish(self, complete: bool) -> dict[str, Any]:
        cfg, rows = self.cfg, self.rows
        accs = [r["test_accuracy"] for r in rows]
        target_s = None
        if cfg.target_accuracy is not None:
            target_s = next((r["elapsed_s"] for r in rows if r["test_accuracy"] >= cfg.target_accuracy), None)
        speeds = [r["samples_per_s"] for r in rows if r.get("samples_per_s")]
        summary = {
            "final_accuracy": accs[-1] if accs else None,
            "final_test_loss": rows[-1]["test_loss"] if rows else None,
            "best_accuracy": max(accs) if accs else None,
            "epochs_run": len(rows), "steps": self.pos["global_step"], "complete": complete,
            "world_size": self.ctx.world_size, "backend": self.ctx.backend, "device": str(self.device),
            "precision": cfg.precision, "model": cfg.model, "dataset": cfg.dataset, "parameters": self.parameters,
            "samples_per_s": sum(speeds) / len(speeds) if speeds else None,
            "train_s": self.pos["elapsed_s"], "target_accuracy": cfg.target_accuracy, "time_to_target_s": target_s,
            "peak_mem_mb": max((r["peak_mem_mb"] for r in rows), default=None),
            "test_source": self.data.test_source, "out": str(self.out),
        }
        if self.ctx.is_root:
            rundir.save_model(self.out / rundir.MODEL, self.core.state_dict(),
                              {"model": cfg.model, "dataset": cfg.dataset, "step": str(self.pos["global_step"])})
            rundir.write_json(self.out / rundir.SUMMARY, summary)
        self.ctx.barrier()
        return summary

