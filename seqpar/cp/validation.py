"""Validation once per step, not once per layer: zero host syncs per CP attention layer.

``cp.attention`` validates every call on the host (shapes, dtypes, options: no device reads).
What needs the device is

1. the data checks (MoH gates >= 0, Lightning slopes finite and >= 0) and
2. the agreement (``Comm.agree``: one int32 all-reduce read on the host) that makes a bad input
   on one rank raise on every rank instead of leaving the others in a collective.

Outside :func:`step_checks` (one-off calls) both run on every call, as before. Inside it (the
training step wraps forward + backward once):

- data checks are recorded on the device (``seqpar.kernels._common.check_data``) and read once
  when the block exits: one all-reduce + one host read per step; every rank raises the lowest
  failing rank's ValueError;
- the agreement runs only the first time a call signature (kind, scheme, shapes, dtypes, options,
  ``cu_seqlens`` values) is seen on a group: host validation is a pure function of the signature,
  so an agreed signature cannot fail later (steady state: no agreement at all).

``SEQPAR_DEBUG=1`` restores the per-call data checks and agreement inside :func:`step_checks`.

Host syncs per step in steady state (``count_host_syncs`` measures them): 1 (the exit check),
plus 1 per distinct GPU ``cu_seqlens`` tensor (its values are read once and cached on the tensor,
``seqpar.kernels._common.host_ints``), plus, the first time a new packed-document layout is seen,
the host-to-device copy of its index tensors (cached per layout and shared by every layer).
Per layer: 0.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from seqpar.kernels._common import deferred_data_checks, host_ints

__all__ = ["debug_enabled", "step_checks"]


def debug_enabled() -> bool:
    """``SEQPAR_DEBUG=1``: validate data and agree on every cp.attention call."""
    return os.environ.get("SEQPAR_DEBUG", "0").lower() in ("1", "true", "yes", "on")


@dataclass(eq=False)
class _Step:
    group: Any
    flags: list = field(default_factory=list)


_STEPS: list[_Step] = []
_AGREED: set = set()


def in_step() -> bool:
    """True inside :func:`step_checks` (and not in debug mode): defer data checks, agree once per signature."""
    return bool(_STEPS) and not debug_enabled()


def _sig(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, str(x.device))
    if isinstance(x, (int, float, str, bool, type(None))):
        return x
    try:
        hash(x)
        return x
    except TypeError:
        return ("id", id(x))


def signature(kind: str, scheme: str, balance: str, world: int, q, k, v, kw: dict) -> tuple:
    """Everything host validation depends on (``cu_seqlens`` by value, cached host read)."""
    items = []
    for name in sorted(kw):
        val = kw[name]
        if name.startswith("cu_seqlens") and isinstance(val, torch.Tensor):
            items.append((name, _sig(val), host_ints(val)))
        else:
            items.append((name, _sig(val)))
    return (kind, scheme, balance, world, _sig(q), _sig(k), _sig(v), tuple(items))


def needs_agreement(group: Any, sig: tuple) -> bool:
    """False when ``sig`` was already agreed on ``group`` inside a step (then the call skips it)."""
    return not in_step() or (id(group) if group is not None else None, sig) not in _AGREED


def mark_agreed(group: Any, sig: Optional[tuple]) -> None:
    if sig is not None:
        if len(_AGREED) > 4096:
            _AGREED.clear()
        _AGREED.add((id(group) if group is not None else None, sig))


@contextlib.contextmanager
def step_checks(group: Any = None) -> Iterator[None]:
    """Wrap one training step (forward + backward): CP attention layers inside make no host syncs.

    Data checks are collected on the device and, when the block exits without an exception,
    checked with one MIN all-reduce over ``group`` (default: the whole world; a single process
    needs no process group) and one host read; every rank then raises the lowest failing rank's
    ``ValueError``. Call signatures are agreed once per group (first step), not per layer.

    >>> with cp.step_checks():
    ...     loss = model(batch).sum()
    ...     loss.backward()
    """
    step = _Step(group)
    _STEPS.append(step)
    try:
        with deferred_data_checks() as flags:
            yield
            step.flags = list(flags)
    finally:
        _STEPS.remove(step)
    _check_flags(step.flags, group)


_BASE = 1 << 32  # code = failing rank * _BASE + index of its first failing check


def _check_flags(flags: list, group: Any) -> None:
    from seqpar.cp.comm import Comm, distributed_ready

    comm = Comm(group) if distributed_ready() else None
    if not flags and comm is None:
        return
    rank, world = (comm.rank, comm.world) if comm is not None else (0, 1)
    dev = flags[0][0].device if flags else comm.collective_device()
    if flags:
        bad = torch.stack([f for f, _ in flags])  # bool [n] on the device, no host read
        src = torch.where(bad.any(), torch.full((), rank, device=dev), torch.full((), world, device=dev))
        code = (src.to(torch.int64) * _BASE + bad.to(torch.int64).argmax()).reshape(1)
    else:  # nothing recorded here; still take part so that no peer is left waiting
        code = torch.full((1,), world * _BASE, dtype=torch.int64, device=dev)
    if comm is not None:
        code = comm.min_code(code)  # one MIN all-reduce over the group
    src_v, idx = divmod(int(code.item()), _BASE)  # the one host read of the step
    if src_v >= world:
        return
    msg = flags[idx][1] if idx < len(flags) and flags[idx][1] else \
        "a data check of cp.attention failed (rerun with SEQPAR_DEBUG=1 for the failing layer and value)"
    raise ValueError(f"{msg} (found by cp.step_checks on rank {src_v})")
