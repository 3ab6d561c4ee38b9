"""The report of a quality run: stamp, per-model summary over seeds, the papers' claims checked for
direction, the JSON (validated against :mod:`seqpar.quality.schema`), the markdown table and the plot.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
from typing import Any, Optional, Sequence

import torch

from seqpar.bench.report import _git_commit as git_commit  # noqa: F401  run() stamps with it
from seqpar.bench.report import _version, load_avg
from seqpar.bench.report import device_name as bench_device_name
from seqpar.quality.tasks import mqar_key, passkey_key

SCHEMA_VERSION = 2  # 2: claims carry a verdict (was holds: true / false / null)


# --------------------------------------------------------------------------------------------------
# stamp


def device_name(cuda: bool, workers: int, threads: int) -> str:
    """The GPU's name, or the CPU (model, this process's threads, cores) and the workers that ran the runs."""
    if cuda:
        return bench_device_name("cuda")
    return f"{bench_device_name('cpu')}; the runs: {workers} worker(s) x {threads} thread(s)"


def stamp(*, scale: str, seeds: Sequence[int], eval_seed: int, workers: int, threads: int, started: str,
          wall_s: float, cpu_s: float, load_start: Optional[list[float]], commit: Optional[str]) -> dict[str, Any]:
    """Device, versions, date and cost of the run (the report's ``stamp``); ``commit``: the source tree's
    git commit when the run started (:func:`git_commit`)."""
    cuda = torch.cuda.is_available()
    seqpar = _version("seqpar") or "unknown"
    end = load_avg()
    return {"date": started, "device": device_name(cuda, workers, threads), "device_type": "cuda" if cuda else "cpu",
            "scale": scale, "seeds": list(seeds), "eval_seed": eval_seed, "workers": workers, "threads": threads,
            "python": platform.python_version(), "torch": torch.__version__,
            "megatron_core": _version("megatron-core") or _version("megatron_core"),
            "seqpar": f"{seqpar} ({commit})" if commit else seqpar, "wall_s": round(wall_s, 1),
            "cpu_s": round(cpu_s, 1), "load_avg": (load_start + end) if load_start and end else None}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# summary and claims


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean / min / max over the seeds that finished, per (model, metric)."""
    acc: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        if r["status"] != "ok":
            continue
        for k, v in r["metrics"].items():
            acc.setdefault((r["model"], k), []).append(v)
    return [{"model": m, "metric": k, "mean": sum(v) / len(v), "min": min(v), "max": max(v), "n": len(v)}
            for (m, k), v in acc.items()]


def _get(summary: Sequence[dict[str, Any]], model: str, metric: str) -> Optional[dict[str, Any]]:
    return next((s for s in summary if s["model"] == model and s["metric"] == metric), None)


HOLDS, FAILS, SPREAD, MISSING = "holds", "does not hold", "within the seeds' spread", "not measured"
VERDICTS = (HOLDS, FAILS, SPREAD, MISSING)


def _ordered(low: Optional[dict[str, Any]], high: Optional[dict[str, Any]]) -> str:
    """Whether metric summary ``low`` is below ``high`` beyond the seeds: every seed of ``low`` under every
    seed of ``high`` (holds), the reverse (does not hold), else the ranges overlap (within the spread)."""
    if low is None or high is None:
        return MISSING
    if low["max"] < high["min"]:
        return HOLDS
    if low["min"] > high["max"]:
        return FAILS
    return SPREAD


def claims(summary: Sequence[dict[str, Any]], models: Sequence[str]) -> list[dict[str, Any]]:
    """The papers' quality findings, each checked for its direction on this run's seeds.

    "On par" on text means within ``max(1% of the dense loss, the dense seeds' spread)`` (a tie at
    this scale); a recall claim (one model's MQAR accuracy above another's) holds only when every seed
    of one is above every seed of the other, and is "within the seeds' spread" when their ranges overlap."""
    out = []

    def mean(model: str, metric: str) -> Optional[float]:
        s = _get(summary, model, metric)
        return None if s is None else s["mean"]

    def add(claim: str, verdict: str, evidence: str) -> None:
        out.append({"claim": claim, "verdict": verdict, "evidence": evidence})

    def rng(model: str, metric: str) -> str:
        s = _get(summary, model, metric)
        return "" if s is None or s["n"] < 2 else f" ({s['min']:.3f}-{s['max']:.3f})"

    dense_loss = _get(summary, "dense", "val_loss")
    tol = None if dense_loss is None else max(0.01 * dense_loss["mean"], dense_loss["max"] - dense_loss["min"])
    for m, paper in (("s2", "S2"), ("s2-hybrid", "S2"), ("moh", "MoH")):
        if m not in models:
            continue
        v = mean(m, "val_loss")
        if dense_loss is None or v is None or tol is None:
            add(f"{m}: text loss on par with (or better than) dense ({paper} paper)", MISSING, "text runs missing")
        else:
            d = v - dense_loss["mean"]
            add(f"{m}: text loss on par with (or better than) dense ({paper} paper)", HOLDS if d <= tol else FAILS,
                f"val loss {v:.3f} vs dense {dense_loss['mean']:.3f} ({d:+.3f}; on par = within {tol:.3f})")
    for m in ("s2", "s2-hybrid"):
        if m not in models:
            continue
        v, dv = mean(m, "passkey_acc_mean"), mean("dense", "passkey_acc_mean")
        add(f"{m}: perfect passkey retrieval at every depth (S2 paper)",
            MISSING if v is None else HOLDS if v >= 0.99 else FAILS,
            "passkey runs missing" if v is None else
            f"exact match {v:.2f} (dense {dv:.2f})" if dv is not None else f"exact match {v:.2f}")
    acc = "mqar_acc_mean"
    lin, hyb, den = mean("lightning", acc), mean("hybrid", acc), mean("dense", acc)
    if "lightning" in models and "dense" in models:
        add("lightning: pure linear attention loses recall against dense (Zoology MQAR)",
            _ordered(_get(summary, "lightning", acc), _get(summary, "dense", acc)),
            "mqar runs missing" if lin is None or den is None else
            f"MQAR accuracy {lin:.3f}{rng('lightning', acc)} vs dense {den:.3f}{rng('dense', acc)}")
    if "hybrid" in models and "lightning" in models:
        add("hybrid (LLLA): one softmax layer in four recovers recall that pure linear attention loses",
            _ordered(_get(summary, "lightning", acc), _get(summary, "hybrid", acc)),
            "mqar runs missing" if lin is None or hyb is None else
            f"MQAR accuracy {hyb:.3f}{rng('hybrid', acc)} vs lightning {lin:.3f}{rng('lightning', acc)}"
            + ("" if den is None else f" (dense {den:.3f})"))
    return out


# --------------------------------------------------------------------------------------------------
# tables


def _cell(s: Optional[dict[str, Any]], fmt: str) -> str:
    if s is None:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return format(s["mean"], fmt)
    return f"{format(s['mean'], fmt)} ({format(s['min'], fmt)}-{format(s['max'], fmt)})"


def table_columns(scale_cfg: dict[str, Any], tasks: Sequence[str]) -> list[tuple[str, str, str]]:
    """(metric, header, format) of the table's metric columns."""
    cols = []
    if "text" in tasks:
        cols.append(("val_loss", "text val loss", ".3f"))
    if "mqar" in tasks:
        for p, _, n in scale_cfg["mqar"]["settings"]:
            cols.append((mqar_key(p, n), f"MQAR {p} kv / {n} tok", ".2f"))
    if "passkey" in tasks:
        for d in scale_cfg["passkey"]["depths"]:
            cols.append((passkey_key(d), f"passkey @{d:.2f}", ".2f"))
    return cols


def markdown(report: dict[str, Any], tasks: Sequence[str]) -> str:
    """The report as markdown: stamp, the one table, the claims, the notes."""
    st = report["stamp"]
    sc = report["scale"]
    cols = table_columns(sc, tasks)
    lines = [f"# Quality: equal-parameter tiny models ({st['scale']} scale)", "",
             f"{st['date']} · {st['device']} · torch {st['torch']} · megatron-core {st['megatron_core']} · "
             f"seqpar {st['seqpar']} · seeds {', '.join(map(str, st['seeds']))} (evaluation seed {st['eval_seed']}) · "
             f"{st['wall_s']:.0f} s wall, {st['cpu_s']:.0f} s CPU", "",
             "| model | pattern | non-embedding params (vs dense) | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for m in report["models"]:
        params = m["non_embedding_params"]
        row = [m["name"], f"`{m['pattern']}`", f"{params:,} ({100 * m['params_vs_dense']:+.1f}%)"]
        row += [_cell(_get(report["summary"], m["name"], k), f) for k, _, f in cols]
        lines.append("| " + " | ".join(row) + " |")
    shape = sc["shape"]
    lines += ["", f"Cells: mean over seeds (min-max). Models: {shape['num_layers']} layers, width "
              f"{shape['hidden_size']}, {shape['num_attention_heads']} heads / {shape['num_query_groups']} kv heads, "
              "FFN width per model for equal parameters. Text: validation loss (nats/token, lower is better) on "
              "held-out works. MQAR: answer accuracy (chance = 1 / the value vocabulary). Passkey: whole-key exact "
              "match by needle depth (0 = the start of the sequence)."]
    failed = [r for r in report["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed runs:"] + [f"- {r['task']} / {r['model']} / seed {r['seed']}: {r['error']}" for r in failed]
    if report["claims"]:
        lines += ["", "| the papers' finding | direction here | evidence |", "|---|---|---|"]
        for c in report["claims"]:
            lines.append(f"| {c['claim']} | {c['verdict']} | {c['evidence']} |")
    if report["notes"]:
        lines += [""] + [f"- {n}" for n in report["notes"]]
    if report["plot"]:
        lines += ["", f"![quality]({report['plot']})"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# plot


def plot(report: dict[str, Any], tasks: Sequence[str], path: pathlib.Path) -> Optional[str]:
    """One PNG with a panel per task: text val loss, MQAR accuracy per setting, passkey accuracy by
    depth; every seed drawn as a dot, the mean as the bar / line. Returns the file name, or None
    (and a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = [m["name"] for m in report["models"]]
    runs = [r for r in report["runs"] if r["status"] == "ok"]
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), squeeze=False)
    sc = report["scale"]
    for ax, task in zip(axes[0], tasks):
        if task == "text":
            for i, m in enumerate(models):
                vals = [r["metrics"]["val_loss"] for r in runs if r["task"] == "text" and r["model"] == m]
                if vals:
                    ax.bar(i, sum(vals) / len(vals), color=colors[m], alpha=0.8)
                    ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
            ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
            ax.set_ylabel("validation loss (nats/token)")
            lo = [r["metrics"]["val_loss"] for r in runs if r["task"] == "text"]
            if lo:
                ax.set_ylim(min(lo) - 0.1, max(lo) + 0.1)
            ax.set_title(f"(a) held-out text, {sc['text']['seq_len']} tokens")
        elif task == "mqar":
            settings = sc["mqar"]["settings"]
            width = 0.8 / max(1, len(models))
            for i, m in enumerate(models):
                for j, (p, _, n) in enumerate(settings):
                    vals = [r["metrics"][mqar_key(p, n)] for r in runs if r["task"] == "mqar" and r["model"] == m]
                    if vals:
                        x = j + (i - (len(models) - 1) / 2) * width
                        ax.bar(x, sum(vals) / len(vals), width, color=colors[m], alpha=0.8,
                               label=m if j == 0 else None)
                        ax.scatter([x] * len(vals), vals, color="k", s=6, zorder=3)
            ax.set_xticks(range(len(settings)), [f"{p} kv / {n} tok" for p, _, n in settings])
            ax.set_ylim(0, 1.02)
            ax.set_ylabel("answer accuracy")
            ax.set_title("(b) MQAR associative recall")
            ax.legend(fontsize=7, ncol=2)
        elif task == "passkey":
            depths = sc["passkey"]["depths"]
            for m in models:
                means = []
                for d in depths:
                    vals = [r["metrics"][passkey_key(d)] for r in runs if r["task"] == "passkey" and r["model"] == m]
                    means.append(sum(vals) / len(vals) if vals else float("nan"))
                    ax.scatter([d] * len(vals), vals, color=colors[m], s=8, alpha=0.6)
                ax.plot(depths, means, marker="o", color=colors[m], label=m)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("needle depth (0 = start of the sequence)")
            ax.set_ylabel("whole-key exact match")
            ax.set_title(f"(c) passkey retrieval, {sc['passkey']['seq_len']} tokens")
            ax.legend(fontsize=7)
    st = report["stamp"]
    fig.suptitle(f"seqpar quality, {st['scale']} scale, equal parameters, seeds {st['seeds']} — {st['date'][:10]}, "
                 f"{st['device_type']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def write(report: dict[str, Any], tasks: Sequence[str], out: pathlib.Path) -> dict[str, pathlib.Path]:
    """Validate and write ``quality.json``, ``quality.png`` and ``quality.md`` to ``out``."""
    from seqpar.quality.schema import validate

    out.mkdir(parents=True, exist_ok=True)
    png = out / "quality.png"
    report["plot"] = plot(report, tasks, png)
    if report["plot"] is None:
        report["notes"].append("no plot: matplotlib is not installed (pip install 'seqpar[plots]')")
    validate(report)
    (out / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "quality.md").write_text(markdown(report, tasks))
    return {"json": out / "quality.json", "md": out / "quality.md", "png": png}
