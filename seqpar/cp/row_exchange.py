"""Move exactly the K/V rows a rank's queries read: one variable-size all-to-all into one buffer.

Shared by two schemes that differ only in *which* rows a rank's queries read:

- the S2 stride-aware exchange (:mod:`seqpar.cp.s2_exchange`): rows are ``(kv head, token)``
  pairs chosen by the S2 block mask (``groups = H_kv``);
- all-gather with a sliding window (:mod:`seqpar.cp.allgather`): rows are whole tokens (every kv
  head), the window's halo before each query piece (``groups = 1``).

A scheme gives ``needed(receiver)``: the int64 rows ``real token * groups + g`` held by *other*
ranks that ``receiver``'s queries read (host, any fixed order). From it this module builds, once per
(partition, scheme key, rank), the send index and splits, the receive splits and where each
received row and each own row lands in the receiver's buffer (index tensors moved to the device
once), and runs the exchange: one :func:`seqpar.cp.comm.all_to_all_v_autograd` (backward: the
same all-to-all with the splits reversed) and two in-place ``index_copy_`` into one zero-filled
buffer (backward: their adjoint gathers, by autograd).

The buffer is either the real order up to the end of the rank's last piece (``compact=False``:
S2 reads each document's keys from its start, unread rows stay 0) or only the real tokens the
rank needs, sorted (``compact=True``: the window reads one contiguous run of them per query piece;
:meth:`RowPlan.at` maps a real token to its buffer row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Optional

import torch

from seqpar.cp.comm import Comm, all_to_all_v_autograd
from seqpar.cp.partition import Layout, cached_index

Needed = Callable[[int], torch.Tensor]


def owner(lay: Layout) -> torch.Tensor:
    """int64 ``[real_len]``: the rank holding each real token."""
    return lay.cached("owner", lambda: lay.real_slots // lay.local_len)


def row_counts(lay: Layout, needed: Needed, groups: int) -> tuple[tuple[int, ...], ...]:
    """``counts[q][r]``: rows rank ``q`` receives from rank ``r`` (0 on the diagonal)."""
    own = owner(lay)
    return tuple(tuple(int(c) for c in torch.bincount(own[needed(q) // groups], minlength=lay.world))
                 for q in range(lay.world))


def extent(lay: Layout, rank: int) -> int:
    """Buffer tokens (real order) the rank's pieces need: up to the end of its last piece."""
    return max((p.real + p.length for p in lay.pieces[rank]), default=0)


def own_tokens(lay: Layout, rank: int) -> torch.Tensor:
    """int64 real tokens of ``rank``'s pieces, in its local piece order."""
    return torch.cat([torch.arange(p.real, p.real + p.length) for p in lay.pieces[rank]]
                     or [torch.zeros(0, dtype=torch.int64)])


@dataclass(frozen=True)
class RowPlan:
    send_idx: torch.Tensor   # local rows (slot * groups + g) to send, grouped by destination rank
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    recv_rows: torch.Tensor  # buffer rows of the received rows, by source rank
    own_local: Optional[torch.Tensor]  # local rows of this rank's real tokens (None: every row)
    own_rows: torch.Tensor   # their buffer rows
    length: int              # buffer tokens
    tokens: Optional[torch.Tensor] = None  # compact buffer: its real tokens, sorted (host); None: real order
    moves: bool = True       # some rank receives something (else no collective runs at all)

    def at(self, real: int) -> int:
        """Buffer token of real token ``real`` (host; compact buffers hold only needed tokens)."""
        return real if self.tokens is None else int(torch.searchsorted(self.tokens, real))


def _host_plan(lay: Layout, needed: Needed, groups: int, rank: int, compact: bool) -> RowPlan:
    own = owner(lay)
    slot = lay.real_slots % lay.local_len
    g = torch.arange(groups)[None, :]
    send, splits = [], []
    for q in range(lay.world):
        rows = needed(q) if q != rank else torch.zeros(0, dtype=torch.int64)
        rows = rows[own[rows // groups] == rank]  # in the receiver's order: both sides agree
        send.append(slot[rows // groups] * groups + rows % groups)
        splits.append(rows.numel())
    mine = needed(rank)
    recv = torch.cat([mine[own[mine // groups] == r] for r in range(lay.world)])
    real = own_tokens(lay, rank)
    own_rows = (real[:, None] * groups + g).reshape(-1)
    own_local = None if lay.dense(rank) else (lay.local_slots(rank)[:, None] * groups + g).reshape(-1)
    tokens = None
    length = extent(lay, rank)
    if compact:
        tokens = torch.unique(torch.cat([mine // groups, real]))  # sorted

        def to_buffer(r: torch.Tensor) -> torch.Tensor:
            return torch.searchsorted(tokens, r // groups) * groups + r % groups
        recv, own_rows, length = to_buffer(recv), to_buffer(own_rows), tokens.numel()
    moves = any(needed(r).numel() for r in range(lay.world))
    return RowPlan(torch.cat(send), tuple(splits), tuple(int(n) for n in torch.bincount(
        own[mine // groups], minlength=lay.world)), recv, own_local, own_rows, length, tokens, moves)


def row_plan(lay: Layout, key: Hashable, needed: Needed, groups: int, rank: int, device: torch.device,
             *, compact: bool = False) -> RowPlan:
    """The exchange plan of ``rank`` with its index tensors on ``device``; host part cached on the
    layout under ``key`` (which must identify ``needed`` and ``groups``), device part per device."""
    host = lay.cached((key, rank, compact), lambda: _host_plan(lay, needed, groups, rank, compact))

    def move() -> tuple:
        return tuple(t for t in (host.send_idx, host.recv_rows, host.own_rows, host.own_local) if t is not None)
    moved = cached_index((key, lay, rank, compact), device, move)
    return RowPlan(moved[0], host.send_splits, host.recv_splits, moved[1], moved[3] if len(moved) > 3 else None,
                   moved[2], host.length, host.tokens, host.moves)


def exchange(kv: torch.Tensor, comm: Comm, plan: RowPlan) -> torch.Tensor:
    """Local ``kv [b, L, groups, w]`` -> the rank's buffer ``[b, plan.length, groups, w]``: its own
    rows and the rows it receives in place, every other row 0 (autograd-exact). One all-to-all,
    none when no rank receives anything (:func:`exchange_cost` records the same)."""
    b, n, groups, w = kv.shape
    rows = kv.reshape(b, n * groups, w)
    full = kv.new_zeros((b, plan.length * groups, w))
    if plan.moves:  # the same on every rank (a function of the partition)
        send = rows.transpose(0, 1).index_select(0, plan.send_idx)  # [R_send, b, w], one copy
        recv = all_to_all_v_autograd(send, comm, plan.send_splits, plan.recv_splits)  # [R_recv, b, w]
        full.index_copy_(1, plan.recv_rows, recv.transpose(0, 1))
    full.index_copy_(1, plan.own_rows, rows if plan.own_local is None else rows.index_select(1, plan.own_local))
    return full.view(b, plan.length, groups, w)


def exchange_cost(counts: tuple[tuple[int, ...], ...], rank: int, row_bytes: int) -> Optional[tuple[int, int]]:
    """``(forward, backward)`` bytes ``rank`` receives in :func:`exchange` (``row_bytes`` per row), or
    None when the exchange moves nothing anywhere (no call)."""
    if not any(map(any, counts)):
        return None
    return sum(counts[rank]) * row_bytes, sum(c[rank] for c in counts) * row_bytes
