"""S2 stride-aware K/V exchange: each kv head receives only the remote blocks its pattern reads.

An S2 kv head ``g`` reads, beyond its local window, only the block columns ``j`` with
``j mod vert_stride`` in a head-specific residue set (one residue for a sparse head, all of them
for a dense head). So instead of all-gathering every K/V block:

1. **columns**: each rank packs, per kv head, the tokens of its own blocks in that head's column
   set and all-gathers the pack (one call, heads concatenated along the token axis);
2. **window**: each rank all-gathers the last ``local_blocks - 1`` blocks of each of its chunks
   (all heads): the only non-column blocks a query chunk reads across its chunk boundary.

Both pieces are scattered into a full-length K/V (blocks never read stay zero), and the local S2
op runs per query chunk with absolute offsets. Backward is the adjoint: two reduce-scatters.
Bytes ≈ ``1/vert_stride`` of the full all-gather (for sparse heads) plus the boundary windows.
Requires every chunk to be a multiple of ``vert_stride`` blocks (equal packs on every rank) and
``local_blocks - 1 <= blocks per chunk``; :func:`exchange_applies` tells, and ``cp.attention``
falls back to the plain all-gather otherwise.
"""

from __future__ import annotations

from typing import Any

import torch

from seqpar.cp.comm import Comm, all_gather_autograd
from seqpar.cp.local import LocalOp
from seqpar.cp.partition import chunk_ids


def column_residues(layout: Any, num_kv_heads: int) -> list[list[int]]:
    """Per kv head, the residues ``j mod vert_stride`` of the block columns read beyond the window
    (taken from the layout's own mask, so dense heads and ``homo_head`` follow automatically)."""
    vs, lb = layout.vert_stride, layout.local_blocks
    far_row = torch.tensor([lb + vs])  # every column 0..vs-1 is outside this row's window
    m = layout.kv_block_mask(num_kv_heads, far_row, torch.arange(vs))[:, 0]  # [hkv, vs]
    return [torch.nonzero(m[g]).flatten().tolist() for g in range(num_kv_heads)]


def exchange_applies(layout: Any, chunk_len: int) -> bool:
    """True when chunks are whole multiples of ``vert_stride`` blocks and cover the window."""
    if chunk_len % layout.block_size:
        return False
    cb = chunk_len // layout.block_size
    return cb % layout.vert_stride == 0 and layout.local_blocks - 1 <= cb


def exchange_elements(layout: Any, *, world: int, seq_len: int, batch: int, kv_heads: int, width: int,
                      balance: str) -> tuple[int, int]:
    """Elements one rank sends in the (columns, window) all-gathers; ``width = d + dv``."""
    n_loc = len(chunk_ids(0, world, balance))
    c = seq_len // (world * n_loc)
    cb, bs = c // layout.block_size, layout.block_size
    cols = sum(len(r) for r in column_residues(layout, kv_heads)) * (cb // layout.vert_stride) * bs * n_loc
    window = n_loc * (layout.local_blocks - 1) * bs
    return batch * cols * width, batch * window * kv_heads * width


def _column_positions(layout: Any, residues: list[int], chunk_ids_: tuple[int, ...], c: int) -> torch.Tensor:
    """Global token positions of the column blocks (given residues) inside the given chunks."""
    bs, vs = layout.block_size, layout.vert_stride
    pos = []
    for cid in chunk_ids_:
        for blk in range(cid * c // bs, (cid + 1) * c // bs):
            if blk % vs in residues:
                pos.append(torch.arange(blk * bs, (blk + 1) * bs))
    return torch.cat(pos) if pos else torch.zeros(0, dtype=torch.int64)


def s2_exchange_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *, balance: str,
                          op: LocalOp, layout: Any) -> torch.Tensor:
    """Local shards in, local S2 output out (autograd-exact through both exchanges)."""
    p, rank = comm.world, comm.rank
    ids = chunk_ids(rank, p, balance)
    c = q.shape[1] // len(ids)
    n = c * len(ids) * p
    d, hkv, dev = k.shape[-1], k.shape[2], q.device
    kv = torch.cat([k, v], dim=-1)  # [b, s_loc, hkv, w]
    res = column_residues(layout, hkv)
    # local position of a global token held here
    local_of = {cid: j * c for j, cid in enumerate(ids)}

    def to_local(pos: torch.Tensor) -> torch.Tensor:
        return torch.cat([pos[(pos >= cid * c) & (pos < (cid + 1) * c)] - cid * c + lo
                          for cid, lo in local_of.items()])

    # 1. columns: per head its own column tokens, heads concatenated along the token axis
    mine = [to_local(_column_positions(layout, res[g], ids, c)).to(dev) for g in range(hkv)]
    packed = torch.cat([kv[:, idx, g] for g, idx in enumerate(mine)], dim=1)  # [b, Σ_g n_g, w]
    cols = all_gather_autograd(packed, comm, dim=1)  # rank-major
    # scatter into a full-length K/V per head; later copies win (same values), so grads stay exact
    per_rank, heads = packed.shape[1], []
    for g in range(hkv):
        full = kv.new_zeros((kv.shape[0], n, kv.shape[-1]))
        for r in range(p):
            pos = _column_positions(layout, res[g], chunk_ids(r, p, balance), c).to(dev)
            start = r * per_rank + sum(len(m) for m in mine[:g])
            full = full.index_copy(1, pos, cols[:, start:start + pos.numel()])
        heads.append(full)
    full_kv = torch.stack(heads, dim=2)  # [b, n, hkv, w]
    # 2. window: the trailing local_blocks - 1 blocks of each local chunk, all heads
    wl = (layout.local_blocks - 1) * layout.block_size
    if wl:
        win_local = torch.cat([torch.arange(lo + c - wl, lo + c) for lo in local_of.values()]).to(dev)
        wins = all_gather_autograd(kv.index_select(1, win_local), comm, dim=1)  # [b, P * n_win, hkv, w]
        win_pos = torch.cat([torch.arange((cid + 1) * c - wl, (cid + 1) * c)
                             for r in range(p) for cid in chunk_ids(r, p, balance)]).to(dev)
        full_kv = full_kv.index_copy(1, win_pos, wins)
    own_pos = torch.cat([torch.arange(cid * c, (cid + 1) * c) for cid in ids]).to(dev)
    full_kv = full_kv.index_copy(1, own_pos, kv)
    outs = []
    for j, cid in enumerate(ids):
        end = (cid + 1) * c
        o, _ = op(q[:, j * c:(j + 1) * c], full_kv[:, :end, :, :d], full_kv[:, :end, :, d:], cid * c, 0, None)
        outs.append(o)
    return torch.cat(outs, dim=1)
