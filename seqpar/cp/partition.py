"""Sequence partitions for context parallelism: which tokens each rank holds (pure index math).

A :class:`Partition` is resolved **once** per call signature (``cp.make_partition`` / inside
``cp.attention``; cached) and every strategy receives it: the pieces of real tokens each rank
holds, their documents and positions, the padding. Balancers only produce a different object
(:data:`BALANCERS`: ``zigzag``, ``contiguous``, ``cost``, the joint balancer of
:mod:`seqpar.cp.cost` that equalises a model's modelled work over packed documents, and
``stride``, S2 key blocks round robin so each kv head's stride columns sit on one rank).

``balance="zigzag"`` (Megatron's order): *every document* (the whole sequence without
``cu_seqlens``) is cut into ``2P`` chunks and rank r holds chunks ``r`` and ``2P-1-r`` of each,
documents kept in order (Megatron's THD layout), so causal work is equal on every rank::

    P = 2, one document          seq: | c0 | c1 | c2 | c3 |
                                 rank 0 holds c0 + c3, rank 1 holds c1 + c2

Lengths need not divide: a document of ``n`` tokens gets chunks of ``n // 2P`` tokens and its
``n % 2P`` extra tokens go one per rank, round robin over the documents (a rank's two chunks of
a document get at most one each), so every rank holds the same number of tokens up to one.
``balance="contiguous"``: the packed sequence is cut into ``P`` runs, rank r holds run r.

**Padding.** Every rank's local buffer has ``L = ceil(N / P)`` slots (or the caller's local
length); the ``P·L - N`` spare slots are *internal padding*: the last document is extended by
them (so the layout equals that of the padded sequence, pads at its end) and they hold no real
token: strategies skip them, outputs there are 0 and get no gradient, :meth:`Partition.valid`
masks them out of a loss. Megatron's padded THD (``cu_seqlens`` padded per document,
``cu_seqlens_unpadded`` the real boundaries) is the same idea inside documents: the pads of each
document are held but are not real tokens. ``Partition.padding`` reports both.

``unshard`` is the only function here that communicates, through :class:`seqpar.cp.comm.Comm`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Optional, Sequence, Union

import torch

from seqpar.cp.comm import Comm, group_rank_world
from seqpar.cp.cost import CostModel, cost_balance
from seqpar.kernels._common import host_ints, seed_host_ints

__all__ = [
    "BALANCES", "BALANCERS", "Layout", "Partition", "Piece", "VarlenPadding", "cached_index", "causal_work",
    "chunk_ids", "imbalance", "make_partition", "num_chunks", "pad_varlen", "resolve", "resolve_group", "shard",
    "shard_varlen", "token_index", "unpad_varlen", "unshard", "unshard_varlen", "varlen_token_index",
]

GroupLike = Union[None, object, tuple[int, int]]


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


# ---- the partition -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Consecutive real tokens of one document held by one rank.

    ``local``: first slot in the rank's buffer; ``length`` (> 0); ``doc``: document index;
    ``pos``: position of the first token inside its document (layouts such as S2's restart
    there); ``real``: index of the first token in the *real order* (all real tokens, documents
    in order: ``doc_start[doc] + pos``).
    """

    local: int
    length: int
    doc: int
    pos: int
    real: int

    @property
    def end(self) -> int:
        """Position inside the document after the last token."""
        return self.pos + self.length


@dataclass(frozen=True, eq=False)
class Layout:
    """What a strategy needs: per rank, the pieces of real tokens in its local buffer.

    ``world`` ranks, ``local_len`` slots each (equal on every rank; a slot in no piece is
    padding), ``pieces[r]`` in local order, ``doc_real[d]`` real tokens of document d.
    Hashable by identity: derived plans are cached on the object (:meth:`cached`); resolved
    layouts are themselves cached, so a training step computes each plan once.
    """

    world: int
    local_len: int
    pieces: tuple[tuple[Piece, ...], ...]
    doc_real: tuple[int, ...]
    _plans: dict = field(default_factory=dict, repr=False, compare=False)

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once per ``key`` for this layout (host plans of the strategies)."""
        hit = self._plans.get(key)
        if hit is None:
            hit = self._plans[key] = build()
        return hit

    @property
    def num_docs(self) -> int:
        return len(self.doc_real)

    @cached_property
    def doc_start(self) -> tuple[int, ...]:
        """Start of each document in the real order, and the total at the end (``[docs + 1]``)."""
        out = [0]
        for n in self.doc_real:
            out.append(out[-1] + n)
        return tuple(out)

    @property
    def real_len(self) -> int:
        """Real tokens over all ranks."""
        return self.doc_start[-1]

    @cached_property
    def doc_pieces(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per document, its ``(rank, piece index)`` in position order."""
        per: list[list] = [[] for _ in self.doc_real]
        for r, ps in enumerate(self.pieces):
            for i, p in enumerate(ps):
                per[p.doc].append((p.pos, r, i))
        return tuple(tuple((r, i) for _, r, i in sorted(d)) for d in per)

    @cached_property
    def real_slots(self) -> torch.Tensor:
        """int64 ``[real_len]``: rank-major slot (``rank * local_len + local``) of each real token, in
        the real order (the gather index from a rank-major all-gather / all-to-all)."""
        out = torch.empty(self.real_len, dtype=torch.int64)
        for r, ps in enumerate(self.pieces):
            for p in ps:
                out[p.real:p.real + p.length] = torch.arange(p.length) + r * self.local_len + p.local
        return out

    @cached_property
    def identity(self) -> bool:
        """True when the rank-major slots already are the real order (no padding, no reordering)."""
        return self.real_len == self.world * self.local_len and bool(
            torch.equal(self.real_slots, torch.arange(self.real_len)))

    def local_slots(self, rank: int) -> torch.Tensor:
        """int64 slots of ``rank``'s real tokens, piece by piece (local order of its pieces)."""
        return self.cached(("local_slots", rank), lambda: torch.cat(
            [torch.arange(p.local, p.local + p.length) for p in self.pieces[rank]]
            or [torch.zeros(0, dtype=torch.int64)]))

    def dense(self, rank: int) -> bool:
        """True when ``rank``'s pieces cover its whole buffer in order (no padding slot)."""
        pos = 0
        for p in self.pieces[rank]:
            if p.local != pos:
                return False
            pos += p.length
        return pos == self.local_len

    def merged(self, group: int) -> "Layout":
        """The layout seen after a Ulysses all-to-all over groups of ``group`` consecutive ranks:
        group rank ``i`` holds the buffers of ranks ``i·group .. i·group+group-1``, rank-major
        (USP's ring runs over it)."""
        if self.world % group:
            raise ValueError(f"group size {group} must divide world {self.world}")

        def build() -> "Layout":
            pieces = []
            for i in range(self.world // group):
                pieces.append(tuple(Piece(m * self.local_len + p.local, p.length, p.doc, p.pos, p.real)
                                    for m in range(group) for p in self.pieces[i * group + m]))
            return Layout(self.world // group, group * self.local_len, tuple(pieces), self.doc_real)
        return self.cached(("merged", group), build)

    def causal_work(self) -> list[int]:
        """Exact causal (query, key) pairs per rank: a token at document position t sees t + 1 keys."""
        return [sum(p.length * (2 * p.pos + p.length + 1) // 2 for p in ps) for ps in self.pieces]


@dataclass(frozen=True, eq=False)
class Partition(Layout):
    """A :class:`Layout` in the caller's coordinates: how ``cp.shard`` places the ``seq_len``
    tokens of a global tensor (documents ``doc_bounds``, from ``cu_seqlens``) on the ranks.

    ``spans[r]``: ``(local, start, length)`` runs of global tokens in rank r's buffer (real tokens
    and Megatron's per-document pads; internal padding slots are in no span). ``balance``: the
    balancer that produced it. ``varlen``: documents were given (``cu_seqlens``): Lightning states
    are then per document.
    """

    seq_len: int = 0
    balance: str = ""
    doc_bounds: tuple[int, ...] = ()
    spans: tuple[tuple[tuple[int, int, int], ...], ...] = ()
    varlen: bool = False

    @property
    def padding(self) -> int:
        """Slots that hold no real token: internal padding plus the pads of padded documents."""
        return self.world * self.local_len - self.real_len

    @property
    def internal_padding(self) -> int:
        """Slots added by the partition (``P·L - seq_len``), at the end of the sequence."""
        return self.world * self.local_len - self.seq_len

    @cached_property
    def pad_per_rank(self) -> tuple[int, ...]:
        return tuple(self.local_len - sum(p.length for p in ps) for ps in self.pieces)

    def token_index(self, rank: int) -> torch.Tensor:
        """int64 ``[local_len]``: global position of each slot of ``rank`` (-1: internal padding)."""
        _check_rank(rank, self.world)

        def build() -> torch.Tensor:
            idx = torch.full((self.local_len,), -1, dtype=torch.int64)
            for lo, start, n in self.spans[rank]:
                idx[lo:lo + n] = torch.arange(start, start + n)
            return idx
        return self.cached(("token_index", rank), build)

    def valid(self, rank: int) -> torch.Tensor:
        """bool ``[local_len]``: slots of ``rank`` that hold a real token (use it as a loss mask)."""
        _check_rank(rank, self.world)

        def build() -> torch.Tensor:
            m = torch.zeros(self.local_len, dtype=torch.bool)
            for p in self.pieces[rank]:
                m[p.local:p.local + p.length] = True
            return m
        return self.cached(("valid", rank), build)

    def local_cu_seqlens(self, rank: int) -> torch.Tensor:
        """int32 ``[num_docs + 1]``: rank's slots per document, cumulated (Megatron's local THD
        ``cu_seqlens``; zigzag only, where the buffer is document-major). Internal padding counts
        with the last document."""
        if self.balance != "zigzag":
            raise ValueError("local cu_seqlens describe the per-document zigzag (THD) layout; "
                             f"this partition is {self.balance!r}")
        per = [0] * len(self.doc_bounds[:-1])
        for _, start, n in self.spans[rank]:
            per[_doc_of(self.doc_bounds, start)] += n
        per[-1] += self.local_len - sum(per)
        vals = [0]
        for n in per:
            vals.append(vals[-1] + n)
        return seed_host_ints(torch.tensor(vals, dtype=torch.int32), vals)

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """Rank's local buffer of the global ``x`` (``x.shape[dim] == seq_len``): ``[.., local_len, ..]``,
        zeros in padding slots. Returns a new contiguous tensor; differentiable."""
        dim = dim % x.dim()
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"x.shape[{dim}] = {x.shape[dim]} must equal the partition's seq_len {self.seq_len}")
        idx = self.token_index(rank)
        if self.internal_padding == 0:
            return x.index_select(dim, idx.to(x.device)).contiguous()
        shape = list(x.shape)
        shape[dim] = 1
        padded = torch.cat([x, x.new_zeros(shape)], dim)  # row seq_len is the zero pad
        return padded.index_select(dim, idx.where(idx >= 0, self.seq_len).to(x.device)).contiguous()

    def unshard(self, x_local: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
        """Inverse of :meth:`shard`: all-gather every rank's buffer and restore the global order
        (padding dropped). Differentiable: the gradient of ``x_local`` is this rank's shard of the
        incoming gradient (no communication in backward)."""
        if isinstance(group, tuple):
            raise ValueError("unshard needs a process group (it all-gathers); got a (rank, world) tuple")
        dim = dim % x_local.dim()
        comm = Comm(group)
        if comm.world != self.world:
            raise ValueError(f"the partition is for {self.world} ranks, the group has {comm.world}")
        if x_local.shape[dim] != self.local_len:
            raise ValueError(f"x_local.shape[{dim}] = {x_local.shape[dim]} must equal the partition's local "
                             f"length {self.local_len}")
        return _Unshard.apply(x_local, comm, dim, self)

    @cached_property
    def gather_index(self) -> torch.Tensor:
        """int64 ``[seq_len]``: rank-major slot of each global token (the unshard gather)."""
        out = torch.empty(self.seq_len, dtype=torch.int64)
        for r, spans in enumerate(self.spans):
            for lo, start, n in spans:
                out[start:start + n] = torch.arange(n) + r * self.local_len + lo
        return out

    @classmethod
    def from_runs(cls, world: int, seq_len: int, local_len: int, runs: Sequence[Sequence[Run]],
                  doc_bounds: Sequence[int], real_lens: Sequence[int], *, balance: str,
                  varlen: bool) -> "Partition":
        """Build a partition from a balancer's ``runs[r]``: ``(global start, length, document, position
        in it)`` in rank r's local order, filling exactly ``local_len`` slots (documents laid out by
        ``doc_bounds``, the last one extended by the internal padding; ``real_lens[d]`` of each
        document's tokens are real, a prefix). A balancer that needs more than
        :data:`BALANCERS`' arguments (e.g. a cost model) calls this and passes ``partition=``."""
        real_start = [0]
        for n in real_lens:
            real_start.append(real_start[-1] + n)
        pieces, spans = [], []
        for r, rr in enumerate(runs):
            if sum(n for _, n, _, _ in rr) != local_len:
                raise ValueError(f"balancer {balance!r} gave rank {r} {sum(n for _, n, _, _ in rr)} slots, "
                                 f"expected {local_len}")
            ps, ss, local = [], [], 0
            for start, n, d, pos in rr:
                keep = min(n, real_lens[d] - pos)  # the real tokens are a prefix of each document
                if keep > 0:
                    ps.append(Piece(local, keep, d, pos, real_start[d] + pos))
                user = min(n, seq_len - start)  # tokens of the caller's tensor (not internal padding)
                if user > 0:
                    ss.append((local, start, user))
                local += n
            pieces.append(tuple(ps))
            spans.append(tuple(ss))
        return cls(world, local_len, tuple(pieces), tuple(real_lens), seq_len=seq_len, balance=balance,
                   doc_bounds=tuple(doc_bounds), spans=tuple(spans), varlen=varlen)

    def describe(self) -> str:
        """One line: documents, balance and the padding added."""
        return (f"{self.seq_len} tokens in {len(self.doc_bounds) - 1} document(s) on {self.world} ranks "
                f"({self.balance}): {self.local_len} slots per rank, {self.padding} padding slot(s) "
                f"({self.internal_padding} added by the partition)")


def _doc_of(bounds: Sequence[int], pos: int) -> int:
    lo, hi = 0, len(bounds) - 2
    while lo < hi:  # last document whose start <= pos
        mid = (lo + hi + 1) // 2
        if bounds[mid] <= pos:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Unshard(torch.autograd.Function):
    """Forward: all-gather + global order. Backward: this rank's shard of the gradient."""

    @staticmethod
    def forward(ctx, x_local: torch.Tensor, comm: Comm, dim: int, part: Partition) -> torch.Tensor:
        ctx.rank, ctx.dim, ctx.part = comm.rank, dim, part
        gathered = comm.all_gather(x_local.movedim(dim, 0))  # [world * local, ...]
        idx = cached_index(("unshard", part), gathered.device, lambda: part.gather_index)
        return gathered.index_select(0, idx).movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return ctx.part.shard(g, ctx.rank, dim=ctx.dim), None, None, None


# ---- balancers: (world, layout document lengths, slots per rank) -> per-rank runs ------------------
Run = tuple[int, int, int, int]  # (global start in the layout, length, document, position in it)


def _zigzag(world: int, lens: Sequence[int], local_len: int, **_: Any) -> list[list[Run]]:
    p2 = 2 * world
    runs: list[list[Run]] = [[] for _ in range(world)]
    extra_rank, start = 0, 0  # round robin of the extra tokens over the ranks, across documents
    for d, n in enumerate(lens):
        base, rem = divmod(n, p2)
        size = [base] * p2
        got: set[int] = set()
        for j in range(rem):
            r = (extra_rank + j) % world
            size[r if r not in got else p2 - 1 - r] += 1
            got.add(r)
        extra_rank = (extra_rank + rem) % world
        cpos = [0]
        for s in size:
            cpos.append(cpos[-1] + s)
        for r in range(world):
            for cid in (r, p2 - 1 - r):
                if size[cid]:
                    runs[r].append((start + cpos[cid], size[cid], d, cpos[cid]))
        start += n
    return runs


def _contiguous(world: int, lens: Sequence[int], local_len: int, **_: Any) -> list[list[Run]]:
    runs: list[list[Run]] = [[] for _ in range(world)]
    start = 0
    for d, n in enumerate(lens):
        pos = 0
        while pos < n:
            r = (start + pos) // local_len
            take = min(n - pos, (r + 1) * local_len - (start + pos))
            runs[r].append((start + pos, take, d, pos))
            pos += take
        start += n
    return runs


def stride_counts(world: int, real_lens: Sequence[int], block_size: int) -> list[int]:
    """Real tokens per rank under ``balance="stride"`` (see :func:`_stride`)."""
    counts, nxt = [0] * world, 0
    for n in real_lens:
        full, tail = divmod(n, block_size)
        for i in range(full + (tail > 0)):
            counts[(nxt + i) % world] += block_size if i < full else tail
        nxt = (nxt + full + (tail > 0)) % world
    return counts


def _stride(world: int, lens: Sequence[int], local_len: int, *, real_lens: Sequence[int],
            block_size: Optional[int] = None, **_: Any) -> list[list[Run]]:
    """``balance="stride"``: key-block ownership by stride residue. Block ``b`` (``block_size``
    tokens, counted inside its document as S2's layout counts them) of a document goes to rank
    ``(o + b) mod P``; ``o`` continues the round robin where the previous document ended, so short
    documents do not all start on rank 0. Within a document every rank's blocks are one residue
    class mod P: with ``P | vert_stride`` each S2 kv head's stride columns sit on one rank. Slots
    that hold no real token (per-document pads, internal padding) fill the ranks with fewer real
    tokens, at the end of their buffers."""
    if block_size is None:
        raise ValueError(_STRIDE_NEEDS)
    runs: list[list[Run]] = [[] for _ in range(world)]
    fill: list[Run] = []
    start, nxt = 0, 0
    for d, (n, real) in enumerate(zip(lens, list(real_lens) + [0] * (len(lens) - len(real_lens)))):
        nblocks = -(-real // block_size)
        for i in range(nblocks):
            pos = i * block_size
            runs[(nxt + i) % world].append((start + pos, min(block_size, real - pos), d, pos))
        nxt = (nxt + nblocks) % world
        if n > real:
            fill.append((start + real, n - real, d, real))
        start += n
    i = 0
    for r in range(world):
        need = local_len - sum(x[1] for x in runs[r])
        while need > 0:
            s, n, d, pos = fill[i]
            take = min(n, need)
            runs[r].append((s, take, d, pos))
            if take < n:
                fill[i] = (s + take, n - take, d, pos + take)
            else:
                i += 1
            need -= take
    return runs


_STRIDE_NEEDS = ("balance='stride' places blocks of block_size tokens round robin (block b of a document on rank "
                 "b mod P): pass block_size= (the S2 layout's block_size) to cp.make_partition / cp.shard and "
                 "partition= to cp.attention; kind='s2' takes it from its layout")


#: name -> balancer ``(world, layout lengths of the documents, slots per rank, *, real_lens, cost)
#: -> runs per rank`` (global start, length, document, position), in local order; every rank's runs
#: must fill exactly ``local_len`` slots. ``real_lens``: real tokens of each document (a prefix; the
#: rest is padding), ``cost``: the :class:`~seqpar.cp.cost.CostModel` given to
#: :func:`make_partition` (None otherwise); ``"stride"`` also gets ``block_size`` (the S2 block).
#: A new balancer registers here and every strategy runs on it.
BALANCERS: dict[str, Callable[..., list[list[Run]]]] = {
    "zigzag": _zigzag, "contiguous": _contiguous, "cost": cost_balance, "stride": _stride,
}
BALANCES = tuple(BALANCERS)
_CHUNKED = ("zigzag", "contiguous")  # balancers with a fixed chunk order (num_chunks / chunk_ids)


def _check_balance(balance: str) -> None:
    if balance not in BALANCERS:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")


def _check_chunked(balance: str) -> None:
    if balance not in _CHUNKED:
        raise ValueError(f"chunk ids exist for the fixed-order balancers {_CHUNKED}, got {balance!r} (its pieces: "
                         f"cp.make_partition(...).pieces)")


def _bounds(cu: Union[torch.Tensor, Sequence[int], None], name: str) -> Optional[tuple[int, ...]]:
    if cu is None:
        return None
    c = host_ints(cu) if isinstance(cu, torch.Tensor) else tuple(int(x) for x in cu)
    if len(c) < 2 or c[0] != 0 or any(b <= a for a, b in zip(c[:-1], c[1:])):
        raise ValueError(f"{name} must be 1-D [0, ..., seq] and strictly increasing (no empty document), got {list(c)}")
    return c


_RESOLVED: dict = {}


def resolve(world: int, seq_len: int, *, balance: str = "zigzag", local_len: Optional[int] = None,
            cu_seqlens: Union[torch.Tensor, Sequence[int], None] = None,
            cu_seqlens_unpadded: Union[torch.Tensor, Sequence[int], None] = None,
            cost: Optional[CostModel] = None, block_size: Optional[int] = None) -> Partition:
    """The :class:`Partition` of ``seq_len`` global tokens over ``world`` ranks (cached: the same
    arguments give the same object, with its plans). ``local_len`` defaults to ``ceil(seq_len /
    world)`` (``"stride"``: the most real tokens its round robin gives one rank, at least that);
    ``cu_seqlens`` (host values are read once per tensor) are the documents,
    ``cu_seqlens_unpadded`` their real boundaries when each document is padded at its end
    (Megatron's ``cu_seqlens_q`` next to ``cu_seqlens_q_padded``); ``cost``: the model's
    :class:`~seqpar.cp.cost.CostModel`, for (and only for) ``balance="cost"``; ``block_size``: the
    S2 block, for (and only for) ``balance="stride"``."""
    _check_balance(balance)
    if cost is not None and not isinstance(cost, CostModel):
        raise ValueError(f"cost must be a seqpar.cp.CostModel, got {type(cost).__name__}")
    if cost is not None and balance != "cost":
        raise ValueError(f"cost= is the cost model of balance='cost'; got balance={balance!r} (drop cost= or "
                         f"use balance='cost')")
    if block_size is not None and balance != "stride":
        raise ValueError(f"block_size= is the block of balance='stride'; got balance={balance!r} (drop block_size= "
                         f"or use balance='stride')")
    if balance == "stride" and block_size is None:
        raise ValueError(_STRIDE_NEEDS)
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int (the S2 layout's block_size), got {block_size!r}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if local_len is not None and (isinstance(local_len, bool) or not isinstance(local_len, int)):
        raise ValueError(f"local_len must be an int, got {local_len!r}")
    bounds = _bounds(cu_seqlens, "cu_seqlens")
    real = _bounds(cu_seqlens_unpadded, "cu_seqlens_unpadded")
    key = (world, seq_len, balance, local_len, bounds, real, cost, block_size)
    hit = _RESOLVED.get(key)
    if hit is not None:
        return hit
    if bounds is not None and bounds[-1] != seq_len:
        raise ValueError(f"cu_seqlens[-1] = {bounds[-1]} must equal the global sequence length {seq_len}")
    if real is not None:
        if bounds is None:
            raise ValueError("cu_seqlens_unpadded (real document boundaries) needs cu_seqlens (the padded ones)")
        if len(real) != len(bounds):
            raise ValueError(f"cu_seqlens_unpadded must hold as many documents as cu_seqlens ({len(bounds) - 1}), "
                             f"got {list(real)}")
    docs = bounds if bounds is not None else (0, seq_len)
    layout_lens = [b - a for a, b in zip(docs[:-1], docs[1:])]
    real_lens = layout_lens if real is None else [b - a for a, b in zip(real[:-1], real[1:])]
    bad = [i for i, (r_, n) in enumerate(zip(real_lens, layout_lens)) if r_ > n]
    if bad:
        raise ValueError(f"cu_seqlens_unpadded: document(s) {bad} have more real tokens than their padded length")
    need = -(-seq_len // world)
    if balance == "stride":  # whole blocks round robin: a rank may hold up to a block more than N / P
        need = max(need, max(stride_counts(world, real_lens, block_size)))
    if local_len is None:
        local_len = need
    if local_len < need:
        why = (f"balance='stride' (blocks of {block_size} round robin) puts {need} real tokens on the busiest rank"
               if balance == "stride" and need * world > seq_len else
               f"ceil({seq_len} / {world}) = {need}")
        raise ValueError(f"{world} ranks x {local_len} local tokens cannot hold seq_len {seq_len}: the local length "
                         f"must be at least {need} ({why}); shard with cp.make_partition(...).shard")
    extended = list(layout_lens)
    extended[-1] += world * local_len - seq_len  # internal padding: the last document's tail
    kw = {"block_size": block_size} if balance == "stride" else {}
    runs = BALANCERS[balance](world, extended, local_len, real_lens=real_lens, cost=cost, **kw)
    part = Partition.from_runs(world, seq_len, local_len, runs, docs, real_lens, balance=balance,
                               varlen=bounds is not None)
    if len(_RESOLVED) > 128:
        _RESOLVED.clear()
    _RESOLVED[key] = part
    return part


def make_partition(seq_len: int, group: GroupLike = None, *, balance: str = "zigzag",
              cu_seqlens: Union[torch.Tensor, Sequence[int], None] = None,
              cu_seqlens_unpadded: Union[torch.Tensor, Sequence[int], None] = None,
              local_len: Optional[int] = None, cost: Optional[CostModel] = None,
              block_size: Optional[int] = None) -> Partition:
    """Resolve how ``seq_len`` global tokens (packed documents with ``cu_seqlens``) are placed on the
    ranks of ``group`` (a process group, ``None`` = default, or ``(rank, world)``); host-only.
    ``balance``: a :data:`BALANCERS` name; ``"cost"`` needs ``cost=cp.CostModel(...)`` (the whole
    model's layers: build the partition once and pass ``partition=`` to every layer's call);
    ``"stride"`` needs ``block_size=`` (the S2 layout's: block b of each document on rank
    ``b mod P``, up to a rotation per document; its ``local_len`` may exceed ``ceil(N / P)`` by up to
    a block).

    >>> part = cp.make_partition(10, (0, 4))           # 10 tokens on 4 ranks: 3 slots each, 2 padding
    >>> part.padding, part.local_len
    (2, 3)
    >>> q_loc = part.shard(q, rank)               # [b, 3, h, d], zeros in the padding slots
    >>> o = cp.attention(q_loc, k_loc, v_loc, kind="softmax", partition=part)
    >>> o_full = part.unshard(o, group)           # [b, 10, h, dv]; part.valid(rank) masks a loss
    """
    _, world = resolve_group(group)
    return resolve(world, seq_len, balance=balance, local_len=local_len, cu_seqlens=cu_seqlens,
                   cu_seqlens_unpadded=cu_seqlens_unpadded, cost=cost, block_size=block_size)


# ---- the classic entry points -------------------------------------------------------------------
def num_chunks(world: int, balance: str = "zigzag") -> int:
    """Chunks a document is cut into: ``2P`` for zigzag, ``P`` for contiguous."""
    _check_chunked(balance)
    return 2 * world if balance == "zigzag" else world


def chunk_ids(rank: int, world: int, balance: str = "zigzag") -> tuple[int, ...]:
    """Chunk ids (of :func:`num_chunks`) ``rank`` holds of every document, in local order."""
    _check_chunked(balance)
    _check_rank(rank, world)
    return (rank, 2 * world - 1 - rank) if balance == "zigzag" else (rank,)


def token_index(rank: int, world: int, seq_len: int, balance: str = "zigzag") -> torch.Tensor:
    """Global positions (int64) of the slots ``rank`` holds, in local order (-1: padding)."""
    return resolve(world, seq_len, balance=balance).token_index(rank)


def shard(x: torch.Tensor, group: GroupLike, dim: int = 1, balance: str = "zigzag", *,
          cu_seqlens: Optional[torch.Tensor] = None, block_size: Optional[int] = None) -> torch.Tensor:
    """This rank's part of the full tensor ``x`` along ``dim`` (default the seq dim of
    ``[batch, seq, heads, dim]``). ``group`` is a process group (``None`` = default) or an explicit
    ``(rank, world)`` tuple. Any length: ``ceil(N / P)`` slots per rank, padding slots (zeros) at the
    sequence end (:func:`make_partition` reports them; pass ``seq_len=N`` to ``cp.attention``).
    ``cu_seqlens``: packed documents (each split by ``balance``); ``block_size``: the S2 block of
    ``balance="stride"``. Returns a contiguous copy.
    """
    rank, world = resolve_group(group)
    dim = dim % x.dim()
    return resolve(world, x.shape[dim], balance=balance, cu_seqlens=cu_seqlens, block_size=block_size).shard(
        x, rank, dim)


def unshard(x_local: torch.Tensor, group=None, dim: int = 1, balance: str = "zigzag", *,
            seq_len: Optional[int] = None, cu_seqlens: Optional[torch.Tensor] = None,
            block_size: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`shard`: all-gather every rank's part and restore sequence order (``seq_len``
    tokens, default ``P`` times the local length; padding dropped). Differentiable: every rank gets
    the full tensor as its own copy, so the gradient of ``x_local`` is this rank's :func:`shard` of the
    incoming gradient (no communication in backward)."""
    if isinstance(group, tuple):
        raise ValueError("unshard needs a process group (it all-gathers); got a (rank, world) tuple")
    _check_balance(balance)
    _, world = resolve_group(group)
    dim = dim % x_local.dim()
    n = int(host_ints(cu_seqlens)[-1]) if cu_seqlens is not None else seq_len
    n = world * x_local.shape[dim] if n is None else n
    return resolve(world, n, balance=balance, local_len=x_local.shape[dim], cu_seqlens=cu_seqlens,
                   block_size=block_size).unshard(x_local, group, dim)


# ---- varlen (THD) -------------------------------------------------------------------------------
def varlen_token_index(cu_seqlens: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document zigzag: global positions held by ``rank`` (-1: padding) and its local int32
    ``cu_seqlens`` (documents of any length)."""
    _check_rank(rank, world)
    part = resolve(world, host_ints(cu_seqlens)[-1], cu_seqlens=cu_seqlens)
    return part.token_index(rank), part.local_cu_seqlens(rank).to(cu_seqlens.device)


def shard_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, group: GroupLike,
                 dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's THD shard of packed ``x`` and its local ``cu_seqlens`` (per-document zigzag)."""
    rank, world = resolve_group(group)
    dim = dim % x.dim()
    if host_ints(cu_seqlens)[-1] != x.shape[dim]:
        raise ValueError(f"cu_seqlens[-1] = {host_ints(cu_seqlens)[-1]} must equal x.shape[{dim}] = {x.shape[dim]}")
    part = resolve(world, x.shape[dim], cu_seqlens=cu_seqlens)
    return part.shard(x, rank, dim), part.local_cu_seqlens(rank).to(cu_seqlens.device)


def unshard_varlen(x_local: torch.Tensor, cu_seqlens: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_varlen` (``cu_seqlens`` is the *global* one); differentiable."""
    return unshard(x_local, group, dim, cu_seqlens=cu_seqlens)


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


def _doc_lens(cu_seqlens: torch.Tensor) -> list[int]:
    c = _bounds(cu_seqlens, "cu_seqlens")
    return [b - a for a, b in zip(c[:-1], c[1:])]


def pad_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, multiple: int, dim: int = 1,
               value: float = 0.0) -> VarlenPadding:
    """Pad every packed document at its end to a multiple of ``multiple`` (Megatron's padded THD).

    Not needed by ``cp`` (documents of any length are split as they are); for data that must
    follow Megatron's convention. Pass the padded ``cu_seqlens`` and ``original_cu_seqlens`` as
    ``cu_seqlens_unpadded=`` to ``cp.attention``: pads are then no real tokens (outputs 0, Lightning
    final states at each document's last real token).
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
    new = [0]
    for n, p in zip(lens, pads):
        new.append(new[-1] + n + p)
    cu = torch.tensor(new, dtype=torch.int32, device=cu_seqlens.device)
    return VarlenPadding(torch.cat(pieces, dim), cu, pads, cu_seqlens)


def unpad_varlen(x_padded: torch.Tensor, padding: VarlenPadding, dim: int = 1) -> torch.Tensor:
    """Drop the padding :func:`pad_varlen` added (works on outputs and gradients alike)."""
    dim = dim % x_padded.dim()
    lens = _doc_lens(padding.original_cu_seqlens)
    starts = host_ints(padding.cu_seqlens)
    return torch.cat([x_padded.narrow(dim, s, n) for s, n in zip(starts, lens)], dim)


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


# ---- load balance -------------------------------------------------------------------------------
def causal_work(world: int, seq_len: int, balance: str = "zigzag",
                cu_seqlens: Union[torch.Tensor, Sequence[int], None] = None) -> list[int]:
    """Exact causal (query, key) pair count per rank: token at document position t sees t + 1 keys
    (pairs never cross documents; padding does no work)."""
    return resolve(world, seq_len, balance=balance, cu_seqlens=cu_seqlens).causal_work()


def imbalance(world: int, seq_len: int, balance: str = "zigzag",
              cu_seqlens: Union[torch.Tensor, Sequence[int], None] = None) -> float:
    """Causal-work imbalance ``max / mean`` over ranks (1.0 = perfectly balanced)."""
    w = causal_work(world, seq_len, balance, cu_seqlens)
    return max(w) / (sum(w) / len(w))
