"""Test reference: the tile plan built from a dense tile mask (how ``kernels/s2/plan.py`` built it
before plans became O(nnz) runs). O(tiles^2) time and memory: small shapes only. The run-based
plans must list exactly these tiles in exactly this order (tests/test_s2_plans.py)."""

from __future__ import annotations

from typing import Optional

import torch

from seqpar.kernels.s2.layout import S2Layout


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


def build_plan_dense_mask(layout: Optional[S2Layout], causal: bool, num_kv_heads: int, seq_q: int, seq_k: int,
               q_offset: int, k_offset: int, cu_seqlens: Optional[tuple[int, ...]], block_size: int,
               kv_head_offset: int = 0, total_kv_heads: Optional[int] = None) -> TilePlan:
    """The old plan (arguments as ``seqpar.kernels.s2.plan.build_plan``) as a dict of its tables and CSR lists."""
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
    return dict(q_start=i32(qs), q_end=i32(qe), kv_start=i32(ks), kv_end=i32(ke), q_shift=q_shift, k_shift=k_shift,
                csr=(row_ptr, col_idx, col_ptr, row_idx), nnz_per_kv_head=tuple(int(x) for x in mask.sum((1, 2))))
