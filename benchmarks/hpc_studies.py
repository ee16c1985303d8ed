"""The BLAS roofline and the activation-function study of `mlsyskit hpc`, written to
benchmarks/results/ (hpc_blas.json/.png, hpc_activations.json/.png and its Chrome trace).

    .venv/bin/python benchmarks/hpc_studies.py                 # both, default sizes
    .venv/bin/python benchmarks/hpc_studies.py --only blas --sizes 128,256

The machine is shared: each JSON records the load average before and after; compare ratios
measured within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from mlsyskit.hpc import activations, blas  # noqa: E402


def _stamp(path: str) -> None:
    data = json.loads(Path(path).read_text())
    data.update(common.run_stamp(), platform=common.platform_info(), usable_cpus=common.usable_cpus())
    common.write_json(path, data)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("blas", "activations"), default=None, help="run one study (default: both)")
    p.add_argument("--sizes", default="128,256,512,1024", help="BLAS matrix sizes (default: 128,256,512,1024)")
    p.add_argument("--repeat", type=int, default=3, help="BLAS repetitions, best kept (default: 3)")
    p.add_argument("--numel", type=int, default=1 << 22, help="activation tensor elements (default: 4194304)")
    p.add_argument("--act-threads", type=int, default=1, help="torch threads for the activations (default: 1)")
    p.add_argument("--out", default=str(common.RESULTS), help="output folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    if args.only in (None, "blas"):
        common.log("blas")
        r = blas.run_blas(blas.BlasConfig(sizes=[int(s) for s in common.split_names(args.sizes)], repeat=args.repeat, out=args.out),
                     progress=False)
        _stamp(r["json"])
        print(blas.table(r))
    if args.only in (None, "activations"):
        common.log("activations")
        r = activations.run_activations(activations.ActivationConfig(numel=args.numel, repeat=20, threads=args.act_threads, out=args.out))
        _stamp(r["json"])
        print(activations.table(r))


if __name__ == "__main__":
    main()
