"""`mlsyskit hpc taylor|logreg|blas|activations|kernels`: MPI programs and measured studies.

Run the MPI ones with the venv's mpiexec: `mpiexec -n 4 mlsyskit hpc taylor ...`. Every
command prints a readable summary and then one JSON object on its last line (rank 0 only).
Imported on every `mlsyskit` invocation: nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable


def _rank() -> int:
    """This process's MPI rank from the launcher's environment (MPICH's PMI_RANK, Open MPI's
    OMPI_COMM_WORLD_RANK); 0 without mpiexec."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _errors_on_rank0(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A user error reaches every rank (mpi.fail_all); only rank 0 prints it, the others just
    exit 2."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        from mlsyskit.errors import UserError

        try:
            return fn(args)
        except UserError:
            if _rank() != 0:
                return 2
            raise

    return wrapper


@_errors_on_rank0
def _taylor(args: argparse.Namespace) -> int:
    from mlsyskit.hpc import mpi
    from mlsyskit.hpc.taylor import TaylorConfig, run_taylor, summary_line

    cfg = TaylorConfig(function=args.function, x=args.x, terms=args.terms, method=args.method, repeat=args.repeat)
    result = run_taylor(cfg)
    mpi.report(mpi.world(), summary_line(result), result)
    return 0


@_errors_on_rank0
def _logreg(args: argparse.Namespace) -> int:
    from mlsyskit.hpc import mpi
    from mlsyskit.hpc.logreg import LogRegConfig, run_logreg, summary_line

    cfg = LogRegConfig(dataset=args.dataset, data_dir=args.data_dir, rounds=args.rounds, lr=args.lr,
                       local_steps=args.local_steps, l2=args.l2, partition=args.partition, alpha=args.alpha,
                       malicious=args.malicious, attack=args.attack, attack_scale=args.attack_scale,
                       strategy=args.strategy, trim_ratio=args.trim_ratio, krum_f=args.krum_f, mask=args.mask,
                       seed=args.seed, reference=args.reference)
    result = run_logreg(cfg)
    comm = mpi.world()
    if comm.Get_rank() == 0:
        mpi.report(comm, summary_line(result), result)
    return 0


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid sizes {text!r}; give comma-separated integers, e.g. 128,256,512") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"invalid sizes {text!r}; give comma-separated positive integers")
    return sizes


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _blas(args: argparse.Namespace) -> int:
    import json

    from mlsyskit.hpc.blas import BlasConfig, run_blas, table

    result = run_blas(BlasConfig(sizes=args.sizes, dtypes=_names(args.dtypes), libraries=_names(args.libraries),
                                 ops=_names(args.ops), repeat=args.repeat, out=args.out), progress=args.progress)
    print(table(result))
    print(json.dumps({k: result[k] for k in ("json", "png", "peak", "best", "blas")}))
    return 0


def _activations(args: argparse.Namespace) -> int:
    import json

    from mlsyskit.hpc.activations import ActivationConfig, run_activations, table

    result = run_activations(ActivationConfig(numel=args.numel, repeat=args.repeat, out=args.out, threads=args.threads))
    print(table(result))
    print(json.dumps({k: result[k] for k in ("json", "png", "trace", "numel", "threads")}))
    return 0


def _kernels(args: argparse.Namespace) -> int:
    import json

    from mlsyskit.hpc.kernels import run_kernels

    result = run_kernels(repeat=args.repeat, out=args.out)
    print(result["message"])
    print(json.dumps(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from mlsyskit.runtime import add_progress_flag

    hpc = sub.add_parser(
        "hpc",
        help="MPI programs (Taylor series, federated logistic regression) and BLAS, activation and Triton kernel studies",
        description="MPI programs, run with `mpiexec -n P mlsyskit hpc ...` (mpi4py over the pip mpich wheel), and "
        "measured studies. Each prints a readable summary and one JSON object on its last line (rank 0).",
    )
    cmds = hpc.add_subparsers(dest="hpc_command", metavar="COMMAND", parser_class=type(hpc))
    cmds.required = True

    t = cmds.add_parser("taylor", help="a Taylor series split over MPI ranks: reduce vs allreduce vs send/recv",
                        description="Sum N Taylor terms of exp, sin or ln(1+x) split over the MPI ranks, combine the "
                        "partial sums by MPI_Reduce, MPI_Allreduce or a hand-written send/recv tree; report the value, "
                        "its error and compute vs communication time. Run: mpiexec -n 4 mlsyskit hpc taylor ...")
    t.add_argument("--function", default="exp", choices=("exp", "sin", "ln1p"), help="the function (default: exp)")
    t.add_argument("--x", type=float, default=1.0, help="the point (ln1p: -1 < x <= 1) (default: 1.0)")
    t.add_argument("--terms", type=int, default=20, metavar="N", help="number of terms N (default: 20)")
    t.add_argument("--method", default="reduce", choices=("reduce", "allreduce", "sendrecv"),
                   help="how partial sums are combined (default: reduce)")
    t.add_argument("--repeat", type=int, default=5, help="timed repetitions; the median is reported (default: 5)")
    t.set_defaults(func=_taylor)

    lg = cmds.add_parser("logreg", help="federated logistic regression: a server rank, client ranks with non-IID shards",
                         description="Rank 0 is the server, ranks 1..P-1 clients with their own shard; only model "
                         "updates leave a rank (optionally pairwise-masked so the server sees only their sum). "
                         "Checked against scikit-learn on the pooled data. Run: mpiexec -n 5 mlsyskit hpc logreg ...")
    lg.add_argument("--dataset", default="synthetic", choices=("synthetic", "mnist-5k"), help="data (default: synthetic: 3 Gaussian classes in 20 dimensions)")
    lg.add_argument("--data-dir", default=None, help="folder with the data files (default: $MLSYSKIT_DATA_DIR)")
    lg.add_argument("--rounds", type=int, default=30, help="communication rounds (default: 30)")
    lg.add_argument("--lr", type=float, default=None, help="client learning rate (default: 0.5 synthetic, 0.1 mnist-5k)")
    lg.add_argument("--local-steps", type=int, default=5, help="full-batch gradient steps per client per round (default: 5)")
    lg.add_argument("--l2", type=float, default=1e-4, help="L2 regularisation (default: 1e-4)")
    lg.add_argument("--partition", default="shards", choices=("iid", "shards", "dirichlet"), help="how data is split over clients (default: shards, label-sorted, non-IID)")
    lg.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration for --partition dirichlet (default: 0.5)")
    lg.add_argument("--malicious", type=int, default=0, metavar="K", help="clients 1..K send attacks (default: 0)")
    lg.add_argument("--attack", default="sign-flip", choices=("sign-flip", "scale", "noise"), help="what malicious clients send (default: sign-flip)")
    lg.add_argument("--attack-scale", type=float, default=10.0, help="strength of the attack (default: 10)")
    lg.add_argument("--strategy", default="mean", choices=("mean", "median", "trimmed-mean", "krum"), help="server aggregation (default: mean, sample-weighted)")
    lg.add_argument("--trim-ratio", type=float, default=0.25, help="fraction of clients trimmed at each end, per coordinate, by trimmed-mean (rounded down) (default: 0.25)")
    lg.add_argument("--krum-f", type=int, default=1, help="Byzantine clients tolerated by krum (default: 1)")
    lg.add_argument("--mask", action="store_true", help="pairwise masking: the server sees only the sum of the updates (default: off)")
    lg.add_argument("--seed", type=int, default=0, help="partition and attack noise seed (default: 0)")
    lg.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                    help="fit scikit-learn's LogisticRegression on the pooled data to compare (default: on)")
    lg.set_defaults(func=_logreg)

    b = cmds.add_parser("blas", help="matrix multiply and inversion GFLOP/s against this CPU's peak (roofline), 1 vs all threads",
                        description="Time matmul and inversion for numpy (its BLAS named via threadpoolctl) and torch, "
                        "in float32, float64 and bfloat16, with 1 and all threads; GFLOP/s against this CPU's peak "
                        "(a roofline). Writes hpc_blas.json and hpc_blas.png to --out.")
    b.add_argument("--sizes", type=_sizes, default=[128, 256, 512, 1024], help="matrix sizes n (default: 128,256,512,1024)")
    b.add_argument("--dtypes", default="float32,float64,bfloat16", help="dtypes (default: float32,float64,bfloat16)")
    b.add_argument("--libraries", default="numpy,torch", help="libraries (default: numpy,torch)")
    b.add_argument("--ops", default="matmul,inv", help="operations (default: matmul,inv)")
    b.add_argument("--repeat", type=int, default=3, help="timed repetitions, best kept (default: 3)")
    b.add_argument("--out", default="runs/hpc", help="output folder (default: runs/hpc)")
    add_progress_flag(b, "measurements")
    b.set_defaults(func=_blas)

    a = cmds.add_parser("activations", help="forward/backward time and memory of ReLU, Sigmoid, Tanh, GELU, SiLU under torch.profiler",
                        description="Forward and backward time of ReLU, Sigmoid, Tanh, GELU (exact and tanh) and SiLU, the "
                        "activation memory saved for backward, and torch.profiler's memory view; writes "
                        "hpc_activations.json, hpc_activations.png and a Chrome trace to --out.")
    a.add_argument("--numel", type=int, default=1 << 22, help="elements per input tensor (default: 4194304)")
    a.add_argument("--repeat", type=int, default=10, help="timed repetitions, best kept (default: 10)")
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a.add_argument("--out", default="runs/hpc", help="output folder (default: runs/hpc)")
    a.set_defaults(func=_activations)

    k = cmds.add_parser("kernels", help="Triton grayscale and fused conv2d+ReLU kernels: checked, and timed on a GPU",
                        description="Check the Triton kernels (RGB to grayscale, fused conv2d + bias + ReLU) against "
                        "torch and numpy; time them on a CUDA GPU. Without a GPU they run under Triton's interpreter "
                        "(checked, not timed).")
    k.add_argument("--repeat", type=int, default=20, help="timed repetitions on a GPU (default: 20)")
    k.add_argument("--out", default=None, help="also write hpc_kernels.json there (default: off)")
    k.set_defaults(func=_kernels)
