"""S2 stride-aware K/V exchange: each rank receives exactly the remote K/V rows its queries read.

An S2 kv head reads, beyond its local window, only the block columns of its stride residue (all of
them for a dense head). So instead of all-gathering every K/V block, the exchange asks the layout's
own block mask which remote ``(kv head, token)`` rows the local query pieces read and moves only
those, with **one variable-size all-to-all**:

- blocks are counted inside each document (the layout restarts at every document, as on one rank:
  block = position in the document // block_size), and a document's queries read only its keys,
  so nothing of another document moves;
- a row is sent to a rank only if that rank's queries read it (causality included: under zigzag
  the blocks of chunk 2P-1 are read by no other rank and go nowhere; rank r's late chunk goes only
  to the ranks holding later chunks; the diagonal block only up to the last query that reads it);
- window blocks (the ``local_blocks - 1`` blocks before a query block) and column blocks come out of
  the same mask, so dense heads, ``homo_head`` and the global head index under tensor parallelism
  (``kv_head_offset`` / ``total_kv_heads``) follow automatically, and nothing is sent twice;
- pieces need not be whole blocks (any sequence or document length): a block split between ranks
  travels as rows, only the part a rank does not hold.

The receiver scatters what arrives, plus its own rows, into **one** zero-filled K/V buffer in the
real order that ends at its last piece (not at N) with two in-place ``index_copy_`` and runs the
local S2 op per query piece at its position in its document. Backward is the adjoint: one
all-to-all with the splits reversed. The plan and the exchange are :mod:`seqpar.cp.row_exchange`'s
(shared with the all-gather's sliding-window halo); this module only says which rows S2 reads.

Peak extra memory: send rows + received rows + the buffer, at most about one full-length K/V,
versus a gathered copy plus its reordered copy (two) for the plain all-gather; see
:func:`exchange_buffer_elements`. The plans are built once per (partition, layout, heads, rank) and
their index tensors once per device (no host work or host-to-device copies per layer).

Bytes differ per rank (rank 0, holding chunk 2P-1, receives the most): :func:`exchange_rows` gives
the exact ``[receiver][sender]`` row counts that ``cp.scheme_cost(rank=)`` and the ledger share;
roughly, per sparse kv head, ``1/vert_stride`` of the causally needed blocks plus the windows.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from seqpar.cp.comm import Comm
from seqpar.cp.local import LocalOp, scatter_pieces
from seqpar.cp.partition import Layout
from seqpar.cp.row_exchange import exchange, extent, owner, row_counts, row_plan


def needed_rows(lay: Layout, layout: Any, hkv: int, off: int, total: int, receiver: int) -> torch.Tensor:
    """int64 rows ``real token * hkv + g`` of other ranks that ``receiver``'s queries read (host),
    ordered by (document, block, kv head, token). Work is O(key blocks x kv heads + rows) per
    document (no query x key block mask), so plans and ``cp.scheme_cost`` stay fast at millions
    of tokens."""
    def build() -> torch.Tensor:
        bs, band = layout.block_size, layout.local_blocks
        ranges: dict[int, list[tuple[int, int]]] = {}
        for p in lay.pieces[receiver]:
            ranges.setdefault(p.doc, []).append((p.pos, p.end))
        rows = [torch.zeros(0, dtype=torch.int64)]
        for doc in sorted(ranges):
            # query block (in the document) -> its last query position held here
            blk = torch.cat([torch.arange(pos // bs, (end - 1) // bs + 1) for pos, end in ranges[doc]])
            end = torch.cat([torch.full(((e - 1) // bs - p // bs + 1,), e) for p, e in ranges[doc]])
            qb, inv = torch.unique(blk, return_inverse=True)  # sorted
            qlast = torch.full((len(qb),), -1, dtype=torch.int64).scatter_reduce(
                0, inv, torch.minimum(end, (blk + 1) * bs) - 1, "amax")  # increasing with the block
            kb = torch.arange(int(qb[-1]) + 1)
            # the last query that reads each (kv head, key block): keys after it are never read.
            # A stride column (or a dense head) is read by every later query block, the rest only
            # by the query blocks of the band [j, j + local_blocks - 1]; the layout's mask seen from a
            # query block beyond every band says which key blocks are stride columns of which head.
            column = layout.kv_block_mask(hkv, kb[-1:] + band, kb, kv_head_offset=off,
                                          total_kv_heads=total)[:, 0, :]  # [hkv, key blocks]
            i = torch.searchsorted(qb, kb + band - 1, right=True) - 1  # last query block in the band
            in_band = (i >= 0) & (qb[i.clamp_min(0)] >= kb)
            limit = torch.where(column, qlast[-1], torch.where(in_band, qlast[i.clamp_min(0)], -1)[None, :])
            jg = (limit >= 0).t().nonzero()  # (key block, head), by block then head
            tok = jg[:, :1] * bs + torch.arange(bs)[None, :]  # positions in the document
            keep = (tok <= limit[jg[:, 1], jg[:, 0]][:, None]) & (tok < lay.doc_real[doc])
            real = lay.doc_start[doc] + tok
            rows.append((real * hkv + jg[:, 1:])[keep])
        rows_t = torch.cat(rows)
        return rows_t[owner(lay)[rows_t // hkv] != receiver]
    return lay.cached(("s2_needed", layout, hkv, off, total, receiver), build)


def exchange_rows(lay: Layout, layout: Any, hkv: int, off: int = 0,
                  total: Optional[int] = None) -> tuple[tuple[int, ...], ...]:
    """``counts[q][r]``: (kv head, token) rows rank ``q`` receives from rank ``r`` (0 on the diagonal)."""
    total = off + hkv if total is None else total

    def build():
        return row_counts(lay, lambda q: needed_rows(lay, layout, hkv, off, total, q), hkv)
    return lay.cached(("s2_counts", layout, hkv, off, total), build)


def exchange_buffer_elements(lay: Layout, layout: Any, *, kv_heads: int, width: int, batch: int = 1, rank: int = 0,
                             kv_head_offset: int = 0, total_kv_heads: Optional[int] = None) -> dict[str, int]:
    """Elements of the exchange's buffers on ``rank`` (``send``, ``recv``, ``buffer``, ``total``) and of
    the plain all-gather's (``allgather``: gathered + reordered full-length K/V), ``width = d + dv``."""
    counts = exchange_rows(lay, layout, kv_heads, kv_head_offset, total_kv_heads)
    row = batch * width
    send = sum(counts[q][rank] for q in range(lay.world)) * row
    recv = sum(counts[rank]) * row
    buffer = extent(lay, rank) * kv_heads * row
    return {"send": send, "recv": recv, "buffer": buffer, "total": send + recv + buffer,
            "allgather": 2 * lay.world * lay.local_len * kv_heads * row}


def s2_exchange_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *, layout: Layout,
                          op: LocalOp, s2_layout: Any, kv_head_offset: int = 0,
                          total_kv_heads: Optional[int] = None) -> torch.Tensor:
    """Local buffers in (``q [b, L, H, d]``, ``k/v [b, L, H_kv, d|dv]``), local S2 output out (0 in
    padding slots; autograd-exact through the exchange). Local kv head ``g`` is global
    ``kv_head_offset + g``."""
    lay, rank = layout, comm.rank
    hkv, d = k.shape[2], k.shape[3]
    total = kv_head_offset + hkv if total_kv_heads is None else total_kv_heads
    plan = row_plan(lay, ("s2_plan", s2_layout, hkv, kv_head_offset, total),
                    lambda q: needed_rows(lay, s2_layout, hkv, kv_head_offset, total, q), hkv, rank, q.device)
    full = exchange(torch.cat([k, v], dim=-1), comm, plan)  # [b, extent, hkv, d + dv], real order
    outs = []
    for p in lay.pieces[rank]:
        lo = lay.doc_start[p.doc]
        o, _ = op(q[:, p.local:p.local + p.length], full[:, lo:lo + p.end, :, :d], full[:, lo:lo + p.end, :, d:],
                  p.pos, 0, None)
        outs.append(o)
    return scatter_pieces(outs, lay, rank, tail=(q.shape[2], v.shape[-1]), ties=(q, full))
