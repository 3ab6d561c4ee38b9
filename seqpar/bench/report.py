"""Report output of the harness: the stamp, console tables, the JSON (validated against
:mod:`seqpar.bench.schema`), the markdown summary and the PNG plots, all in one output folder."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any, Optional, Sequence

import torch

SCHEMA_VERSION = 1  # bump with a change of seqpar.bench.schema


def validate(payload: dict):
    """:func:`seqpar.bench.schema.validate` (imported here so that pydantic is needed only to validate)."""
    from seqpar.bench.schema import validate as _validate

    return _validate(payload)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:  # the model name says more than "x86_64"
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads of {os.cpu_count()} cores)"


def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001 - not installed
        return None


def _git_commit() -> Optional[str]:
    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_avg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def stamp(device: torch.device, size: str, threads: int) -> dict[str, Any]:
    """Device, versions and date of this run (the report's ``stamp``)."""
    triton = _version("triton")
    seqpar = _version("seqpar") or "unknown"
    commit = _git_commit()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": device.type, "size": size, "threads": threads,
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton,
        "seqpar": f"{seqpar} ({commit})" if commit else seqpar,
        "fla": _version("fla-core") or _version("flash-linear-attention"), "load_avg": load_avg(),
    }


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def table_lines(rows: Sequence[dict[str, Any]], *, markdown: bool) -> list[str]:
    """Rows (dicts with the same keys first) as aligned text or a markdown table."""
    if not rows:
        return []
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    if markdown:
        return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    return ([" | ".join(c.ljust(w) for c, w in zip(cols, widths)), "-+-".join("-" * w for w in widths)]
            + [" | ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells])


def print_table(rows: Sequence[dict[str, Any]], title: str = "") -> None:
    if title:
        print(f"\n## {title}")
    for line in table_lines(rows, markdown=False):
        print(line)
    sys.stdout.flush()


def result_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The timed results of a suite as table rows: ms as ``median (min-max)``, flags spelled out."""
    rows = []
    for r in results:
        row: dict[str, Any] = {"group": r["group"], "impl": r["impl"], "mode": r["mode"]}
        ms = r.get("ms")
        if r["status"] != "ok":  # the whole message is in the JSON
            err = r["error"] or ""
            row["ms median (min-max)"] = f"error: {err[:70]}" + ("..." if len(err) > 70 else "")
        else:
            row["ms median (min-max)"] = f"{ms['median']:.3g} ({ms['min']:.3g}-{ms['max']:.3g})" + (
                " NOISY" if ms["noisy"] else "")
        row["TFLOP/s"] = r.get("tflops")
        row["peak MiB"] = r.get("peak_mem_mib")
        if (r.get("first_call_s") or 0) > 1.0:  # compilation (flex_attention, Triton): worth seeing
            row["first call s"] = r["first_call_s"]
        for k, v in r.get("metrics", {}).items():
            row[k] = v
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    s = report["stamp"]
    lines = [f"# seqpar benchmarks ({s['size']} shapes)", "",
             f"{s['date']} · {s['device']} · torch {s['torch']} · triton {s['triton']} · seqpar {s['seqpar']} · "
             f"fla {s['fla'] or 'not installed'} · {s['threads']} thread(s)"
             + (f" · load average {s['load_avg']}" if s.get("load_avg") else ""), ""]
    if s["size"] != "gpu":
        lines += ["Small shapes for a CPU (torch paths): the ratios show the method, not GPU speed.", ""]
    for suite in report["suites"]:
        lines += [f"## {suite['title']}", "", f"status: {suite['status']} ({suite['seconds']:.0f} s)"]
        if suite.get("error"):
            lines += ["", "```", suite["error"], "```"]
        lines.append("")
        lines += table_lines(result_rows(suite["results"]), markdown=True)
        for name, rows in suite["tables"].items():
            lines += ["", f"### {name}", ""] + table_lines(rows, markdown=True)
        for m in suite["missing"]:
            lines.append(f"\n- missing baseline **{m['impl']}**: {m['reason']}")
        for n in suite["notes"]:
            lines.append(f"\n- {n}")
        for p in suite["plots"]:
            lines += ["", f"![{suite['name']}]({p})"]
        lines.append("")
    return "\n".join(lines)


def write(report: dict[str, Any], out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Validate ``report`` against the schema, then write ``bench.json`` and ``bench.md`` to ``out``."""
    try:
        validate(report)
    except ImportError as e:  # pydantic: a GPU host without the train extra; say so, write anyway
        print(f"warning: report not validated against the schema: {e}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "bench.json", out / "bench.md"
    js.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md.write_text(markdown(report))
    return js, md


def new_figure(notes: list[str], ncols: int = 1, title: str = ""):
    """A matplotlib figure with ``ncols`` axes on the Agg backend (no display needed), or ``(None,
    [])`` with a note when matplotlib is not installed (a GPU host without the ``plots`` extra): the
    numbers still count, the plot is said to be missing."""
    try:
        import matplotlib
    except ImportError as e:
        note = f"plots skipped: matplotlib is not installed ({e}); pip install 'seqpar[plots]'"
        if note not in notes:
            print(note, flush=True)
            notes.append(note)
        return None, []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.8), squeeze=False)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig, list(axes[0])


def save_figure(fig, path: pathlib.Path, stamp_line: str) -> None:
    import matplotlib.pyplot as plt

    fig.text(0.01, 0.005, stamp_line, fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path, dpi=80)
    plt.close(fig)
