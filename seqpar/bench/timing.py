"""Timing discipline of the benchmark harness (one place; every suite times through here).

* Threads are set explicitly: :func:`set_threads` (1 per process on CPU unless asked otherwise),
  recorded in the report's stamp.
* Compared cases are interleaved: every repetition runs each case once, in a rotated order, so a
  load spike on a shared machine hits every case instead of one.
* >= 5 repetitions (:data:`MIN_REPS`); each case reports min / median / max, and a case whose
  median is more than :data:`SPREAD_FLAG` x its best repetition is flagged ``noisy``.
* On CUDA, one repetition is CUDA events around ``inner`` back-to-back calls (``inner`` chosen so a
  repetition lasts >= :data:`CUDA_REP_MS`), so Python launch cost is hidden behind the queued work
  and not timed; the time reported is per call.
* A case that raises is reported (``error``) and dropped from the later repetitions; the others
  still run.
* Peak memory: one extra, untimed call per case: on CUDA the allocator's peak above the memory in
  use before the call; on CPU the peak bytes of the tensors that torch ops allocate during the call
  (:class:`PeakTensorBytes`), inputs excluded.
"""

from __future__ import annotations

import math
import statistics
import time
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIN_REPS = 5
SPREAD_FLAG = 1.25  # median > 1.25 x the best repetition: the machine was busy, do not compare
CUDA_REP_MS = 20.0  # one CUDA repetition lasts at least this long (events around several calls)
CUDA_MAX_INNER = 100


def set_threads(n: Optional[int] = None) -> int:
    """Set torch's intra-op threads explicitly (default 1: the harness times one process per
    core on CPU; on CUDA the host threads only launch kernels) and return the count used."""
    n = 1 if n is None else int(n)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Stats:
    """Milliseconds per call over the repetitions."""

    min: float
    median: float
    max: float
    reps: int
    inner: int = 1

    @property
    def spread(self) -> float:
        return self.median / self.min if self.min > 0 else math.inf

    @property
    def noisy(self) -> bool:
        return self.reps > 1 and self.spread > SPREAD_FLAG

    @classmethod
    def of(cls, times: Sequence[float], inner: int = 1) -> "Stats":
        return cls(min(times), statistics.median(times), max(times), len(times), inner)

    def as_dict(self) -> dict[str, Any]:
        return {"min": self.min, "median": self.median, "max": self.max, "reps": self.reps, "inner": self.inner,
                "spread": self.spread, "noisy": self.noisy}


@dataclass
class Case:
    """One compared implementation: ``fn()`` runs one call (forward, or forward + backward)."""

    name: str
    fn: Callable[[], Any]
    stats: Optional[Stats] = None
    peak_mem_mib: Optional[float] = None
    error: Optional[str] = None
    first_call_s: Optional[float] = None  # warm-up wall time (includes compilation, if any)
    memory: bool = True  # False: no peak-memory pass (compiled code on CPU: it cannot run under a dispatch mode)
    extra: dict[str, Any] = field(default_factory=dict)


def _error(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" ({last.filename.rsplit('/', 1)[-1]}:{last.lineno})" if last else ""
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}{where}"


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by torch ops while the mode is active (storages are
    counted once, views and in-place results share them; a storage leaves the count when it is
    freed). The CPU stand-in for ``torch.cuda.max_memory_allocated``."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        n = self.live.pop(key, None)
        if n is not None:
            self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n == 0 or key in self.live:
                    continue
                self.live[key] = n
                self.current += n
                self.peak = max(self.peak, self.current)
                weakref.finalize(st, self._free, key)
        return out


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory (MiB) that one call of ``fn`` allocates above what was in use before it."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with PeakTensorBytes() as m:
        fn()
    return m.peak / 2**20


def _time_once(fn: Callable[[], Any], device: torch.device, inner: int) -> float:
    """Milliseconds per call of ``inner`` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def measure(cases: Sequence[Case], device: torch.device, *, reps: int = MIN_REPS, warmup: int = 1,
            memory: bool = True) -> list[Case]:
    """Time ``cases`` interleaved (see the module docstring); fills ``stats``, ``peak_mem_mib``,
    ``first_call_s`` or ``error`` in place and returns the cases."""
    if reps < MIN_REPS:
        raise ValueError(f"reps must be >= {MIN_REPS} (min / median / max need them), got {reps}")
    live: list[Case] = []
    inner: dict[str, int] = {}
    for c in cases:  # warm-up: compiles, caches plans, picks inner; a failure is that case's result
        try:
            t0 = time.perf_counter()
            c.fn()
            sync(device)
            c.first_call_s = time.perf_counter() - t0
            for _ in range(warmup - 1):
                c.fn()
            one = _time_once(c.fn, device, 1)
            inner[c.name] = (min(CUDA_MAX_INNER, max(1, math.ceil(CUDA_REP_MS / max(one, 1e-3))))
                             if device.type == "cuda" else 1)
            live.append(c)
        except Exception as e:  # noqa: BLE001 - reported per case, the others run
            c.error = _error(e)
    times: dict[str, list[float]] = {c.name: [] for c in live}
    for r in range(reps):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for c in order:
            if c.error is not None:
                continue
            try:
                times[c.name].append(_time_once(c.fn, device, inner[c.name]))
            except Exception as e:  # noqa: BLE001
                c.error = _error(e)
    for c in live:
        if c.error is None:
            c.stats = Stats.of(times[c.name], inner[c.name])
            if memory and c.memory:
                try:
                    c.peak_mem_mib = peak_memory_mib(c.fn, device)
                except Exception as e:  # noqa: BLE001 - e.g. a compiled graph under a dispatch mode
                    c.extra["peak_mem_error"] = _error(e)
    return list(cases)
