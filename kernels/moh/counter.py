"""Computed-pairs counter: proof that MoH skips the (token, head) pairs whose gate is 0.

Counting is a debug mode: while a :func:`count_computed_pairs` block is open, the Triton kernels
``tl.atomic_add`` the number of (token, head) rows each program computes into a device counter
(forward kernel, and the backward dq kernel, which visits every row whose gradient is computed),
and the torch fallback adds the number of rows it gathers. Outside such a block nothing is counted
and the kernels compile without the atomic.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional


@dataclass
class PairCounter:
    """(token, head) pairs computed since the block opened, summed over calls."""

    forward: int = 0
    backward: int = 0


_ACTIVE: list[PairCounter] = []


@contextlib.contextmanager
def count_computed_pairs() -> Iterator[PairCounter]:
    """Count the (token, head) pairs that MoH attention computes inside the block.

    >>> with count_computed_pairs() as c:
    ...     o = moh_attention(q, k, v, gates)
    ...     o.sum().backward()
    >>> c.forward == c.backward == int((gates > 0).sum())
    True

    Counting synchronises the device after every launch; use it in tests, not in training.
    """
    counter = PairCounter()
    _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE.remove(counter)


def active_counter() -> Optional[PairCounter]:
    """The innermost open counter, or None when not counting."""
    return _ACTIVE[-1] if _ACTIVE else None
