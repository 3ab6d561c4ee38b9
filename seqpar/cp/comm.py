"""Collectives for context parallelism, and the exact byte/call ledger.

This is the only attention-path module that calls ``torch.distributed`` (docs/design.md). Every
strategy talks to its group through one :class:`Comm`, so every byte that crosses a link is
recorded by :func:`comm_ledger` when one is active.

Layout convention (gloo's and NCCL's ``*_tensor`` collectives): a gathered or scattered tensor is
the concatenation of the per-rank pieces along dim 0, ``[world * n, ...]``, rank-major.

Ledger byte convention: ``bytes`` is what *this rank receives from other ranks* for the call, the
algorithmic volume that the closed-form costs in ``scheme_cost`` count:

=================  ==========================================================
all_gather         ``(world - 1) * local.nbytes``
reduce_scatter     ``(world - 1) * output.nbytes`` (the other ranks' pieces)
all_reduce         ``2 (world - 1) / world * nbytes`` (reduce-scatter + all-gather volume)
all_to_all         ``(world - 1) / world * input.nbytes``; variable splits: the rows from other ranks
send_recv          ``recv.nbytes`` for every tensor received point-to-point
=================  ==========================================================

Not recorded, by design: :meth:`Comm.agree`, the validation handshake ``cp.attention`` runs
before any data moves (one int32 all-reduce, plus one object broadcast only when some rank's
input is bad). It carries no attention data, so the ledger and ``scheme_cost`` describe the
attention's traffic alone; count one extra latency-bound call per layer when modelling time.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["Comm", "CommLedger", "CommRecord", "Pending", "all_gather_autograd", "all_to_all_v_autograd", "comm_ledger",
           "group_rank_world",
           "heads_to_seq", "seq_to_heads"]


@dataclass(frozen=True)
class CommRecord:
    """One collective call as seen by this rank."""

    op: str
    bytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(eq=False)  # identity semantics: nested ledgers are removed by identity
class CommLedger:
    """Records of every collective issued through :class:`Comm` while the ledger is active."""

    records: list[CommRecord] = field(default_factory=list)

    def total_bytes(self, op: Optional[str] = None) -> int:
        return sum(r.bytes for r in self.records if op is None or r.op == op)

    def calls(self, op: Optional[str] = None) -> int:
        return sum(1 for r in self.records if op is None or r.op == op)

    def bytes_by_op(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.op] = out.get(r.op, 0) + r.bytes
        return out

    def calls_by_op(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.op] = out.get(r.op, 0) + 1
        return out

    def summary(self) -> dict[str, dict[str, int]]:
        """``{op: {"bytes": total, "calls": n}}``."""
        b, c = self.bytes_by_op(), self.calls_by_op()
        return {op: {"bytes": b[op], "calls": c[op]} for op in b}


# A stack so that nested ledgers (e.g. one per layer inside one per step) all see the calls.
_ACTIVE: list[CommLedger] = []


@contextlib.contextmanager
def comm_ledger() -> Iterator[CommLedger]:
    """Record every collective issued through :class:`Comm` inside the ``with`` block.

    >>> with comm_ledger() as ledger:
    ...     out = cp.attention(q, k, v, kind="softmax", scheme="ring", group=g)
    >>> ledger.summary()   # {"send_recv": {"bytes": ..., "calls": ...}}
    """
    ledger = CommLedger()
    _ACTIVE.append(ledger)
    try:
        yield ledger
    finally:
        _ACTIVE.remove(ledger)


def _record(op: str, nbytes: int, t: torch.Tensor) -> None:
    if _ACTIVE:
        rec = CommRecord(op, int(nbytes), tuple(t.shape), t.dtype)
        for ledger in _ACTIVE:
            ledger.records.append(rec)


def distributed_ready() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def group_rank_world(group) -> tuple[int, int]:
    """``(rank, world)`` of this process in ``group`` (``None`` = the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "group needs an initialized torch.distributed process group; call "
            "torch.distributed.init_process_group first, or pass (rank, world) explicitly"
        )
    return dist.get_rank(group), dist.get_world_size(group)


_SUBGROUPS: dict[tuple, tuple[object, object]] = {}


class Pending:
    """An in-flight collective: ``wait()`` blocks until done and returns the result (a tensor, or
    the list of received tensors for :meth:`Comm.send_recv`)."""

    def __init__(self, result: Any, works: Sequence) -> None:
        self._result = result
        self._works = [w for w in works if w is not None]

    def wait(self) -> Any:
        for w in self._works:
            w.wait()
        self._works = []
        return self._result


def _default_group_timeout() -> Any:
    """The default group's timeout (the recipe's ``parallel.distributed_timeout_s``): ``new_group``
    would otherwise fall back to torch's 30 min default. None (torch's default) if unreadable."""
    pg = dist.distributed_c10d._get_default_group()
    for dev in ("cuda", "cpu"):
        try:
            return pg._get_backend(torch.device(dev)).options._timeout
        except Exception:  # no backend for that device
            continue
    return None


class Comm:
    """Collectives over one process group with rank-major ``[world * n, ...]`` layouts.

    Inputs are made contiguous; outputs are new tensors. Every method that takes ``async_op``
    returns a :class:`Pending` when it is True (the transfer overlaps with later compute), else the
    tensor. These methods carry no autograd; the differentiable wrappers at the end of this module
    (and the ring's ``autograd.Function``) pair each forward collective with its adjoint.
    """

    def __init__(self, group=None) -> None:
        self.group = group
        self.rank, self.world = group_rank_world(group)
        # Global ranks of the group members, needed for point-to-point peers.
        if group is None:
            self._global = list(range(self.world))
        else:
            self._global = [dist.get_global_rank(group, r) for r in range(self.world)]

    def split_2d(self, ulysses_degree: int) -> tuple["Comm", "Comm"]:
        """Sub-communicators for USP: Ulysses groups of ``ulysses_degree`` consecutive group ranks
        and ring groups of the ranks with the same position in their Ulysses group.

        Each rank creates only the two groups it belongs to, with ``use_local_synchronization``, so
        only the members synchronise (a CP group inside a larger data-parallel world works). Groups
        are created once per (group, degree) and cached.
        """
        u = ulysses_degree
        if not isinstance(u, int) or u < 1 or self.world % u:
            raise ValueError(f"ulysses_degree must divide the CP world size {self.world}, got {u!r}")
        key = (tuple(self._global), u)
        if key not in _SUBGROUPS:
            ranks, i, j = self._global, self.rank // u, self.rank % u
            # Ulysses group first, then ring group: the same order on every member keeps creation matched.
            timeout = _default_group_timeout()
            uly = dist.new_group(ranks[i * u:(i + 1) * u], use_local_synchronization=True, timeout=timeout)
            ring = dist.new_group(ranks[j::u], use_local_synchronization=True, timeout=timeout)
            _SUBGROUPS[key] = (uly, ring)
        uly, ring = _SUBGROUPS[key]
        return Comm(uly), Comm(ring)

    def agree(self, error: Optional[str]) -> Optional[tuple[int, str]]:
        """Validation handshake (not in the ledger): every rank passes its local error message or
        None; returns ``(rank, message)`` of the lowest failing rank on *every* rank, or None.

        One int32 all-reduce (MIN of ``rank if failed else world``); the failing rank's message is
        broadcast only when there is one, so a bad input on one rank cannot leave its peers
        waiting in a data collective.
        """
        if self.world == 1:
            return None if error is None else (0, error)
        device = torch.device("cpu")
        if dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([self.world if error is None else self.rank], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        src = int(flag.item())
        if src == self.world:
            return None
        msg = [error]
        dist.broadcast_object_list(msg, src=self._global[src], group=self.group, device=device)
        return src, str(msg[0])

    def collective_device(self) -> torch.device:
        """Where this group's collectives want their tensors (CUDA for NCCL, else CPU)."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def min_code(self, code: torch.Tensor) -> torch.Tensor:
        """Validation only (not in the ledger, like :meth:`agree`): MIN all-reduce of a small int64
        tensor (``cp.step_checks`` packs the lowest failing rank and its check into it)."""
        dev = self.collective_device()
        out = (code if code.device == dev else code.to(dev)).to(torch.int64).contiguous()
        if self.world > 1:
            dist.all_reduce(out, op=dist.ReduceOp.MIN, group=self.group)
        return out

    # -- collectives ---------------------------------------------------------------------------
    def all_gather(self, x: torch.Tensor, *, async_op: bool = False):
        """``x [n, ...]`` on every rank -> ``[world * n, ...]`` (rank r's piece at ``r*n``)."""
        x = x.contiguous()
        out = x.new_empty((self.world * x.shape[0], *x.shape[1:]))
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        work = fn(out, x, group=self.group, async_op=async_op)
        _record("all_gather", (self.world - 1) * x.numel() * x.element_size(), x)
        return Pending(out, [work]) if async_op else out

    def reduce_scatter(self, x: torch.Tensor, *, async_op: bool = False):
        """``x [world * n, ...]`` on every rank -> the sum over ranks of piece ``rank``, ``[n, ...]``."""
        x = x.contiguous()
        if x.shape[0] % self.world:
            raise ValueError(f"reduce_scatter needs dim 0 ({x.shape[0]}) divisible by world ({self.world})")
        out = x.new_empty((x.shape[0] // self.world, *x.shape[1:]))
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        work = fn(out, x, group=self.group, async_op=async_op)
        _record("reduce_scatter", (self.world - 1) * out.numel() * out.element_size(), x)
        return Pending(out, [work]) if async_op else out

    def all_reduce(self, x: torch.Tensor, *, async_op: bool = False):
        """Sum of ``x`` over the group (a new tensor; ``x`` is not modified). Ledger bytes
        ``2 (world-1)/world * x.nbytes`` (a reduce-scatter plus an all-gather of ``x / world``)."""
        out = x.contiguous().clone()
        work = dist.all_reduce(out, group=self.group, async_op=async_op)
        _record("all_reduce", 2 * (self.world - 1) * out.numel() * out.element_size() // self.world, out)
        return Pending(out, [work]) if async_op else out

    def all_to_all(self, x: torch.Tensor, *, async_op: bool = False):
        """``x [world * n, ...]``: piece ``j`` goes to rank j; result piece ``j`` came from rank j."""
        x = x.contiguous()
        if x.shape[0] % self.world:
            raise ValueError(f"all_to_all needs dim 0 ({x.shape[0]}) divisible by world ({self.world})")
        out = torch.empty_like(x)
        work = dist.all_to_all_single(out, x, group=self.group, async_op=async_op)
        _record("all_to_all", (self.world - 1) * (x.numel() // self.world) * x.element_size(), x)
        return Pending(out, [work]) if async_op else out

    def all_to_all_v(self, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int]) -> torch.Tensor:
        """Variable-size all-to-all along dim 0: the first ``send_splits[0]`` rows of ``x`` go to rank
        0, the next ``send_splits[1]`` to rank 1, ...; the result holds ``recv_splits[r]`` rows from
        each rank r, rank-major. Every rank's splits must match its peers' (``send[r→q] = recv[q←r]``)."""
        x = x.contiguous()
        if x.shape[0] != sum(send_splits) or len(send_splits) != self.world or len(recv_splits) != self.world:
            raise ValueError(f"all_to_all_v: {x.shape[0]} rows with send_splits {list(send_splits)}, recv_splits "
                             f"{list(recv_splits)} for world {self.world}")
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x, output_split_sizes=list(recv_splits), input_split_sizes=list(send_splits),
                               group=self.group)
        row = math.prod(x.shape[1:]) * x.element_size()
        _record("all_to_all", (sum(recv_splits) - recv_splits[self.rank]) * row, x)
        return out

    def send_recv(self, send: Sequence[torch.Tensor], dst: int, src: int) -> Pending:
        """Post sends of ``send`` to group rank ``dst`` and receives of same-shaped tensors from
        ``src`` in one batch.

        Returns a :class:`Pending` whose ``wait()`` gives the list of received tensors. Always
        asynchronous: the ring posts the next transfer before computing on the current block.
        """
        send = [t.contiguous() for t in send]
        recv = [torch.empty_like(t) for t in send]
        ops = [dist.P2POp(dist.isend, t, self._global[dst], self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self._global[src], self.group) for t in recv]
        works = dist.batch_isend_irecv(ops) if ops else []
        for t in recv:
            _record("send_recv", t.numel() * t.element_size(), t)
        return Pending(recv, works)

    def exchange(self, send: Optional[torch.Tensor], dst: int, recv_shape: Optional[Sequence[int]], src: int,
                 *, dtype: torch.dtype, device: torch.device) -> Pending:
        """Post a send of ``send`` to group rank ``dst`` and a receive of a ``recv_shape`` tensor from
        ``src`` in one batch; either may be None (nothing posted: a hop with nothing to move costs
        nothing). ``wait()`` gives the received tensor (or None). Always asynchronous."""
        ops, recv = [], None
        if send is not None:
            send = send.contiguous()  # kept alive by the Pending until wait()
            ops.append(dist.P2POp(dist.isend, send, self._global[dst], self.group))
        if recv_shape is not None:
            recv = torch.empty(tuple(recv_shape), dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, recv, self._global[src], self.group))
            _record("send_recv", recv.numel() * recv.element_size(), recv)
        works = dist.batch_isend_irecv(ops) if ops else []
        pending = Pending(recv, works)
        pending.keep = send
        return pending

    def send(self, x: torch.Tensor, dst: int) -> Pending:
        """Post a send of ``x`` to group rank ``dst``; ``wait()`` before reusing ``x``."""
        x = x.contiguous()
        return Pending(x, [dist.isend(x, self._global[dst], self.group)])

    def recv(self, like: torch.Tensor, src: int) -> torch.Tensor:
        """Receive a tensor shaped like ``like`` from group rank ``src`` (blocking)."""
        out = torch.empty_like(like)
        dist.recv(out, self._global[src], self.group)
        _record("send_recv", out.numel() * out.element_size(), out)
        return out

    def ring_pass(self, send: Sequence[torch.Tensor], *, reverse: bool = False) -> Pending:
        """Send to the next rank and receive from the previous one (``reverse`` flips both)."""
        nxt, prv = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        return self.send_recv(send, prv if reverse else nxt, nxt if reverse else prv)


# ---- differentiable collectives (each forward paired with its adjoint) ---------------------------
class _AllGatherSeq(torch.autograd.Function):
    """Forward: all-gather along ``dim`` (rank-major). Backward: reduce-scatter of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
        ctx.comm, ctx.dim = comm, dim
        return comm.all_gather(x.movedim(dim, 0)).movedim(0, dim)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return ctx.comm.reduce_scatter(g.movedim(ctx.dim, 0)).movedim(0, ctx.dim), None, None


def all_gather_autograd(x: torch.Tensor, comm: Comm, dim: int = 0) -> torch.Tensor:
    """All-gather ``x`` along ``dim`` (rank-major); gradients are reduce-scattered back."""
    return _AllGatherSeq.apply(x, comm, dim % x.dim())


class _AllToAllV(torch.autograd.Function):
    """Forward: variable-size all-to-all. Backward: the same with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, send_splits: tuple, recv_splits: tuple) -> torch.Tensor:
        ctx.comm, ctx.splits = comm, (send_splits, recv_splits)
        return comm.all_to_all_v(x, send_splits, recv_splits)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        send_splits, recv_splits = ctx.splits
        return ctx.comm.all_to_all_v(g, recv_splits, send_splits), None, None, None


def all_to_all_v_autograd(x: torch.Tensor, comm: Comm, send_splits: Sequence[int],
                          recv_splits: Sequence[int]) -> torch.Tensor:
    """Differentiable :meth:`Comm.all_to_all_v` (dim 0); gradients return along the reverse splits."""
    return _AllToAllV.apply(x, comm, tuple(send_splits), tuple(recv_splits))


def _seq_to_heads(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    # [b, s_loc, H, d] -> [b, P * s_loc, H / P, d]: head group j goes to rank j, sequences
    # arrive rank-major.
    b, s, h, d = x.shape
    p = comm.world
    y = comm.all_to_all(x.reshape(b, s, p, h // p, d).permute(2, 0, 1, 3, 4))  # [P, b, s, H/P, d]
    return y.permute(1, 0, 2, 3, 4).reshape(b, p * s, h // p, d)


def _heads_to_seq(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    # inverse of _seq_to_heads: [b, P * s_loc, H / P, d] -> [b, s_loc, H, d]
    b, n, hl, d = x.shape
    p = comm.world
    y = comm.all_to_all(x.reshape(b, p, n // p, hl, d).transpose(0, 1))  # [P(head group), b, s, H/P, d]
    return y.permute(1, 2, 0, 3, 4).reshape(b, n // p, p * hl, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return _seq_to_heads(x, comm)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _heads_to_seq(g, ctx.comm), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return _heads_to_seq(x, comm)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _seq_to_heads(g, ctx.comm), None


def seq_to_heads(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Ulysses all-to-all ``[b, s/P, H, d] -> [b, s, H/P, d]`` (rank-major sequence), differentiable."""
    return _SeqToHeads.apply(x, comm)


def heads_to_seq(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Inverse all-to-all ``[b, s, H/P, d] -> [b, s/P, H, d]``, differentiable."""
    return _HeadsToSeq.apply(x, comm)
