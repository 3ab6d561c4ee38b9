"""The S2 exchange's row plan (``needed_rows``: which remote (kv head, token) rows a rank's queries
read) equals a token-level brute force over the layout's mask, for random layouts (band, stride,
offset, dense heads, a tensor-parallel head slice), packed documents of awkward lengths and both
built-in balancers. The plan is computed per key block, not per (query block, key block) pair, so
``cp.scheme_cost("s2", "allgather")`` at millions of tokens takes seconds (benchmarks/cp_comm.py)."""

from __future__ import annotations

import random

import torch

from seqpar import cp
from seqpar.cp.s2_exchange import exchange_rows, needed_rows
from seqpar.kernels import S2Layout


def _brute(part: cp.Partition, layout: S2Layout, hkv: int, off: int, total: int, receiver: int) -> set[int]:
    owner = part.real_slots // part.local_len
    out: set[int] = set()
    for p in part.pieces[receiver]:
        n = part.doc_real[p.doc]
        t = torch.arange(n)
        blocks = layout.kv_block_mask(hkv, t // layout.block_size, t // layout.block_size, kv_head_offset=off,
                                      total_kv_heads=total)  # [hkv, n, n] by token
        seen = (blocks & (t[None, :] <= t[:, None]))[:, p.pos:p.end].any(1)  # [hkv, keys] read by the piece
        g, u = seen.nonzero(as_tuple=True)
        real = part.doc_start[p.doc] + u
        keep = owner[real] != receiver
        out |= set((real * hkv + g)[keep].tolist())
    return out


def test_needed_rows_equal_token_level_brute_force():
    rng = random.Random(0)
    for _ in range(40):
        world, hkv = rng.choice([2, 3, 4]), rng.choice([1, 2, 3])
        off = rng.choice([0, 1])
        total = off + hkv + rng.choice([0, 1])
        layout = S2Layout(block_size=16, local_blocks=rng.randint(1, 3), vert_stride=rng.randint(1, 5),
                          num_dense_heads=rng.randint(0, 1), head_sliding_offset=rng.randint(0, 2),
                          head_sliding_step=rng.randint(0, 2))
        docs = [rng.randint(1, 90) for _ in range(rng.randint(1, 4))]
        cu = [0, *torch.tensor(docs).cumsum(0).tolist()]
        part = cp.make_partition(sum(docs), (0, world), balance=rng.choice(["zigzag", "contiguous"]), cu_seqlens=cu)
        counts = exchange_rows(part, layout, hkv, off, total)
        for r in range(world):
            rows = needed_rows(part, layout, hkv, off, total, r)
            assert len(set(rows.tolist())) == rows.numel()  # nothing moves twice
            assert set(rows.tolist()) == _brute(part, layout, hkv, off, total, r), (docs, layout, r)
            assert sum(counts[r]) == rows.numel() and counts[r][r] == 0
