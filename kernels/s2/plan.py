"""Tile plans: the CSR / CSC index lists every S2 and flash kernel iterates.

A plan cuts q and k into tiles of ``block_size`` tokens (per document with varlen, so a tile
never crosses a document boundary) and lists, per (kv head, q tile), the kv tiles to compute
(CSR, forward and dq) and per (kv head, kv tile) the q tiles that read it (CSC, dk/dv). Kernels
never test a dense mask: they walk these lists, then apply token-level causality and bounds.

Plans are pure functions of (layout, shapes, offsets, boundaries) and are cached, host side and
per device, so a training step builds each one once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import torch

from seqpar.kernels.s2.layout import S2Layout


@dataclass(eq=False)
class TilePlan:
    """Tile tables (int32) and CSR/CSC lists for one attention problem.

    q tile ``t`` covers q rows ``[q_start[t], q_end[t])`` clipped by the tile width; kv tile ``u``
    covers keys ``[kv_start[u], kv_end[u])`` likewise. Causality (when ``causal``) compares
    ``q_row + q_shift >= k_row + k_shift``.
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
    row_ptr: torch.Tensor  # [Hkv, Tq + 1], absolute offsets into col_idx
    col_idx: torch.Tensor  # kv tile ids
    col_ptr: torch.Tensor  # [Hkv, Tk + 1], absolute offsets into row_idx
    row_idx: torch.Tensor  # q tile ids
    nnz_per_kv_head: tuple[int, ...]
    _device_cache: dict = field(default_factory=dict, repr=False)  # device -> moved plan
    _key_index_cache: dict = field(default_factory=dict, repr=False)  # (g, t) -> key rows (torch path)

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

    def to(self, device: torch.device) -> "TilePlan":
        device = torch.device(device)
        if device.type == "cpu":
            return self
        key = str(device)
        if key not in self._device_cache:
            names = ("q_start", "q_end", "kv_start", "kv_end", "row_ptr", "col_idx", "col_ptr", "row_idx")
            moved = {n: getattr(self, n).to(device) for n in names}
            self._device_cache[key] = TilePlan(
                self.block_size, self.num_kv_heads, self.causal, self.q_shift, self.k_shift,
                nnz_per_kv_head=self.nnz_per_kv_head, **moved,
            )
        return self._device_cache[key]

    def key_index(self, g: int, t: int) -> torch.Tensor:
        """int64 key rows that (kv head g, q tile t) reads: the listed tiles concatenated."""
        cache = self._key_index_cache
        if (g, t) not in cache:
            lo, hi = int(self.row_ptr[g, t]), int(self.row_ptr[g, t + 1])
            bs = self.block_size
            parts = [torch.arange(int(self.kv_start[u]), min(int(self.kv_start[u]) + bs, int(self.kv_end[u])))
                     for u in self.col_idx[lo:hi].tolist()]
            cache[(g, t)] = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        return cache[(g, t)]


def _tiles(starts_ends: list[tuple[int, int]], bs: int) -> tuple[list[int], list[int], list[int]]:
    """Per segment [s, e): tile starts, tile ends (segment end), and the segment id of each tile."""
    starts, ends, seg = [], [], []
    for d, (s, e) in enumerate(starts_ends):
        for t0 in range(s, e, bs):
            starts.append(t0)
            ends.append(e)
            seg.append(d)
    return starts, ends, seg


def _phased_tiles(n: int, offset: int, bs: int) -> tuple[list[int], list[int]]:
    """Tiles of rows [0, n) whose boundaries sit on absolute block boundaries (row r is position
    offset + r): a first partial tile when ``offset % bs``, then whole blocks. Ends: the partial
    tile's own end, the segment end otherwise (kernels clip tiles to ``bs`` rows)."""
    head = min(n, (bs - offset % bs) % bs)
    starts, ends = ([0], [head]) if head else ([], [])
    rest, _, _ = _tiles([(head, n)], bs)
    return starts + rest, ends + [n] * len(rest)


def _csr(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask bool [H, R, C] -> (ptr [H, R + 1] absolute, idx) in row-major order."""
    h, r, _ = mask.shape
    counts = mask.sum(-1).reshape(-1).to(torch.int64)
    ptr_flat = torch.zeros(h * r + 1, dtype=torch.int64)
    ptr_flat[1:] = torch.cumsum(counts, 0)
    # row i of head g starts at ptr_flat[g*r + i]; append each head's end so rows index [g, i+1]
    ptr = torch.stack([ptr_flat[g * r: g * r + r + 1] for g in range(h)])
    idx = mask.nonzero()[:, 2]
    return ptr.to(torch.int32), idx.to(torch.int32)


@lru_cache(maxsize=128)
def build_plan(layout: Optional[S2Layout], causal: bool, num_kv_heads: int, seq_q: int, seq_k: int,
               q_offset: int, k_offset: int, cu_seqlens: Optional[tuple[int, ...]], block_size: int,
               kv_head_offset: int = 0, total_kv_heads: Optional[int] = None) -> TilePlan:
    """Build (and cache) the plan. ``layout=None`` is dense (causal or not) at ``block_size``.

    ``kv_head_offset`` / ``total_kv_heads``: the plan's kv heads are global kv heads
    ``kv_head_offset ..`` of ``total_kv_heads`` (S2 patterns follow the global index).

    With ``cu_seqlens`` (``seq_q == seq_k``, offsets 0) tiles restart at each document start and
    block indices are relative to it; otherwise S2 tiles follow absolute blocks: with an offset that
    is not a multiple of ``block_size`` (one-token decode at any position) the first q / kv tile is
    the partial block up to the next boundary, so every tile lies in one absolute block.
    """
    bs = block_size
    if cu_seqlens is not None:
        docs = list(zip(cu_seqlens[:-1], cu_seqlens[1:]))
        qs, qe, qseg = _tiles(docs, bs)
        ks, ke, kseg = qs, qe, qseg
        doc_start = torch.tensor([docs[d][0] for d in qseg])
        qb = (torch.tensor(qs) - doc_start) // bs
        kb = qb
        same_doc = torch.tensor(qseg)[:, None] == torch.tensor(kseg)[None, :]
        qpos_last = torch.tensor([min(s + bs, e) - 1 for s, e in zip(qs, qe)])
        kpos_first = torch.tensor(ks)
        q_shift = k_shift = 0
    else:
        if layout is not None:
            qs, qe = _phased_tiles(seq_q, q_offset, bs)
            ks, ke = _phased_tiles(seq_k, k_offset, bs)
            qb = (torch.tensor(qs, dtype=torch.int64) + q_offset) // bs
            kb = (torch.tensor(ks, dtype=torch.int64) + k_offset) // bs
        else:
            qs, qe, _ = _tiles([(0, seq_q)], bs)
            ks, ke, _ = _tiles([(0, seq_k)], bs)
            qb = kb = None
        same_doc = torch.ones(len(qs), len(ks), dtype=torch.bool)
        qpos_last = torch.tensor([min(s + bs, e) - 1 for s, e in zip(qs, qe)]) + q_offset
        kpos_first = torch.tensor(ks) + k_offset
        q_shift, k_shift = q_offset, k_offset

    if layout is not None:
        # blocks relative to each document start (varlen) or absolute blocks decide the pattern
        mask = layout.kv_block_mask(num_kv_heads, qb, kb, kv_head_offset=kv_head_offset,
                                    total_kv_heads=total_kv_heads) & same_doc[None]
    else:
        # dense: a tile pair is listed when at least one of its (q, k) pairs can be visible
        visible = (kpos_first[None, :] <= qpos_last[:, None]) if causal else torch.ones(len(qs), len(ks), dtype=torch.bool)
        mask = (visible & same_doc)[None].expand(num_kv_heads, -1, -1)
    row_ptr, col_idx = _csr(mask)
    col_ptr, row_idx = _csr(mask.transpose(1, 2))
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return TilePlan(
        block_size=bs, num_kv_heads=num_kv_heads, causal=causal, q_shift=q_shift, k_shift=k_shift,
        q_start=i32(qs), q_end=i32(qe), kv_start=i32(ks), kv_end=i32(ke),
        row_ptr=row_ptr, col_idx=col_idx, col_ptr=col_ptr, row_idx=row_idx,
        nnz_per_kv_head=tuple(int(x) for x in mask.sum((1, 2))),
    )
