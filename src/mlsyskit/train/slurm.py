"""`mlsyskit train --slurm-script FILE`: an sbatch script for the same run on a Slurm cluster.

One srun task per node starts torchrun there; the torchrun agents meet at a c10d rendezvous on
the job's first node and start ``--nproc-per-node`` ranks each. Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from dataclasses import dataclass

from mlsyskit.errors import UserError
from mlsyskit.train.config import TrainConfig


@dataclass
class SlurmOptions:
    nodes: int = 1
    nproc_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None  # None: nproc_per_node
    time: str = "01:00:00"
    partition: str | None = None
    port: int = 29500
    job_name: str = "mlsyskit-train"
    python: str = sys.executable

    def validate(self) -> None:
        for name in ("nodes", "nproc_per_node"):
            if getattr(self, name) < 1:
                raise UserError(f"--slurm-{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise UserError(f"--slurm-gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise UserError(f"--slurm-cpus-per-task must be at least 1, got {self.cpus_per_task}")
        if not 1 <= self.port <= 65535:
            raise UserError(f"--slurm-port must be in 1..65535, got {self.port}")
        if not self.time or any(c.isspace() for c in self.time):
            raise UserError(f"--slurm-time {self.time!r}: give a Slurm time such as 01:00:00 or 2-00:00:00")


def config_argv(cfg: TrainConfig) -> list[str]:
    """`mlsyskit train` flags reproducing ``cfg`` (only values that differ from the defaults)."""
    default = TrainConfig()
    argv: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if value == getattr(default, f.name) or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def sbatch_script(cfg: TrainConfig, opts: SlurmOptions) -> str:
    """The text of the sbatch script."""
    opts.validate()
    cpus = opts.cpus_per_task or opts.nproc_per_node
    threads = max(cpus // opts.nproc_per_node, 1)
    if opts.gpus_per_node and opts.gpus_per_node < opts.nproc_per_node:
        raise UserError(f"--slurm-nproc-per-node {opts.nproc_per_node} ranks per node need as many GPUs; "
                        f"--slurm-gpus-per-node is {opts.gpus_per_node}")
    lines = [
        "#!/bin/bash",
        f"# Written by `mlsyskit train --slurm-script`: {opts.nodes} node(s) x {opts.nproc_per_node} rank(s),",
        "# one torchrun agent per node (srun), meeting at a c10d rendezvous on the first node.",
        f"#SBATCH --job-name={opts.job_name}",
        f"#SBATCH --nodes={opts.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --time={opts.time}",
        "#SBATCH --output=%x-%j.out",
    ]
    if opts.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={opts.gpus_per_node}")
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    train_args = shlex.join(["-m", "mlsyskit", "train", *config_argv(cfg)])
    lines += [
        "",
        "set -euo pipefail",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export OMP_NUM_THREADS={threads}",
        f"srun --kill-on-bad-exit=1 {shlex.quote(opts.python)} -m torch.distributed.run \\",
        f'    --nnodes "$SLURM_NNODES" --nproc-per-node {opts.nproc_per_node} \\',
        f'    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head_node:{opts.port}" \\',
        f"    {train_args}",
        "",
    ]
    return "\n".join(lines)
