"""What every suite shares: the run context, a suite's result, and timing a group of compared
implementations into schema rows."""

from __future__ import annotations

import functools
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from seqpar.bench.timing import Case, measure


@dataclass
class Context:
    """One harness run: device, shape set, repetitions, output folder, per-suite time budget."""

    device: torch.device
    size: str  # "smoke" | "cpu" | "gpu"
    reps: int
    out: pathlib.Path
    stamp_line: str
    budget_s: Optional[float] = None
    seqs: Optional[list[int]] = None  # override of a kernel suite's sequence lengths
    # called with each timed group's rows as soon as they are measured (the runner keeps a partial
    # report on disk, so a run stopped from outside, e.g. by a phase timeout, keeps what it measured)
    progress: Optional[Callable[[list[dict[str, Any]]], None]] = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class SuiteResult:
    """What a suite returns (the runner adds name, status and time)."""

    title: str
    results: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    missing: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def miss(self, impl: str, reason: str) -> None:
        """A baseline that cannot run here: printed now and kept in the report."""
        if not any(m["impl"] == impl for m in self.missing):
            print(f"missing baseline: {impl}: {reason}", flush=True)
            self.missing.append({"impl": impl, "reason": reason})

    def over_budget(self, ctx: Context, what: str) -> bool:
        """True (and a note) when the suite's time budget is spent: the rest is skipped, said so."""
        if ctx.budget_s is not None and time.perf_counter() - self.started > ctx.budget_s:
            note = f"time budget of {ctx.budget_s:.0f} s spent: skipped {what} and the rest"
            if note not in self.notes:
                print(note, flush=True)
                self.notes.append(note)
            return True
        return False


@dataclass
class Impl:
    """One implementation in a compared group: ``fn()`` runs one call; ``flops`` per call."""

    name: str
    fn: Callable[[], Any]
    flops: Optional[float] = None
    params: dict[str, Any] = field(default_factory=dict)
    memory: bool = True  # measure peak memory (see seqpar.bench.timing.Case.memory)


def plotter(fn: Callable) -> Callable:
    """A suite's plot function ``fn(ctx, res, ...)``: a failure becomes a note of ``res``, never the
    loss of the suite's numbers."""

    @functools.wraps(fn)
    def run(ctx: Context, res: SuiteResult, *args, **kwargs) -> None:
        try:
            fn(ctx, res, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            note = f"plot {fn.__name__} failed: {type(e).__name__}: {e}"
            print(note, flush=True)
            res.notes.append(note)

    return run


def time_group(ctx: Context, group: str, mode: str, impls: Sequence[Impl], params: dict[str, Any]) -> list[dict]:
    """Time ``impls`` interleaved; one schema ``Result`` dict per implementation."""
    cases = measure([Case(i.name, i.fn, memory=i.memory) for i in impls], ctx.device, reps=ctx.reps)
    rows = []
    for impl, c in zip(impls, cases):
        row: dict[str, Any] = {"group": group, "impl": impl.name, "mode": mode, "params": {**params, **impl.params},
                               "status": "ok" if c.error is None else "error", "error": c.error,
                               "ms": c.stats.as_dict() if c.stats else None, "flops": impl.flops,
                               "tflops": (impl.flops / (c.stats.median * 1e9) if impl.flops and c.stats else None),
                               "peak_mem_mib": c.peak_mem_mib, "first_call_s": c.first_call_s, "metrics": {}}
        if "peak_mem_error" in c.extra:
            row["params"]["peak_mem_error"] = c.extra["peak_mem_error"]
        rows.append(row)
    if ctx.progress is not None:
        ctx.progress(rows)
    return rows


def grad_call(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
              grad_out: Optional[torch.Tensor] = None) -> Callable[[], Any]:
    """A forward + backward call of ``fn(*inputs)`` (gradients returned, never accumulated)."""

    def run():
        out = fn(*inputs)
        return torch.autograd.grad(out, list(inputs), grad_out if grad_out is not None else torch.ones_like(out))

    return run


def fwd_call(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            return fn(*inputs)

    return run


def median_ms(row: dict) -> Optional[float]:
    return row["ms"]["median"] if row.get("ms") else None
