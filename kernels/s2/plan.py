"""Tile plans: which kv tiles every S2 / flash kernel program visits, as arithmetic runs.

A plan cuts q and k into tiles of ``block_size`` tokens (per document with varlen, so a tile
never crosses a document boundary). Every pattern the kernels run is arithmetic in the tile
index, so a plan stores, per (kv head, q tile), at most two runs of kv tiles and, per (kv head, kv
tile), one run of q tiles, instead of listing every tile pair::

    row (kv head g, q tile t):   strided run  s1, s1 + stride, ..., (n1 tiles)   the vertical stride
                                 band run     s2, s2 + 1, ...,      (n2 tiles)   local band / causal range
    column (kv head g, kv tile u): q tiles c0, c0 + 1, ... (n tiles)

    S2, local_blocks 2, vert_stride 3, kv head 0 (x computed)        rows (s1, n1, s2, n2), stride 3
        q\\k 0 1 2 3 4 5 6
        0    x                                                         (0, 0, 0, 1)
        1    x x                                                       (0, 0, 0, 2)
        2    x x x                                                     (0, 1, 1, 2)
        3    x . x x                                                   (0, 1, 2, 2)
        4    x . . x x                                                 (0, 1, 3, 2)
        5    x . . x x x                                               (0, 2, 4, 2)
        6    x . . x . x x                                             (0, 2, 5, 2)
    column 3: q tiles 3 .. 6 (a stride column: every later row); column 4: q tiles 4, 5 (the band)

The strided run lists the stride columns left of the band (ascending), then the band (ascending):
exactly the ascending kv tiles a dense block mask would give, so the kernels visit tiles in the
same order as the CSR lists of earlier versions (``csr()`` expands a plan into them; tests compare
with the old dense-mask construction). Dense causal attention is the band run alone; a dense column
is one run (causal: from the diagonal to the end). Tokens are then masked by causality and bounds
in the kernels. A plan takes O(kv heads x tiles) memory and time, independent of the pattern's
density: 1M tokens at 64-token tiles and 8 kv heads is about 1 MB per plan.

Plans are pure functions of (layout, shapes, offsets, boundaries), kept in a cache bounded by
bytes (host tables plus their device copies, :data:`PLAN_CACHE_BYTES`), so a training step builds
each one once and copies it to the device once.
"""

from __future__ import annotations

import os
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Optional

import torch

from seqpar.kernels._common import BoundedCache
from seqpar.kernels.s2.layout import S2Layout

CSR = namedtuple("CSR", "row_ptr col_idx col_ptr row_idx")

_TABLES = ("q_start", "q_end", "kv_start", "kv_end", "rows", "cols", "tile_ids")


@dataclass(eq=False)
class TilePlan:
    """Tile tables (int32) and run lists for one attention problem.

    q tile ``t`` covers q rows ``[q_start[t], q_end[t])`` clipped by the tile width; kv tile ``u``
    covers keys ``[kv_start[u], kv_end[u])`` likewise. Causality (when ``causal``) compares
    ``q_row + q_shift >= k_row + k_shift``.

    ``rows`` int32 ``[Hkv, Tq, 4]``: ``(s1, n1, s2, n2)`` per (kv head, q tile): kv tiles
    ``s1 + i * stride`` for ``i < n1`` then ``s2 + i`` for ``i < n2``. ``cols`` int32
    ``[Hkv, Tk, 2]``: ``(c0, n)`` per (kv head, kv tile): q tiles ``c0 .. c0 + n - 1``.

    ``window`` (dense causal only; 0: none): a query also needs ``q_row + q_shift - (k_row +
    k_shift) < window`` (Mistral's sliding window); kv tiles wholly outside it are not listed.
    """

    block_size: int
    num_kv_heads: int
    causal: bool
    q_shift: int
    k_shift: int
    q_start: torch.Tensor
    q_end: torch.Tensor
    kv_start: torch.Tensor
    kv_end: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    tile_ids: torch.Tensor  # int32 arange(Tq): dk/dv read q tile ids through it (see triton_bwd)
    stride: int
    nnz_per_kv_head: tuple[int, ...]
    window: int = 0
    _device_cache: dict = field(default_factory=dict, repr=False)  # device -> moved plan
    _key_index_cache: dict = field(default_factory=dict, repr=False)  # (g, t) -> key rows (torch path)
    _csr: Optional[CSR] = field(default=None, repr=False)

    @property
    def num_q_tiles(self) -> int:
        return self.q_start.numel()

    @property
    def num_kv_tiles(self) -> int:
        return self.kv_start.numel()

    def nnz(self, num_heads: int) -> int:
        """Computed tiles per batch element summed over the q heads (each q head computes its
        kv head's tiles)."""
        return sum(self.nnz_per_kv_head) * (num_heads // self.num_kv_heads)

    def nbytes(self) -> int:
        """Bytes held: the host tables and every device copy."""
        own = sum(getattr(self, n).numel() * 4 for n in _TABLES)
        return own * (1 + len(self._device_cache))

    def to(self, device: torch.device) -> "TilePlan":
        """The plan with its tables on ``device``: copied once per device and kept (the plan cache
        accounts for the copy), so every later call, and every layer, reuses it."""
        key = str(torch.device(device))
        moved = self._device_cache.get(key)
        if moved is None:
            moved = TilePlan(self.block_size, self.num_kv_heads, self.causal, self.q_shift, self.k_shift,
                             **{n: getattr(self, n).to(device) for n in _TABLES}, stride=self.stride,
                             nnz_per_kv_head=self.nnz_per_kv_head, window=self.window)
            self._device_cache[key] = moved
            _CACHE.resize()
        return moved

    def kv_tiles(self, g: int, t: int) -> list[int]:
        """kv tiles that (kv head g, q tile t) visits, in the kernels' order (ascending)."""
        s1, n1, s2, n2 = (int(x) for x in self.rows[g, t])
        return [s1 + i * self.stride for i in range(n1)] + list(range(s2, s2 + n2))

    def q_tiles(self, g: int, u: int) -> list[int]:
        """q tiles that read (kv head g, kv tile u), ascending."""
        c0, n = (int(x) for x in self.cols[g, u])
        return list(range(c0, c0 + n))

    def csr(self) -> CSR:
        """The plan as CSR (per q tile) / CSC (per kv tile) lists: ``row_ptr [Hkv, Tq + 1]`` and
        ``col_ptr [Hkv, Tk + 1]`` absolute offsets into ``col_idx`` / ``row_idx`` (int32). For
        tests and debugging (O(nnz)); the kernels read the runs."""
        if self._csr is None:
            def lists(per_row):
                ptr, idx = [], []
                for g in range(self.num_kv_heads):
                    ptr.append([len(idx)])
                    for r in per_row(g):
                        idx.extend(r)
                        ptr[-1].append(len(idx))
                return (torch.tensor(ptr, dtype=torch.int32).view(self.num_kv_heads, -1),
                        torch.tensor(idx, dtype=torch.int32))

            row_ptr, col_idx = lists(lambda g: (self.kv_tiles(g, t) for t in range(self.num_q_tiles)))
            col_ptr, row_idx = lists(lambda g: (self.q_tiles(g, u) for u in range(self.num_kv_tiles)))
            self._csr = CSR(row_ptr, col_idx, col_ptr, row_idx)
        return self._csr

    def key_index(self, g: int, t: int) -> torch.Tensor:
        """int64 key rows that (kv head g, q tile t) reads: the listed tiles concatenated."""
        cache = self._key_index_cache
        if (g, t) not in cache:
            bs = self.block_size
            parts = [torch.arange(int(self.kv_start[u]), min(int(self.kv_start[u]) + bs, int(self.kv_end[u])))
                     for u in self.kv_tiles(g, t)]
            cache[(g, t)] = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        return cache[(g, t)]


# ---- tiles ------------------------------------------------------------------------------------------
def _segment_tiles(starts: torch.Tensor, ends: torch.Tensor, bs: int, first: Optional[torch.Tensor] = None):
    """Tiles of the segments ``[starts[i], ends[i])`` (int64), each cut at ``first[i]`` (the end of a
    partial first tile, default ``starts[i]``: none) and then every ``bs`` rows.

    Returns int64 (tile start, tile end (= its segment's end, or the partial tile's own end), segment
    id, tile index inside the segment, first tile of the tile's segment)."""
    first = starts if first is None else first
    head = (first > starts).to(torch.int64)  # a partial first tile [start, first)
    rest = (ends - first + bs - 1).clamp(min=0) // bs
    count = head + rest
    total = int(count.sum())
    seg = torch.repeat_interleave(torch.arange(len(starts)), count, output_size=total)
    seg_first = torch.cumsum(count, 0) - count
    j = torch.arange(total) - seg_first[seg]
    h = head[seg]
    start = torch.where((j == 0) & (h == 1), starts[seg], first[seg] + (j - h) * bs)
    end = torch.where((j == 0) & (h == 1), first[seg], ends[seg])
    return start, end, seg, j, seg_first[seg]


def _columns(*parts: torch.Tensor) -> torch.Tensor:
    """``[..., len(parts)]`` int32 with ``parts`` (broadcast) as its last-dim columns."""
    shape = torch.broadcast_shapes(*(p.shape for p in parts))
    out = torch.empty((len(parts), *shape), dtype=torch.int32)
    for i, p in enumerate(parts):
        out[i].copy_(p)  # broadcasting copy (torch.stack of expanded views is ~30x slower)
    return out.permute(*range(1, len(shape) + 1), 0).contiguous()


def _runs_s2(layout: S2Layout, num_kv_heads: int, kv_head_offset: int, total_kv_heads: int,
             qb: torch.Tensor, kb0_q: torch.Tensor, nk_q: torch.Tensor, kfirst_q: torch.Tensor,
             kb: torch.Tensor, qb0_k: torch.Tensor, nq_k: torch.Tensor, qfirst_k: torch.Tensor):
    """Rows / cols of an S2 layout. Per q tile: its block ``qb``, and of its segment's kv tiles the
    block of the first (``kb0_q``), their count ``nk_q`` and the first one's index ``kfirst_q``;
    per kv tile the same the other way round. Blocks of consecutive tiles of a segment are
    consecutive (tiles follow block boundaries)."""
    step = layout.head_step()
    g = kv_head_offset + torch.arange(num_kv_heads, dtype=torch.int64)[:, None]
    dense = (g >= total_kv_heads - layout.num_dense_heads) if layout.num_dense_heads else torch.zeros_like(g, dtype=torch.bool)
    c = g * step + layout.head_sliding_offset  # column j is strided iff (j + c) % vert_stride == 0
    vs, local = layout.vert_stride, layout.local_blocks
    # rows: kv tiles u (local to the segment) with kb0 + u <= qb, band: qb - kb0 - u < local
    u_hi = torch.minimum(nk_q - 1, qb - kb0_q)[None]                    # last visible (causal)
    band_lo = torch.clamp(qb - local + 1 - kb0_q, min=0)[None].expand_as(u_hi)
    band_lo = torch.where(dense, torch.zeros_like(band_lo), band_lo)
    n2 = torch.clamp(u_hi - band_lo + 1, min=0)
    s_hi = torch.minimum(band_lo - 1, u_hi)                               # strided part: u <= s_hi
    u0 = torch.remainder(-(kb0_q[None] + c), vs)                         # first strided u >= 0
    n1 = torch.where(s_hi >= u0, (s_hi - u0) // vs + 1, torch.zeros_like(u0))
    n1 = torch.where(dense, torch.zeros_like(n1), n1)
    rows = _columns(kfirst_q + u0, n1, kfirst_q + band_lo, n2)
    # cols: q tiles t (local) with qb0 + t >= kb; kb + local > qb0 + t unless the column is strided
    t_lo = torch.clamp(kb - qb0_k, min=0)[None].expand(num_kv_heads, -1)
    strided = (torch.remainder(kb[None] + c, vs) == 0) | dense
    t_hi = torch.where(strided, (nq_k - 1)[None], torch.minimum(nq_k - 1, kb + local - 1 - qb0_k)[None])
    cols = _columns(qfirst_k + t_lo, torch.clamp(t_hi - t_lo + 1, min=0))
    return rows, cols, vs


def _runs_dense(causal: bool, num_kv_heads: int, bs: int, qpos_last: torch.Tensor, kpos0_q: torch.Tensor,
                nk_q: torch.Tensor, kfirst_q: torch.Tensor, kpos_first: torch.Tensor, qfirst_k: torch.Tensor,
                nq_k: torch.Tensor, window: int = 0, qpos_first: Optional[torch.Tensor] = None,
                kpos_last: Optional[torch.Tensor] = None):
    """Rows / cols of dense attention: a tile pair is listed when one of its (q, k) pairs can be
    visible, ``kpos_first[u] <= qpos_last[t]`` (kv tiles of a segment start every ``bs`` tokens
    from ``kpos0_q``; ``qpos_last`` ascends over all q tiles) and, with a sliding ``window``,
    ``qpos_first[t] - kpos_last[u] < window``: the band run starts at the first kv tile that ends
    inside the window of the q tile's first row, so tiles left of it are skipped, not masked."""
    if causal:
        n2 = torch.clamp((qpos_last - kpos0_q) // bs + 1, min=0)
        n2 = torch.minimum(n2, nk_q)
        t_lo = torch.maximum(torch.searchsorted(qpos_last, kpos_first), qfirst_k)
        t_end = qfirst_k + nq_k
        u_lo = torch.zeros_like(n2)
        if window:
            # kv tile u ends at kpos0 + u*bs + bs - 1 >= qpos_first - window + 1
            u_lo = torch.minimum(torch.clamp((qpos_first - window + 1 - kpos0_q) // bs, min=0), n2)
            t_end = torch.minimum(t_end, torch.searchsorted(qpos_first, kpos_last + window - 1, right=True))
        cols = _columns(t_lo, torch.clamp(t_end - t_lo, min=0))
        rows = _columns(kfirst_q, torch.zeros_like(n2), kfirst_q + u_lo, n2 - u_lo)
        return rows, cols, 1
    cols = _columns(qfirst_k, nq_k)
    rows = _columns(kfirst_q, torch.zeros_like(nk_q), kfirst_q, nk_q)
    return rows, cols, 1


def build_plan_uncached(layout: Optional[S2Layout], causal: bool, num_kv_heads: int, seq_q: int, seq_k: int,
                        q_offset: int, k_offset: int, cu_seqlens: Optional[tuple[int, ...]], block_size: int,
                        kv_head_offset: int = 0, total_kv_heads: Optional[int] = None,
                        window: int = 0) -> TilePlan:
    """:func:`build_plan` without the cache (benchmarks)."""
    if window and (layout is not None or not causal):
        raise ValueError("a sliding window applies to dense causal attention only")
    bs = block_size
    i64 = lambda x: torch.as_tensor(x, dtype=torch.int64)  # noqa: E731  host tables, never on a device
    if cu_seqlens is not None:
        cu = i64(cu_seqlens)
        qs, qe, seg, j, first = _segment_tiles(cu[:-1], cu[1:], bs)
        ks, ke = qs, qe
        ntiles = (cu[1:] - cu[:-1] + bs - 1) // bs
        # per tile, the segment (document) of q tiles == of kv tiles
        qb = j
        kb0_q = torch.zeros_like(j)
        nk_q = nq_k = ntiles[seg]
        kfirst_q = qfirst_k = first
        kb, qb0_k = j, kb0_q
        qpos_last = torch.minimum(qs + bs, qe) - 1
        qpos_first, kpos_last = qs, torch.minimum(ks + bs, ke) - 1
        kpos0_q, kpos_first = cu[:-1][seg], ks
        q_shift = k_shift = 0
    else:
        if layout is not None:  # tiles on absolute block boundaries (a partial first tile)
            qfirst_row = (bs - q_offset % bs) % bs
            kfirst_row = (bs - k_offset % bs) % bs
            qs, qe, _, tq, _ = _segment_tiles(i64([0]), i64([seq_q]), bs, i64([min(seq_q, qfirst_row)]))
            ks, ke, _, tk, _ = _segment_tiles(i64([0]), i64([seq_k]), bs, i64([min(seq_k, kfirst_row)]))
        else:
            qs, qe, _, tq, _ = _segment_tiles(i64([0]), i64([seq_q]), bs)
            ks, ke, _, tk, _ = _segment_tiles(i64([0]), i64([seq_k]), bs)
        nq, nk = len(qs), len(ks)
        qb = tq + q_offset // bs
        kb = tk + k_offset // bs
        kb0_q = torch.full((nq,), k_offset // bs, dtype=torch.int64)
        qb0_k = torch.full((nk,), q_offset // bs, dtype=torch.int64)
        nk_q, nq_k = torch.full((nq,), nk, dtype=torch.int64), torch.full((nk,), nq, dtype=torch.int64)
        kfirst_q, qfirst_k = torch.zeros(nq, dtype=torch.int64), torch.zeros(nk, dtype=torch.int64)
        qpos_last = torch.minimum(qs + bs, qe) - 1 + q_offset
        qpos_first, kpos_last = qs + q_offset, torch.minimum(ks + bs, ke) - 1 + k_offset
        kpos0_q = torch.full((nq,), k_offset, dtype=torch.int64)
        kpos_first = ks + k_offset
        q_shift, k_shift = q_offset, k_offset
    if layout is not None:
        total = layout.validate_head_slice(num_kv_heads, kv_head_offset, total_kv_heads)
        rows, cols, stride = _runs_s2(layout, num_kv_heads, kv_head_offset, total, qb, kb0_q, nk_q, kfirst_q,
                                      kb, qb0_k, nq_k, qfirst_k)
    else:
        rows, cols, stride = _runs_dense(causal, num_kv_heads, bs, qpos_last, kpos0_q, nk_q, kfirst_q, kpos_first,
                                         qfirst_k, nq_k, window, qpos_first, kpos_last)
    if rows.dim() == 2:  # dense: one pattern for every kv head
        rows, cols = rows[None].expand(num_kv_heads, -1, -1), cols[None].expand(num_kv_heads, -1, -1)
    nnz = rows[..., 1].sum(-1, dtype=torch.int64) + rows[..., 3].sum(-1, dtype=torch.int64)
    i32 = lambda x: x.to(torch.int32).contiguous()  # noqa: E731
    return TilePlan(
        block_size=bs, num_kv_heads=num_kv_heads, causal=causal, q_shift=q_shift, k_shift=k_shift,
        q_start=i32(qs), q_end=i32(qe), kv_start=i32(ks), kv_end=i32(ke), rows=i32(rows), cols=i32(cols),
        tile_ids=torch.arange(len(qs), dtype=torch.int32),
        stride=stride, nnz_per_kv_head=tuple(int(x) for x in nnz), window=window,
    )


# plans kept (host tables + device copies); the least recently used go first past the bound
PLAN_CACHE_BYTES = int(float(os.environ.get("SEQPAR_PLAN_CACHE_MB", "256")) * 2 ** 20)
_CACHE = BoundedCache(PLAN_CACHE_BYTES, TilePlan.nbytes)


def build_plan(layout: Optional[S2Layout], causal: bool, num_kv_heads: int, seq_q: int, seq_k: int,
               q_offset: int, k_offset: int, cu_seqlens: Optional[tuple[int, ...]], block_size: int,
               kv_head_offset: int = 0, total_kv_heads: Optional[int] = None, window: int = 0) -> TilePlan:
    """Build (and cache) the plan. ``layout=None`` is dense (causal or not) at ``block_size``;
    ``window > 0`` (dense causal): Mistral's sliding window, kv tiles outside it are not listed.

    ``kv_head_offset`` / ``total_kv_heads``: the plan's kv heads are global kv heads
    ``kv_head_offset ..`` of ``total_kv_heads`` (S2 patterns follow the global index).

    With ``cu_seqlens`` (``seq_q == seq_k``, offsets 0) tiles restart at each document start and
    block indices are relative to it; otherwise S2 tiles follow absolute blocks: with an offset that
    is not a multiple of ``block_size`` (one-token decode at any position) the first q / kv tile is
    the partial block up to the next boundary, so every tile lies in one absolute block.
    """
    key = (layout, causal, num_kv_heads, seq_q, seq_k, q_offset, k_offset, cu_seqlens, block_size,
           kv_head_offset, total_kv_heads, window)
    return _CACHE.get_or_build(key, lambda: build_plan_uncached(*key))
