"""The peer of benchmarks/ddp_study.py: the same training written with HF Accelerate.

The same model (mlsyskit.models' CNN), data (mnist-5k in memory, the same test subset), global
batch, optimizer (SGD, momentum 0.9), precision and epochs as `mlsyskit train`, written the way
Accelerate's examples write it: a TensorDataset in a DataLoader (shuffled), prepared by the
Accelerator (which shards it over the ranks and wraps the model in DDP), accelerator.backward,
autocast from mixed_precision. Launched by torchrun like ours. Rank 0 prints one JSON line.

    torchrun --standalone --nproc-per-node 2 benchmarks/ddp_accelerate_peer.py --batch-size 64 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from mlsyskit.data import load_dataset
from mlsyskit.models import build_model


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--target-accuracy", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    acc = Accelerator(mixed_precision="no" if args.precision == "fp32" else "bf16", cpu=not torch.cuda.is_available())
    ds = load_dataset("mnist-5k", args.data_dir)
    # the same fixed subsets as `mlsyskit train --train-limit/--test-limit`
    train_x, train_y = ds.train_x, ds.train_y
    if args.train_limit is not None and args.train_limit < len(train_y):
        keep = torch.from_numpy(np.sort(np.random.default_rng(0).permutation(len(train_y))[: args.train_limit]))
        train_x, train_y = train_x[keep], train_y[keep]
    keep = torch.from_numpy(np.sort(np.random.default_rng(0).permutation(len(ds.test_y))[: args.test_limit]))
    test_x, test_y = ds.test_x[keep], ds.test_y[keep]
    torch.manual_seed(args.seed)
    model = build_model("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    per_rank = args.batch_size // acc.num_processes
    train = DataLoader(TensorDataset(train_x, train_y), batch_size=per_rank, shuffle=True, drop_last=True)
    test = DataLoader(TensorDataset(test_x, test_y), batch_size=500)
    model, opt, train, test = acc.prepare(model, opt, train, test)
    rows, elapsed = [], 0.0
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        seen = 0
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(y) * acc.num_processes
        train_s = time.perf_counter() - t0
        elapsed += train_s
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in test:
                pred, y = acc.gather_for_metrics((model(x).argmax(-1), y))
                correct += int((pred == y).sum())
                total += len(y)
        rows.append({"epoch": epoch + 1, "samples_per_s": seen / train_s, "epoch_s": train_s, "elapsed_s": elapsed,
                     "test_accuracy": correct / total})
    peak = acc.gather(torch.tensor([peak_rss_mb()])).max().item()
    if acc.is_main_process:
        target = None
        if args.target_accuracy is not None:
            target = next((r["elapsed_s"] for r in rows if r["test_accuracy"] >= args.target_accuracy), None)
        print(json.dumps({"rows": rows, "samples_per_s": sum(r["samples_per_s"] for r in rows) / len(rows),
                          "final_accuracy": rows[-1]["test_accuracy"], "peak_mem_mb": peak, "time_to_target_s": target,
                          "world_size": acc.num_processes, "accelerate": __import__("accelerate").__version__}))
    acc.end_training()


if __name__ == "__main__":
    main()
