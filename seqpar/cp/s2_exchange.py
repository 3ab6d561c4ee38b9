"""S2 stride-aware K/V exchange: each rank receives exactly the remote K/V blocks its queries read.

An S2 kv head reads, beyond its local window, only the block columns of its stride residue (all of
them for a dense head). So instead of all-gathering every K/V block, the exchange asks the layout's
own block mask which remote ``(kv head, block)`` pairs the local query chunks read and moves only
those, with **one variable-size all-to-all**:

- a block is sent to a rank only if that rank's queries read it (causality included: under zigzag
  the blocks of chunk 2P-1 are read by no other rank and go nowhere; rank r's late chunk goes only
  to the ranks holding later chunks);
- window blocks (the ``local_blocks - 1`` blocks before a chunk) and column blocks come out of the
  same mask, so dense heads, ``homo_head`` and the global head index under tensor parallelism
  (``kv_head_offset`` / ``total_kv_heads``) follow automatically, and nothing is sent twice.

The receiver scatters what arrives, plus its own chunks, into **one** zero-filled K/V buffer that
ends at its last chunk (``(max chunk id + 1) · c`` tokens, not N) with two in-place
``index_copy_`` — one buffer, no per-head or per-rank copies — and runs the local S2 op per query
chunk with absolute offsets. Backward is the adjoint: one all-to-all with the splits reversed.

Peak extra memory: send rows + received rows + the buffer, at most about one full-length K/V,
versus a gathered copy plus its reordered copy (two) for the plain all-gather; see
:func:`exchange_buffer_elements`. The index tensors are built once per (layout, shape, rank,
device) on the device and cached (no host work or host-to-device copies per layer).

Bytes differ per rank (rank 0, holding chunk 2P-1, receives the most): :func:`exchange_blocks`
gives the exact ``[receiver][sender]`` block counts that ``cp.scheme_cost(rank=)`` and the ledger
share; roughly, per sparse kv head, ``1/vert_stride`` of the causally needed blocks plus the windows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch

from seqpar.cp.comm import Comm, all_to_all_v_autograd
from seqpar.cp.local import LocalOp
from seqpar.cp.partition import chunk_ids


def exchange_applies(layout: Any, chunk_len: int) -> bool:
    """True when chunks are whole blocks (blocks stay absolute); cp.attention validates this for s2."""
    return chunk_len % layout.block_size == 0


@functools.lru_cache(maxsize=64)
def _needed(layout: Any, world: int, balance: str, chunk_len: int, hkv: int, off: int, total: int,
            receiver: int) -> torch.Tensor:
    """bool ``[hkv, num_blocks]`` (host): remote blocks the receiver's queries read, per kv head
    (blocks of its own chunks excluded; blocks after its last chunk are never read: causal)."""
    bs = layout.block_size
    cb = chunk_len // bs
    ids = chunk_ids(receiver, world, balance)
    nb = (max(ids) + 1) * cb
    q_blocks = torch.cat([torch.arange(cid * cb, (cid + 1) * cb) for cid in ids])
    mask = layout.kv_block_mask(hkv, q_blocks, torch.arange(nb), kv_head_offset=off, total_kv_heads=total)
    need = mask.any(dim=1)  # [hkv, nb]
    for cid in ids:
        need[:, cid * cb:(cid + 1) * cb] = False
    return need


def _block_owner(world: int, balance: str, cb: int) -> torch.Tensor:
    owner = torch.empty(len(chunk_ids(0, world, balance)) * world * cb, dtype=torch.int64)
    for r in range(world):
        for cid in chunk_ids(r, world, balance):
            owner[cid * cb:(cid + 1) * cb] = r
    return owner


@functools.lru_cache(maxsize=64)
def exchange_blocks(layout: Any, world: int, balance: str, chunk_len: int, kv_heads: int,
                    kv_head_offset: int = 0, total_kv_heads: Optional[int] = None) -> tuple[tuple[int, ...], ...]:
    """``counts[q][r]``: (kv head, block) pairs rank ``q`` receives from rank ``r`` (0 on the diagonal)."""
    total = kv_head_offset + kv_heads if total_kv_heads is None else total_kv_heads
    owner = _block_owner(world, balance, chunk_len // layout.block_size)
    out = []
    for q in range(world):
        need = _needed(layout, world, balance, chunk_len, kv_heads, kv_head_offset, total, q)
        per_block = need.sum(0)  # heads needed per block
        own = owner[:need.shape[1]]
        out.append(tuple(int(per_block[own == r].sum()) for r in range(world)))
    return tuple(out)


def exchange_buffer_elements(layout: Any, *, world: int, balance: str, chunk_len: int, kv_heads: int, width: int,
                             batch: int = 1, rank: int = 0, kv_head_offset: int = 0,
                             total_kv_heads: Optional[int] = None) -> dict[str, int]:
    """Elements of the exchange's buffers on ``rank`` (``send``, ``recv``, ``buffer``, ``total``) and of
    the plain all-gather's (``allgather``: gathered + reordered full-length K/V), ``width = d + dv``."""
    counts = exchange_blocks(layout, world, balance, chunk_len, kv_heads, kv_head_offset, total_kv_heads)
    row = batch * width * layout.block_size
    send = sum(counts[q][rank] for q in range(world)) * row
    recv = sum(counts[rank]) * row
    buffer = (max(chunk_ids(rank, world, balance)) + 1) * chunk_len * kv_heads * batch * width
    n = len(chunk_ids(0, world, balance)) * world * chunk_len
    return {"send": send, "recv": recv, "buffer": buffer, "total": send + recv + buffer,
            "allgather": 2 * n * kv_heads * batch * width}


@dataclass(frozen=True)
class _Plan:
    send_idx: torch.Tensor   # rows (local token * hkv + g) to send, grouped by destination rank
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    recv_rows: torch.Tensor  # buffer rows (global token * hkv + g) of the received rows, by source rank
    own_rows: torch.Tensor   # buffer rows of the local tokens (local order), all heads
    length: int              # buffer tokens: the end of this rank's last chunk


def _rows(need: torch.Tensor, owner: torch.Tensor, src: int, bs: int, hkv: int) -> torch.Tensor:
    """Global rows (token * hkv + g) of the needed blocks owned by ``src``, ordered (block, head, token)."""
    sel = need & (owner[:need.shape[1]] == src)[None, :]
    jg = sel.t().nonzero()  # [m, 2] = (block, head), sorted by block then head
    tok = jg[:, :1] * bs + torch.arange(bs)[None, :]  # [m, bs]
    return (tok * hkv + jg[:, 1:]).reshape(-1)


_PLANS: dict[tuple, _Plan] = {}


def _plan(layout: Any, world: int, rank: int, balance: str, c: int, hkv: int, off: int, total: int,
          device: torch.device) -> _Plan:
    key = (layout, world, rank, balance, c, hkv, off, total, str(device))
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    bs = layout.block_size
    ids = chunk_ids(rank, world, balance)
    owner = _block_owner(world, balance, c // bs)
    # global token -> local position on its owner (chunks stored in chunk_ids order)
    local_of = torch.empty(owner.numel() * bs, dtype=torch.int64)
    for r in range(world):
        for j, cid in enumerate(chunk_ids(r, world, balance)):
            local_of[cid * c:(cid + 1) * c] = torch.arange(j * c, (j + 1) * c)
    send, send_splits = [], []
    for q in range(world):
        rows = (torch.zeros(0, dtype=torch.int64) if q == rank else
                _rows(_needed(layout, world, balance, c, hkv, off, total, q), owner, rank, bs, hkv))
        send.append(local_of[rows // hkv] * hkv + rows % hkv)
        send_splits.append(rows.numel())
    mine = _needed(layout, world, balance, c, hkv, off, total, rank)
    recv = [torch.zeros(0, dtype=torch.int64) if r == rank else _rows(mine, owner, r, bs, hkv) for r in range(world)]
    own_tok = torch.cat([torch.arange(cid * c, (cid + 1) * c) for cid in ids])
    own_rows = (own_tok[:, None] * hkv + torch.arange(hkv)[None, :]).reshape(-1)
    plan = _Plan(torch.cat(send).to(device), tuple(send_splits), tuple(r.numel() for r in recv),
                 torch.cat(recv).to(device), own_rows.to(device), (max(ids) + 1) * c)
    if len(_PLANS) > 64:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def s2_exchange_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *, balance: str,
                          op: LocalOp, layout: Any, kv_head_offset: int = 0,
                          total_kv_heads: Optional[int] = None) -> torch.Tensor:
    """Local shards in (``q [b, s_loc, H, d]``, ``k/v [b, s_loc, H_kv, d|dv]``), local S2 output out
    (autograd-exact through the exchange). Local kv head ``g`` is global ``kv_head_offset + g``."""
    p, rank = comm.world, comm.rank
    ids = chunk_ids(rank, p, balance)
    c = q.shape[1] // len(ids)
    b, s_loc, hkv, d = k.shape
    total = kv_head_offset + hkv if total_kv_heads is None else total_kv_heads
    plan = _plan(layout, p, rank, balance, c, hkv, kv_head_offset, total, q.device)
    kv = torch.cat([k, v], dim=-1)  # [b, s_loc, hkv, w]
    w = kv.shape[-1]
    rows = kv.reshape(b, s_loc * hkv, w)
    send = rows.transpose(0, 1).index_select(0, plan.send_idx)  # [R_send, b, w], one copy
    recv = all_to_all_v_autograd(send, comm, plan.send_splits, plan.recv_splits)  # [R_recv, b, w]
    full = kv.new_zeros((b, plan.length * hkv, w))
    full.index_copy_(1, plan.recv_rows, recv.transpose(0, 1))
    full.index_copy_(1, plan.own_rows, rows)
    full = full.view(b, plan.length, hkv, w)
    outs = []
    for j, cid in enumerate(ids):
        end = (cid + 1) * c
        o, _ = op(q[:, j * c:(j + 1) * c], full[:, :end, :, :d], full[:, :end, :, d:], cid * c, 0, None)
        outs.append(o)
    return torch.cat(outs, dim=1)
