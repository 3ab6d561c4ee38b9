"""seqpar's benchmark harness: one timing discipline, one report format, every suite.

Suites (``python -m seqpar.bench --suites ...``):

* ``s2``: S2 vs torch SDPA vs ``flex_attention`` with the same BlockMask vs seqpar's dense flash;
* ``lightning``: Lightning vs SDPA vs flash-linear-attention's ``chunk_simple_gla`` (same decay);
* ``moh``: MoH at 25 / 50 / 75 / 100 % active (token, head) pairs vs masked dense SDPA;
* ``cp``: context parallelism per kind and scheme: bytes per rank (comm ledger == ``cp.scheme_cost``),
  measured compute per rank and a modelled step time at P = 8 ... 64 on NVLink and InfiniBand;
* ``e2e``: tokens/s of the trainer's own training step per preset and kind.

Each suite runs on its own: one that fails is reported (status "failed", the error) and the others
still run; within a suite one failing case is reported and the rest still run. Output in ``out``:
``bench.json`` (schema: :mod:`seqpar.bench.schema`, ``docs/bench.md``), ``bench.md`` and one PNG per
suite, each stamped with device, versions and date.
"""

from __future__ import annotations

import importlib
import pathlib
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch

SUITES: dict[str, str] = {  # name -> "module:function"
    "s2": "seqpar.bench.kernels:s2_suite",
    "lightning": "seqpar.bench.kernels:lightning_suite",
    "moh": "seqpar.bench.kernels:moh_suite",
    "cp": "seqpar.bench.cp:cp_suite",
    "e2e": "seqpar.bench.e2e:e2e_suite",
}


PLOTS: dict[str, str] = {  # name -> "module:function(ctx, res)" drawing the suite's PNG from its results
    "s2": "seqpar.bench.kernels:replot_s2",
    "lightning": "seqpar.bench.kernels:replot_lightning",
    "moh": "seqpar.bench.kernels:_plot_moh",
    "cp": "seqpar.bench.cp:replot",
    "e2e": "seqpar.bench.e2e:_plot",
}


def _suite_fn(name: str, table: Optional[dict[str, str]] = None) -> Callable:
    mod, fn = (table or SUITES)[name].split(":")
    return getattr(importlib.import_module(mod), fn)


def replot(report_path: pathlib.Path | str, out: Optional[pathlib.Path | str] = None) -> list[pathlib.Path]:
    """Draw the PNGs of a written report again (e.g. a GPU host's ``bench.json`` on a machine that
    has matplotlib) into ``out`` (default: beside the report), and rewrite its ``bench.md`` there."""
    import json

    from seqpar.bench.common import Context, SuiteResult
    from seqpar.bench.report import write

    report_path = pathlib.Path(report_path)
    report = json.loads(report_path.read_text())
    out = pathlib.Path(out) if out else report_path.parent
    out.mkdir(parents=True, exist_ok=True)
    st = report["stamp"]
    line = f"seqpar bench · {st['date'][:10]} · {st['device']} · torch {st['torch']} · seqpar {st['seqpar']}"
    ctx = Context(torch.device("cuda" if st["device_type"] == "cuda" else "cpu"), st["size"], 5, out, line)
    made = []
    for suite in report["suites"]:
        if suite["name"] not in PLOTS or suite["status"] != "ok":
            continue
        res = SuiteResult(suite["title"], suite["results"], suite["tables"], suite["missing"], suite["notes"], [])
        _suite_fn(suite["name"], PLOTS)(ctx, res)
        suite["plots"], suite["notes"] = res.plots, res.notes
        made += [out / p for p in res.plots]
    write(report, out)
    return made


def run(suites: Sequence[str] = tuple(SUITES), *, size: Optional[str] = None, out: pathlib.Path | str = "runs/bench",
        reps: int = 5, threads: Optional[int] = None, seqs: Optional[list[int]] = None,
        budget_s: Optional[float] = None, device: Optional[str] = None,
        progress: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Run ``suites`` and write the report to ``out``; returns the report dict (schema-valid).

    ``size``: "smoke" | "cpu" | "gpu" (default: "gpu" on CUDA, "cpu" otherwise). ``threads``:
    torch intra-op threads (default 1). ``budget_s``: per kernel suite (s2, lightning, moh), checked
    before each timed group; what does not fit is skipped and noted. ``seqs``: override of the
    kernel suites' sequence lengths. ``progress``: called with the report so far after every timed
    group (the suite in progress has status "running" and the rows measured so far; not
    schema-checked), so a caller can keep partial results of a run that may be stopped.
    """
    from seqpar.bench.common import Context
    from seqpar.bench.report import SCHEMA_VERSION, load_avg, print_table, result_rows, stamp, table_lines, write
    from seqpar.bench.timing import set_threads

    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; suites: {list(SUITES)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = size or ("gpu" if dev.type == "cuda" else "cpu")
    if size not in ("smoke", "cpu", "gpu"):
        raise ValueError(f"size must be smoke, cpu or gpu, got {size!r}")
    n_threads = set_threads(threads)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st = stamp(dev, size, n_threads)
    line = f"seqpar bench · {st['date'][:10]} · {st['device']} · torch {st['torch']} · seqpar {st['seqpar']}"
    print(f"seqpar bench: {size} shapes on {st['device']}" + (
        " (small shapes for a CPU: a few minutes; the ratios show the method, not GPU speed)"
        if size == "cpu" else "") + f"; load average {st['load_avg']}", flush=True)
    ctx = Context(dev, size, reps, out, line, budget_s, seqs)
    report: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "stamp": st, "suites": []}
    live: dict[str, Any] = {}  # the suite in progress, as the progress callback sees it
    if progress is not None:
        def _rows(rows: list[dict[str, Any]]) -> None:
            live["results"] += rows
            progress({**report, "suites": report["suites"] + [live]})

        ctx.progress = _rows
    for name in suites:
        live.clear()
        live.update(name=name, status="running", error=None, title=name, results=[], missing=[])
        t0 = time.perf_counter()
        print(f"\n== suite {name}", flush=True)
        entry: dict[str, Any] = {"name": name, "status": "ok", "error": None}
        try:
            res = _suite_fn(name)(ctx)
            entry.update(title=res.title, results=res.results, tables=res.tables, missing=res.missing,
                         notes=res.notes, plots=res.plots)
        except Exception as e:  # noqa: BLE001 - one failing suite is reported, the others still run
            tb = traceback.format_exc().strip().splitlines()
            entry.update(status="failed", error="\n".join(tb[-12:]), title=name, results=[], tables={}, missing=[],
                         notes=[], plots=[])
            print(f"suite {name} FAILED: {type(e).__name__}: {e}", flush=True)
        entry["seconds"] = time.perf_counter() - t0
        report["suites"].append(entry)
        if entry["results"]:
            print_table(result_rows(entry["results"]), entry["title"])
        for tname, rows in entry["tables"].items():
            print(f"\n## {tname}")
            print("\n".join(table_lines(rows, markdown=False)))
    if st["load_avg"] is not None:
        st["load_avg"] = st["load_avg"] + (load_avg() or [])
    js, md = write(report, out)
    print(f"\nwrote {js}, {md}" + "".join(f", {out / p}" for s in report["suites"] for p in s["plots"]))
    return report
