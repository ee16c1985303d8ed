"""Where communication dominates: `mlsyskit hpc taylor` over P ranks and N terms, each of
reduce, allreduce and the hand-written send/recv tree, under the venv's mpiexec.

    .venv/bin/python benchmarks/hpc_taylor.py                      # P = 1, 2; N = 10^1..10^7
    .venv/bin/python benchmarks/hpc_taylor.py --ranks 1,2,4 --terms 100,1000000

Writes benchmarks/results/hpc_taylor.json and .png: compute and communication time (median of
--repeat per launch) against N for each P and method, and for each (P, method) the largest N at
which communication still takes longer than computing. More ranks than CPUs oversubscribe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

METHODS = ("reduce", "allreduce", "sendrecv")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2", help="world sizes P (default: 1,2)")
    p.add_argument("--terms", default="10,100,1000,10000,100000,1000000,10000000", help="terms N")
    p.add_argument("--function", default="exp", help="exp, sin or ln1p (default: exp)")
    p.add_argument("--x", default="1.0", help="the point (default: 1.0)")
    p.add_argument("--repeat", type=int, default=7, help="timed repetitions per launch (default: 7)")
    p.add_argument("--out", default=str(common.RESULTS / "hpc_taylor.json"), help="output JSON (PNG beside it)")
    args = p.parse_args(argv)
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    load_before = common.loadavgs()
    rows = []
    for ranks in [int(r) for r in common.split_names(args.ranks)]:
        for n in [int(t) for t in common.split_names(args.terms)]:
            for method in METHODS:
                cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mlsyskit", "hpc", "taylor", "--function",
                       args.function, "--x", args.x, "--terms", str(n), "--method", method, "--repeat", str(args.repeat)]
                r = common.run_json_peer(cmd, timeout=600)
                r.setdefault("ranks", ranks)
                r.setdefault("terms", n)
                r.setdefault("method", method)
                rows.append(r)
                common.log(f"P={ranks} N={n:>9} {method:9} compute {r.get('compute_s', 0) * 1e6:10.1f} us  "
                           f"comm {r.get('comm_s', 0) * 1e6:9.1f} us  |err| {r.get('abs_error')}")
    # medians, and minimums (the least disturbed repetition: the machine is shared)
    crossover: dict[str, dict[str, int | None]] = {"median": {}, "min": {}}
    for ranks in sorted({r["ranks"] for r in rows}):
        for method in METHODS:
            pts = sorted((r["terms"], r) for r in rows if r["ranks"] == ranks and r["method"] == method and "comm_s" in r)
            for stat, suffix in (("median", ""), ("min", "_min")):
                dominated = [n for n, r in pts if r["comm_s" + suffix] > r["compute_s" + suffix]]
                crossover[stat][f"P={ranks} {method}"] = max(dominated) if dominated else None
    result = {**common.run_stamp(), "platform": common.platform_info(), "usable_cpus": common.usable_cpus(),
              "loadavg_before": load_before, "loadavg_after": common.loadavgs(), "function": args.function,
              "x": float(args.x), "rows": rows, "largest_n_where_communication_dominates": crossover}
    out = common.write_json(args.out, result)
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len({r["ranks"] for r in rows}), figsize=(6 * len({r["ranks"] for r in rows}), 4.5), squeeze=False)
    for ax, ranks in zip(axes[0], sorted({r["ranks"] for r in rows}), strict=True):
        for method, colour in zip(METHODS, ("tab:blue", "tab:orange", "tab:green"), strict=True):
            pts = sorted((r["terms"], r["compute_s"], r["comm_s"]) for r in rows
                         if r["ranks"] == ranks and r["method"] == method and "comm_s" in r)
            if pts:
                ns, comp, comm = zip(*pts, strict=True)
                ax.plot(ns, comm, "-o", color=colour, ms=3, label=f"{method}: communication")
                ax.plot(ns, comp, ":", color=colour, label=f"{method}: compute")
        ax.set(xscale="log", yscale="log", xlabel="terms N", ylabel="seconds (median)", title=f"P = {ranks}")
        ax.legend(fontsize=7)
    common.save_figure(fig, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}; communication dominates up to N = {crossover}")


if __name__ == "__main__":
    main()
