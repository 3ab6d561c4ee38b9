"""``python -m seqpar.bench``: run the benchmark suites and write JSON + markdown + PNG.

    python -m seqpar.bench                          # every suite; GPU shapes on CUDA, small ones on CPU
    python -m seqpar.bench --suites s2 lightning    # some suites
    python -m seqpar.bench --size smoke --out /tmp/b  # minimal shapes (what the test runs)
    python -m seqpar.bench --suites s2 --seqs 4096 8192 --budget-s 120
    python -m seqpar.bench --replot runs/gpu/bench.json   # PNGs of a report (a GPU host without matplotlib)

Exit status 1 when a suite failed or a case raised (everything else still ran and was written).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from seqpar.bench import SUITES, run


def flat_rows(report: dict, out: pathlib.Path, path: pathlib.Path) -> None:
    """One row per timed case (suite, the table columns), missing baselines and failed suites as
    rows too, with the report's folder: the summary a caller such as ``make gpu-check`` keeps."""
    from seqpar.bench.report import result_rows

    rows = []
    for s in report["suites"]:
        if s["status"] == "failed":
            err = (s["error"] or "")[-200:]
            rows.append({"suite": s["name"], "impl": "-", "ms median (min-max)": f"suite failed: {err}"})
        rows += [{"suite": s["name"], **r} for r in result_rows(s["results"])]
        if s["status"] == "running":
            rows.append({"suite": s["name"], "impl": "-", "ms median (min-max)": "suite did not finish: the rows "
                         "above were measured before it stopped (derived columns are computed at its end)"})
        rows += [{"suite": s["name"], "impl": m["impl"], "ms median (min-max)": f"missing: {m['reason']}"}
                 for m in s["missing"]]
    tmp = path.with_name(path.name + ".tmp")  # replaced in one step: a reader never sees half a file
    tmp.write_text(json.dumps({"report": str(out / "bench.json"), "stamp": report["stamp"], "rows": rows},
                              indent=1, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m seqpar.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--suites", nargs="+", choices=list(SUITES), default=list(SUITES), metavar="SUITE",
                    help=f"suites to run (default: all): {', '.join(SUITES)}")
    ap.add_argument("--size", choices=("smoke", "cpu", "gpu"), default=None,
                    help="shape set (default: gpu on CUDA, cpu otherwise)")
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="output folder for bench.json, bench.md and the PNG plots (default: runs/bench, or "
                         "runs/bench/<suites> when only some suites run)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per case, >= 5 (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    ap.add_argument("--seqs", type=int, nargs="+", default=None,
                    help="sequence lengths of the kernel suites (MoH: the first one)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time budget in seconds per kernel suite (s2, lightning, moh; checked before each timed group): "
                         "the rest of the suite is skipped, and said so")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--json", type=pathlib.Path, default=None,
                    help="also write every result as one flat row per case to this file ({'report', 'rows'}: "
                         "what make gpu-check collects), rewritten after every timed group so a stopped run keeps "
                         "what it measured; the report folder defaults to <file stem>_bench beside it")
    ap.add_argument("--replot", type=pathlib.Path, default=None, metavar="BENCH_JSON",
                    help="draw the PNGs (and bench.md) of a written report again, into --out or beside it; "
                         "runs nothing")
    args = ap.parse_args(argv)
    if args.replot:
        from seqpar.bench import replot

        for p in replot(args.replot, args.out):
            print(f"wrote {p}")
        return 0
    if args.reps < 5:
        ap.error(f"--reps must be >= 5 (min / median / max and the noise flag need them), got {args.reps}")
    out = args.out or (args.json.parent / f"{args.json.stem}_bench" if args.json else
                       pathlib.Path("runs/bench") / ("" if args.suites == list(SUITES) else "+".join(args.suites)))
    # with --json the flat rows are rewritten after every timed group: a run stopped from outside (make
    # gpu-check's phase timeout) leaves what it measured, and a row saying the suite did not finish
    keep = (lambda partial: flat_rows(partial, out, args.json)) if args.json else None
    report = run(args.suites, size=args.size, out=out, reps=args.reps, threads=args.threads, seqs=args.seqs,
                 budget_s=args.budget_s, device=args.device, progress=keep)
    if args.json:
        flat_rows(report, out, args.json)
    bad = [s["name"] for s in report["suites"] if s["status"] == "failed"]
    bad += [f"{s['name']}: {r['impl']} ({r['group']})" for s in report["suites"] for r in s["results"]
            if r["status"] == "error"]
    if bad:
        print("FAILED: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
