"""The joint cost balancer: a model of the whole model's attention work per token, and
``balance="cost"``, which places chunks on the ranks so that the modelled work is equal.

Zigzag balances *causal softmax* inside every document: it pairs chunk ``c`` with ``2P-1-c``, so
any per-token cost that is affine in the position inside the document sums to the same on every
rank. A hybrid model's per-token cost is not affine: S2's local band and a sliding window saturate
after the band (``min(t + 1, window)`` plus ``t / vert_stride`` for the stride), Lightning is flat,
MoH scales softmax by its active heads, padding costs nothing. Zigzag then over-loads the middle
ranks (they hold the two chunks just after the band) and under-loads rank 0 (the cheap first
chunk of every document); packed documents add more of both.

:class:`CostModel` holds the per-token work of every attention layer of the model (counted in
(query, key) pairs per head; Lightning's linear work as a constant per token);
:func:`cost_balance` cuts every document into chunks, assigns them heaviest first to the least
loaded rank with room left (splitting a chunk where a rank has fewer free slots than it needs), so
every rank fills exactly its ``local_len`` slots, and refines the chunk size until the modelled
``max / mean`` is within ``CostModel.target`` (the coarsest cut that gets there: fewer pieces,
fewer kernel launches). It is registered as ``cp.BALANCERS["cost"]``; build the partition once
for the whole model (every layer must see the same placement) with
``cp.make_partition(N, group, balance="cost", cost=cp.CostModel(...), cu_seqlens=...)`` and pass
``partition=`` to every ``cp.attention`` call. The model describes work under token-sharded
schemes (allgather, ring, the ring of usp); under ulysses every rank runs all tokens of its heads,
and any partition gives the same work.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

__all__ = ["CostModel", "cost_balance"]

_KINDS = ("softmax", "s2", "lightning", "moh")


@dataclass(frozen=True)
class CostModel:
    """Per-token attention work of a model, summed over its layers (hashable: partitions are cached by it).

    Args:
        layers: ``{kind: number of layers}`` (or pairs), kinds ``softmax``, ``s2``, ``lightning``,
            ``moh``; e.g. ``{"s2": 3, "softmax": 1}`` for a 3:1 hybrid.
        heads: the model's query heads (S2's rotation step when ``s2_layout`` does not fix it).
        kv_heads: kv heads (S2's pattern is per kv head; default ``heads``).
        s2_layout: the S2 layout (required with ``s2`` layers).
        moh_active: expected fraction of (token, head) pairs MoH computes, ``(top_k + shared) / heads``
            (default 1).
        linear_cost: Lightning's work per token in (query, key)-pair equivalents per head (its
            intra-block pairs plus the state read and update: about ``block + head_dim``; default 128).
        causal: softmax / MoH layers are causal (else every token sees its whole document).
        softmax_window: the softmax layers' sliding window (``cp.attention(window=)``): a softmax
            token at position ``t`` costs ``min(t + 1, softmax_window)``; None: full causal.
        target: the balancer refines its chunks until ``max / mean`` of the modelled per-rank work
            is at most this (default 1.02), or the finest cut is reached.

    Work is counted in (query, key) pairs per head: a causal softmax token at document position
    ``t`` costs ``t + 1``, an S2 token the keys of the blocks its head reads (local band up to the
    token, plus every ``vert_stride``-th block before it; dense heads ``t + 1``), averaged over
    the kv heads.
    """

    layers: Any
    heads: int = 1
    kv_heads: Optional[int] = None
    s2_layout: Any = None
    moh_active: float = 1.0
    linear_cost: float = 128.0
    causal: bool = True
    target: float = 1.02
    softmax_window: Optional[int] = None

    def __post_init__(self) -> None:
        from seqpar.kernels import S2Layout

        items = tuple(self.layers.items()) if isinstance(self.layers, dict) else tuple(
            tuple(x) for x in self.layers)
        if not items:
            raise ValueError("CostModel.layers must name at least one attention layer, e.g. {'softmax': 1}")
        counts: dict[str, int] = {}
        for item in items:
            if len(item) != 2:
                raise ValueError(f"CostModel.layers: expected (kind, count) pairs, got {item!r}")
            kind, n = item
            if kind not in _KINDS:
                raise ValueError(f"CostModel.layers: kind must be one of {_KINDS}, got {kind!r}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"CostModel.layers[{kind!r}] must be a layer count >= 0, got {n!r}")
            counts[kind] = counts.get(kind, 0) + n
        if not any(counts.values()):
            raise ValueError("CostModel.layers counts no layer at all")
        object.__setattr__(self, "layers", tuple(sorted((k, n) for k, n in counts.items() if n)))
        for name in ("heads",) + (("kv_heads",) if self.kv_heads is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CostModel.{name} must be a positive int, got {v!r}")
        kvh = self.heads if self.kv_heads is None else self.kv_heads
        if self.heads % kvh:
            raise ValueError(f"CostModel.kv_heads ({kvh}) must divide heads ({self.heads})")
        if "s2" in dict(self.layers):
            if not isinstance(self.s2_layout, S2Layout):
                raise ValueError("CostModel with s2 layers needs s2_layout=S2Layout(...) (the model's layout)")
            self.s2_layout.validate_heads(kvh)
        for name, lo in (("moh_active", 0.0), ("linear_cost", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= lo or v != v or v == float("inf"):
                raise ValueError(f"CostModel.{name} must be a finite number >= {lo}, got {v!r}")
        if self.moh_active > 1:
            raise ValueError(f"CostModel.moh_active is a fraction of the heads (<= 1), got {self.moh_active!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"CostModel.causal must be a bool, got {self.causal!r}")
        if self.softmax_window is not None:
            from seqpar.kernels._common import check_window

            try:
                check_window(self.softmax_window, self.causal)
            except ValueError as e:
                raise ValueError(f"CostModel.softmax_window: {e}") from None
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)) or not self.target >= 1:
            raise ValueError(f"CostModel.target is a max / mean ratio, >= 1, got {self.target!r}")

    def token_costs(self, doc_len: int, real_len: Optional[int] = None) -> torch.Tensor:
        """float64 ``[doc_len]``: modelled work of the token at each position of a document of
        ``doc_len`` tokens (all layers); positions ``>= real_len`` (padding) cost 0."""
        real = doc_len if real_len is None else min(real_len, doc_len)
        t = torch.arange(doc_len, dtype=torch.float64)
        seen = t + 1 if self.causal else torch.full_like(t, float(real))
        out = torch.zeros(doc_len, dtype=torch.float64)
        for kind, n in self.layers:
            if kind == "softmax":  # a sliding window saturates at its width
                out += n * (seen if self.softmax_window is None else seen.clamp(max=self.softmax_window))
            elif kind == "moh":
                out += n * self.moh_active * seen
            elif kind == "lightning":
                out += n * self.linear_cost
            else:
                out += n * self._s2(doc_len)
        out[real:] = 0
        return out

    def _s2(self, n: int) -> torch.Tensor:
        """Mean over kv heads of the keys an S2 token at each position reads (causal, in its document)."""
        lay = self.s2_layout.with_heads(self.heads)
        kvh = self.heads if self.kv_heads is None else self.kv_heads
        bs, step = lay.block_size, lay.head_step(self.heads)
        t = torch.arange(n, dtype=torch.int64)
        i = t // bs
        lo = (i - lay.local_blocks + 1).clamp_min(0)  # first block of the local band
        local = (i - lo) * bs + (t - i * bs + 1)
        last = lo - 1  # strided blocks are 0 .. last
        total = torch.zeros(n, dtype=torch.float64)
        for g in range(kvh):
            if g >= kvh - lay.num_dense_heads:
                total += (t + 1).double()
                continue
            j0 = (-(g * step + lay.head_sliding_offset)) % lay.vert_stride  # first column with the residue
            count = torch.where(last >= j0, torch.div(last - j0, lay.vert_stride, rounding_mode="floor") + 1, 0)
            total += (local + count * bs).double()
        return total / kvh

    def prefix(self, lens: Sequence[int], real_lens: Optional[Sequence[int]] = None) -> list[float]:
        """Cumulative :meth:`token_costs` over documents of ``lens`` tokens laid end to end
        (``[sum(lens) + 1]``, a host list): the work of global tokens ``[a, b)`` is
        ``out[b] - out[a]``."""
        real = list(lens) if real_lens is None else list(real_lens)
        if self.causal:  # a token's work depends only on its position: one array, sliced per document
            base = self.token_costs(max(lens, default=0))
            parts = [torch.where(torch.arange(n) < r, base[:n], 0.0) for n, r in zip(lens, real)]
        else:
            parts = [self.token_costs(n, r) for n, r in zip(lens, real)]
        out = torch.cat([torch.zeros(1, dtype=torch.float64), *parts]).cumsum(0)
        return out.tolist()

    def rank_costs(self, part: Any) -> list[float]:
        """Modelled work of each rank of a partition (:class:`seqpar.cp.Partition`): the sum of
        :meth:`token_costs` over the real tokens it holds."""
        pre = self.prefix(part.doc_real)
        return [sum(pre[p.real + p.length] - pre[p.real] for p in ps) for ps in part.pieces]

    def imbalance(self, part: Any) -> float:
        """``max / mean`` of :meth:`rank_costs` (1.0 = balanced): the metric the balancer minimises."""
        w = self.rank_costs(part)
        mean = sum(w) / len(w)
        return max(w) / mean if mean else 1.0


Run = tuple[int, int, int, int]


def _greedy(world: int, lens: Sequence[int], local_len: int, pre: list[float],
            chunk: int) -> tuple[list[list[Run]], list[float]]:
    """Chunks of at most ``chunk`` tokens per document, heaviest first onto the least loaded rank
    with free slots (a chunk larger than the free slots is split: the rest is queued again)."""
    heap: list[tuple[float, int, int, int, int]] = []
    start = 0
    for d, n in enumerate(lens):
        for pos in range(0, n, chunk):
            ln = min(chunk, n - pos)
            heap.append((pre[start + pos] - pre[start + pos + ln], start + pos, ln, d, pos))
        start += n
    heapq.heapify(heap)
    loads, free = [0.0] * world, [local_len] * world
    ranks = [(0.0, r) for r in range(world)]
    runs: list[list[Run]] = [[] for _ in range(world)]
    while heap:
        _, s, ln, d, pos = heapq.heappop(heap)
        _, r = heapq.heappop(ranks)
        take = min(ln, free[r])
        runs[r].append((s, take, d, pos))
        loads[r] += pre[s + take] - pre[s]
        free[r] -= take
        if free[r]:
            heapq.heappush(ranks, (loads[r], r))
        if take < ln:
            heapq.heappush(heap, (pre[s + take] - pre[s + ln], s + take, ln - take, d, pos + take))
    for r in range(world):  # local order = global order, neighbouring runs of one document merged
        merged: list[Run] = []
        for run in sorted(runs[r]):
            if merged and merged[-1][2] == run[2] and merged[-1][0] + merged[-1][1] == run[0]:
                s, n, d, pos = merged[-1]
                merged[-1] = (s, n + run[1], d, pos)
            else:
                merged.append(run)
        runs[r] = merged
    return runs, loads


def cost_balance(world: int, lens: Sequence[int], local_len: int, *, real_lens: Sequence[int],
                 cost: Optional[CostModel] = None) -> list[list[Run]]:
    """``cp.BALANCERS["cost"]``: runs per rank (``(global start, length, document, position)``, each
    rank exactly ``local_len`` slots) that balance ``cost``'s modelled work.

    ``lens``: layout length of each document (the last one extended by the internal padding),
    ``real_lens``: its real tokens (a prefix; the rest costs nothing). Keeps zigzag when its
    ``max / mean`` is within ``cost.target``; else tries chunks of ``ceil(local_len / k)`` tokens
    for k = 1, 2, 4, .., 64 and keeps the coarsest cut within the target (else the best one found,
    zigzag included)."""
    if cost is None:
        raise ValueError("balance='cost' needs the model's cost model: cp.make_partition(N, group, balance='cost', "
                         "cost=cp.CostModel(layers={'s2': 3, 'softmax': 1}, ...)); build it once for the whole "
                         "model and pass partition= to every cp.attention call (every layer needs the same placement)")
    if not isinstance(cost, CostModel):
        raise ValueError(f"cost must be a seqpar.cp.CostModel, got {type(cost).__name__}")
    pre = cost.prefix(lens, real_lens)
    def ratio_of(loads: list[float]) -> float:
        mean = sum(loads) / world
        return max(loads) / mean if mean else 1.0

    from seqpar.cp.partition import BALANCERS  # zigzag first: Megatron's layout when it is balanced enough

    zigzag = BALANCERS["zigzag"](world, lens, local_len)
    best_ratio = ratio_of([sum(pre[s + n] - pre[s] for s, n, _, _ in rr) for rr in zigzag])
    if best_ratio <= cost.target:
        return zigzag
    best = zigzag
    for k in (1, 2, 4, 8, 16, 32, 64):
        chunk = max(1, -(-local_len // k))
        runs, loads = _greedy(world, lens, local_len, pre, chunk)
        ratio = ratio_of(loads)
        if ratio < best_ratio - 1e-12:
            best, best_ratio = runs, ratio
        if ratio <= cost.target or chunk == 1:
            break
    return best
