"""Sequence partitioners for context parallelism (pure index math; no collectives here).

``balance="contiguous"``: the sequence is cut into ``P`` equal chunks, rank r holds chunk r.
``balance="zigzag"``: cut into ``2P`` equal chunks, rank r holds chunks ``r`` and ``2P-1-r``
(Megatron's CP order), so causal work is equal on every rank::

    P = 2, 2P = 4 chunks        seq: | c0 | c1 | c2 | c3 |
                                rank 0 holds c0 + c3, rank 1 holds c1 + c2

Varlen (packed documents, ``cu_seqlens``) uses Megatron's THD layout: *each document* is cut into
``2P`` pieces and rank r holds pieces ``r`` and ``2P-1-r`` of every document, documents kept in
order. Every document length must be a multiple of ``2P``; :func:`pad_varlen` pads them and
returns how much it added (nothing is padded silently).

``unshard`` is the only function here that communicates, through :class:`seqpar.cp.comm.Comm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch

from seqpar.cp.comm import Comm, group_rank_world
from seqpar.kernels._common import host_ints, seed_host_ints

__all__ = [
    "BALANCES", "VarlenPadding", "chunk_ids", "num_chunks", "token_index", "shard", "unshard",
    "varlen_token_index", "shard_varlen", "unshard_varlen", "pad_varlen", "unpad_varlen",
    "cached_index", "causal_work", "check_varlen", "imbalance", "resolve_group",
]

BALANCES = ("zigzag", "contiguous")
GroupLike = Union[None, object, tuple[int, int]]


def _check_balance(balance: str) -> None:
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")


def _check_rank(rank: int, world: int) -> None:
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"need 0 <= rank < world with world >= 1, got rank={rank!r}, world={world!r}")


def resolve_group(group: GroupLike) -> tuple[int, int]:
    """``(rank, world)`` from an explicit ``(rank, world)`` tuple or a process group."""
    if isinstance(group, tuple):
        if len(group) != 2:
            raise ValueError(f"group as a tuple must be (rank, world), got {group!r}")
        rank, world = group
        _check_rank(rank, world)
        return rank, world
    return group_rank_world(group)


def num_chunks(world: int, balance: str = "zigzag") -> int:
    """Equal chunks the sequence is cut into: ``2P`` for zigzag, ``P`` for contiguous."""
    _check_balance(balance)
    return 2 * world if balance == "zigzag" else world


def chunk_ids(rank: int, world: int, balance: str = "zigzag") -> tuple[int, ...]:
    """Global chunk ids held by ``rank``, in the order they are stored locally."""
    _check_balance(balance)
    _check_rank(rank, world)
    return (rank, 2 * world - 1 - rank) if balance == "zigzag" else (rank,)


def _chunk_len(seq_len: int, world: int, balance: str, what: str = "sequence length") -> int:
    n = num_chunks(world, balance)
    if seq_len % n:
        fix = -(-seq_len // n) * n
        raise ValueError(
            f"{what} {seq_len} is not divisible by {n} ({'2*world' if balance == 'zigzag' else 'world'} "
            f"with world={world}, balance={balance!r}); pad it to {fix}"
            + (" or use balance='contiguous'" if balance == "zigzag" and seq_len % world == 0 else "")
        )
    return seq_len // n


def token_index(rank: int, world: int, seq_len: int, balance: str = "zigzag") -> torch.Tensor:
    """Global positions (int64) of the tokens ``rank`` holds, in local order."""
    c = _chunk_len(seq_len, world, balance)
    return torch.cat([torch.arange(i * c, (i + 1) * c) for i in chunk_ids(rank, world, balance)])


def shard(x: torch.Tensor, group: GroupLike, dim: int = 1, balance: str = "zigzag") -> torch.Tensor:
    """This rank's part of the full tensor ``x`` along ``dim`` (default the seq dim of
    ``[batch, seq, heads, dim]``). ``group`` is a process group (``None`` = default) or an explicit
    ``(rank, world)`` tuple. Returns a contiguous copy.
    """
    rank, world = resolve_group(group)
    _check_balance(balance)
    dim = dim % x.dim()
    c = _chunk_len(x.shape[dim], world, balance, f"x.shape[{dim}]")
    parts = [x.narrow(dim, i * c, c) for i in chunk_ids(rank, world, balance)]
    return torch.cat(parts, dim=dim).contiguous()


def unshard(x_local: torch.Tensor, group=None, dim: int = 1, balance: str = "zigzag") -> torch.Tensor:
    """Inverse of :func:`shard`: all-gather every rank's part and restore sequence order.

    Differentiable: every rank gets the full tensor as its own copy, so the gradient of
    ``x_local`` is this rank's :func:`shard` of the incoming gradient (no communication in
    backward); a loss computed identically on every rank gives each rank its single-device grads.
    """
    if isinstance(group, tuple):
        raise ValueError("unshard needs a process group (it all-gathers); got a (rank, world) tuple")
    _check_balance(balance)
    comm = Comm(group)
    dim = dim % x_local.dim()
    per_rank = len(chunk_ids(0, comm.world, balance))
    if x_local.shape[dim] % per_rank:
        raise ValueError(f"x_local.shape[{dim}] = {x_local.shape[dim]} must be divisible by {per_rank} "
                         f"(chunks per rank for balance={balance!r})")
    return _Unshard.apply(x_local, comm, dim, balance)


class _Unshard(torch.autograd.Function):
    """Forward: all-gather + sequence order. Backward: this rank's shard of the gradient."""

    @staticmethod
    def forward(ctx, x_local: torch.Tensor, comm: Comm, dim: int, balance: str) -> torch.Tensor:
        ctx.rank_world, ctx.dim, ctx.balance = (comm.rank, comm.world), dim, balance
        per_rank = len(chunk_ids(0, comm.world, balance))
        c = x_local.shape[dim] // per_rank
        gathered = comm.all_gather(x_local.movedim(dim, 0))  # [world * local, ...]
        chunks: dict[int, torch.Tensor] = {}
        for r in range(comm.world):
            for j, cid in enumerate(chunk_ids(r, comm.world, balance)):
                start = r * per_rank * c + j * c
                chunks[cid] = gathered[start:start + c]
        ordered = [chunks[i] for i in range(num_chunks(comm.world, balance))]
        return torch.cat(ordered, 0).movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return shard(g, ctx.rank_world, dim=ctx.dim, balance=ctx.balance), None, None, None


# ---- index tensors, built once per shape and kept on the device ---------------------------------
_DEVICE_INDEX: dict = {}


def cached_index(key: tuple, device: torch.device, build) -> Any:
    """``build()`` (host index math returning a tensor or a tuple of them) once per ``(key, device)``,
    moved to ``device`` and cached: every layer of every step reuses it, with no host work or
    host-to-device copy. ``key`` must hold everything the result depends on."""
    full = (key, str(device))
    hit = _DEVICE_INDEX.get(full)
    if hit is None:
        out = build()
        hit = tuple(t.to(device) for t in out) if isinstance(out, tuple) else out.to(device)
        if len(_DEVICE_INDEX) > 256:
            _DEVICE_INDEX.clear()
        _DEVICE_INDEX[full] = hit
    return hit


# ---- varlen (THD) -------------------------------------------------------------------------------
def _doc_lens(cu_seqlens: torch.Tensor) -> list[int]:
    # host values read once per tensor (cached on it): no sync per layer
    c = host_ints(cu_seqlens) if cu_seqlens.dim() == 1 else ()
    if len(c) < 2 or c[0] != 0 or any(b <= a for a, b in zip(c[:-1], c[1:])):
        raise ValueError(f"cu_seqlens must be a 1-D [0, ..., seq] strictly increasing, got {cu_seqlens.tolist()}")
    return [b - a for a, b in zip(c[:-1], c[1:])]


def check_varlen(cu_seqlens: torch.Tensor, world: int) -> None:
    """ValueError unless every document length is divisible by ``2 * world`` (per-document zigzag)."""
    bad = [(i, n) for i, n in enumerate(_doc_lens(cu_seqlens)) if n % (2 * world)]
    if bad:
        raise ValueError(
            f"varlen zigzag needs every document length divisible by 2*world = {2 * world}; documents "
            f"(index, length) {bad[:8]} are not; call seqpar.cp.pad_varlen(x, cu_seqlens, {2 * world}) first"
        )


def varlen_token_index(cu_seqlens: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document zigzag: global positions held by ``rank`` and its local int32 ``cu_seqlens``.

    Every document length must be divisible by ``2 * world`` (see :func:`pad_varlen`).
    """
    _check_rank(rank, world)
    check_varlen(cu_seqlens, world)
    lens = _doc_lens(cu_seqlens)
    idx, local, start = [], [0], 0
    for n in lens:
        c = n // (2 * world)
        for cid in (rank, 2 * world - 1 - rank):
            idx.append(torch.arange(start + cid * c, start + (cid + 1) * c))
        local.append(local[-1] + 2 * c)
        start += n
    return torch.cat(idx), seed_host_ints(torch.tensor(local, dtype=torch.int32, device=cu_seqlens.device), local)


def shard_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, group: GroupLike,
                 dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's THD shard of packed ``x`` and its local ``cu_seqlens`` (per-document zigzag)."""
    rank, world = resolve_group(group)
    dim = dim % x.dim()
    if int(cu_seqlens[-1]) != x.shape[dim]:
        raise ValueError(f"cu_seqlens[-1] = {int(cu_seqlens[-1])} must equal x.shape[{dim}] = {x.shape[dim]}")
    idx, local_cu = varlen_token_index(cu_seqlens, rank, world)
    return x.index_select(dim, idx.to(x.device)).contiguous(), local_cu


def unshard_varlen(x_local: torch.Tensor, cu_seqlens: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_varlen` (``cu_seqlens`` is the *global* one). Differentiable like
    :func:`unshard`: the gradient is this rank's :func:`shard_varlen` of the incoming gradient."""
    if isinstance(group, tuple):
        raise ValueError("unshard_varlen needs a process group (it all-gathers); got a (rank, world) tuple")
    return _UnshardVarlen.apply(x_local, cu_seqlens, Comm(group), dim % x_local.dim())


class _UnshardVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local: torch.Tensor, cu_seqlens: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
        ctx.rank_world, ctx.dim, ctx.cu = (comm.rank, comm.world), dim, cu_seqlens
        gathered = comm.all_gather(x_local.movedim(dim, 0))
        idx = torch.cat([varlen_token_index(cu_seqlens, r, comm.world)[0] for r in range(comm.world)])
        out = torch.empty_like(gathered)
        out[idx.to(out.device)] = gathered
        return out.movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return shard_varlen(g, ctx.cu, ctx.rank_world, dim=ctx.dim)[0], None, None, None


@dataclass(frozen=True)
class VarlenPadding:
    """Result of :func:`pad_varlen`: the padded tensor, its ``cu_seqlens``, the padding added to
    each document (at its end), and the original ``cu_seqlens`` to undo it with :func:`unpad_varlen`.
    """

    x: torch.Tensor
    cu_seqlens: torch.Tensor
    pad_per_doc: tuple[int, ...]
    original_cu_seqlens: torch.Tensor

    @property
    def total_pad(self) -> int:
        return sum(self.pad_per_doc)


def pad_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, multiple: int, dim: int = 1,
               value: float = 0.0) -> VarlenPadding:
    """Pad every packed document at its end to a multiple of ``multiple`` (``2 * world`` for zigzag).

    Padding sits after each document's real tokens, so under causal attention no real token sees a
    pad; drop pad outputs with :func:`unpad_varlen`. Returns how much was added per document.
    Lightning keeps decaying its state through pads: pass ``original_cu_seqlens`` as
    ``cu_seqlens_unpadded=`` (``cp.attention`` / ``lightning_attention``) to get each document's
    final state at its last real token.
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    dim = dim % x.dim()
    lens = _doc_lens(cu_seqlens)
    if sum(lens) != x.shape[dim]:
        raise ValueError(f"cu_seqlens[-1] = {sum(lens)} must equal x.shape[{dim}] = {x.shape[dim]}")
    pads = tuple((-n) % multiple for n in lens)
    pieces, start = [], 0
    for n, p in zip(lens, pads):
        pieces.append(x.narrow(dim, start, n))
        if p:
            shape = list(x.shape)
            shape[dim] = p
            pieces.append(x.new_full(shape, value))
        start += n
    new_lens = [n + p for n, p in zip(lens, pads)]
    cu = torch.tensor([0] + torch.tensor(new_lens).cumsum(0).tolist(), dtype=torch.int32, device=cu_seqlens.device)
    return VarlenPadding(torch.cat(pieces, dim), cu, pads, cu_seqlens)


def unpad_varlen(x_padded: torch.Tensor, padding: VarlenPadding, dim: int = 1) -> torch.Tensor:
    """Drop the padding :func:`pad_varlen` added (works on outputs and gradients alike)."""
    dim = dim % x_padded.dim()
    lens = _doc_lens(padding.original_cu_seqlens)
    starts = padding.cu_seqlens.detach().to("cpu", torch.int64).tolist()
    return torch.cat([x_padded.narrow(dim, s, n) for s, n in zip(starts, lens)], dim)


# ---- load balance -------------------------------------------------------------------------------
def causal_work(world: int, seq_len: int, balance: str = "zigzag",
                cu_seqlens: Union[torch.Tensor, Sequence[int], None] = None) -> list[int]:
    """Exact causal (query, key) pair count per rank: token at document position t sees t + 1 keys.

    With ``cu_seqlens`` the documents are split per-document zigzag (THD) or, for contiguous, the
    packed sequence is cut in ``P`` equal chunks and pairs never cross documents.
    """
    _check_balance(balance)
    if cu_seqlens is None:
        doc_pos = torch.arange(seq_len, dtype=torch.int64)
        bounds = [0, seq_len]
    else:
        bounds = [int(b) for b in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
        if bounds[-1] != seq_len:
            raise ValueError(f"cu_seqlens[-1] = {bounds[-1]} must equal seq_len = {seq_len}")
        doc_pos = torch.cat([torch.arange(e - s, dtype=torch.int64) for s, e in zip(bounds[:-1], bounds[1:])])
    work = doc_pos + 1
    out = []
    for r in range(world):
        if cu_seqlens is not None and balance == "zigzag":
            idx = varlen_token_index(torch.tensor(bounds, dtype=torch.int32), r, world)[0]
        else:
            idx = token_index(r, world, seq_len, balance)
        out.append(int(work[idx].sum()))
    return out


def imbalance(world: int, seq_len: int, balance: str = "zigzag",
              cu_seqlens: Union[torch.Tensor, Sequence[int], None] = None) -> float:
    """Causal-work imbalance ``max / mean`` over ranks (1.0 = perfectly balanced)."""
    w = causal_work(world, seq_len, balance, cu_seqlens)
    return max(w) / (sum(w) / len(w))
