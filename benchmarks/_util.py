"""Timing and table helpers shared by the benchmark scripts (not installed)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Callable, Sequence

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Timing(float):
    """A benchmark time in ms: the value is the median over the repetitions; ``.min`` and
    ``.spread`` (median / min) say how much to trust it."""

    min: float
    reps: int

    def __new__(cls, times: Sequence[float]) -> "Timing":
        t = super().__new__(cls, statistics.median(times))
        t.min, t.reps = min(times), len(times)
        return t

    @property
    def spread(self) -> float:
        return float(self) / self.min if self.min > 0 else float("inf")


SPREAD_WARN = 1.25  # median more than 25 % above the best repetition: the machine was busy


def bench(fn: Callable[[], object], device="cpu", warmup: int = 1, reps: int = 5, label: str = "") -> Timing:
    """Wall time of ``fn()`` in milliseconds (CUDA events on GPU) over ``reps`` repetitions: a
    ``Timing`` (the median, with ``.min`` and ``.spread``). Warns on stderr when median / min >
    SPREAD_WARN: such a number says more about the machine's load than about ``fn``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    t = Timing(times)
    if t.reps > 1 and t.spread > SPREAD_WARN:
        print(f"warning: {label or 'benchmark'}: median {float(t):.3g} ms is {t.spread:.2f}x the best of {t.reps} "
              f"repetitions ({t.min:.3g} ms): too noisy to compare (a loaded machine?); rerun on an idle one",
              file=sys.stderr, flush=True)
    return t


def print_table(rows: Sequence[dict], title: str = "") -> None:
    if not rows:
        return
    cols = list(rows[0].keys())
    def fmt(v) -> str:  # a Timing shows its best repetition too: "median (min)"
        if isinstance(v, Timing):
            return f"{float(v):.3g} (min {v.min:.3g})"
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    if title:
        print(f"\n## {title}")
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-+-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


def write_json(path: str | None, payload) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        print(f"wrote {path}")


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
