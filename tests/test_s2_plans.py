"""S2 / flash tile plans: arithmetic runs, O(kv heads x tiles), equal to the dense-mask plans.

``kernels/s2/plan.py`` used to build a dense ``[kv heads, q tiles, kv tiles]`` mask and call
``nonzero`` twice (1.2 s and +512 MB at 128K tokens; ~90 s and ~25 GB extrapolated at 1M) and
kept up to 128 plans with their device copies. Plans are now runs (a strided run and a band run
per q tile, one run per kv tile), built in O(kv heads x tiles). Here: they list exactly the tiles,
in exactly the order, of the old construction (tests/s2_plan_reference.py) at awkward shapes
(offsets mid-block, partial tiles, varlen, GQA head slices, dense heads, any stride / rotation),
their size at 1M tokens, and the byte bound of the plan cache (device copies included).
Build times are in ``benchmarks/plans.py``.
"""

from __future__ import annotations

import random

import pytest
import torch

from s2_plan_reference import build_plan_dense_mask
from seqpar.kernels import S2Layout
from seqpar.kernels.s2 import plan as plan_mod
from seqpar.kernels.s2.plan import build_plan, build_plan_uncached


def _cases(n: int, seed: int):
    rng = random.Random(seed)
    while n:
        bs = rng.choice([16, 32])
        hkv = rng.randint(1, 4)
        layout = None
        if rng.random() < 0.7:
            layout = S2Layout(block_size=bs, local_blocks=rng.randint(1, 4), vert_stride=rng.randint(1, 5),
                              num_dense_heads=rng.choice([0, 0, 1]), head_sliding_offset=rng.randint(0, 3),
                              head_sliding_step=rng.choice([None, 0, 1, 2, 3])).with_heads(hkv * rng.randint(1, 3))
        causal = layout is not None or rng.random() < 0.6
        if rng.random() < 0.35:  # varlen: documents not aligned to tiles, some shorter than a tile
            cu = [0]
            for _ in range(rng.randint(1, 5)):
                cu.append(cu[-1] + rng.randint(1, 70))
            sq = sk = cu[-1]
            qo = ko = 0
            cu = tuple(cu)
        else:
            cu = None
            sk = rng.randint(1, 150)
            sq = rng.randint(1, sk) if rng.random() < 0.7 else rng.randint(1, 150)
            ko = rng.randint(0, 40)
            qo = ko + sk - sq if rng.random() < 0.5 else rng.randint(0, 60)
            if layout is None:
                qo -= rng.randint(0, 20)  # dense: any offsets, rows that see nothing
        off = rng.randint(0, 2) if layout is not None else 0
        if layout is not None and layout.num_dense_heads > hkv:
            continue
        yield (layout, causal, hkv, sq, sk, qo, ko, cu, bs, off, hkv + off if layout is not None else None)
        n -= 1


def test_runs_list_the_dense_mask_plans_tiles_in_order():
    for args in _cases(250, seed=1):
        ref = build_plan_dense_mask(*args)
        new = build_plan_uncached(*args)
        csr = new.csr()
        for name, a, b in zip(csr._fields, ref["csr"], csr):
            assert torch.equal(a, b), (name, args)
        for name in ("q_start", "q_end", "kv_start", "kv_end"):
            assert torch.equal(ref[name], getattr(new, name)), (name, args)
        assert (ref["q_shift"], ref["k_shift"], ref["nnz_per_kv_head"]) == (new.q_shift, new.k_shift,
                                                                           new.nnz_per_kv_head), args


def test_plan_size_is_linear_in_tiles_at_1m_tokens():
    n, bs, hkv = 1 << 20, 64, 8
    lay = S2Layout(block_size=bs, local_blocks=4, vert_stride=8).with_heads(32)
    for layout, cu in ((lay, None), (None, None), (lay, tuple(range(0, n + 1, 256)))):  # 4096 documents
        plan = build_plan_uncached(layout, True, hkv, n, n, 0, 0, cu, bs)
        tiles = plan.num_q_tiles
        assert tiles == n // bs
        # 5 tile tables, 4 ints per row and 2 per column per kv head: ~3.3 MB, however dense
        assert plan.nbytes() == 4 * (5 * tiles + hkv * tiles * 6)
        nnz = sum(plan.nnz_per_kv_head)
        assert nnz > (hkv * tiles ** 2 // 20 if cu is None else hkv * tiles * 2)  # tile pairs it stands for
    dense = build_plan_uncached(None, True, hkv, n, n, 0, 0, None, bs)
    assert dense.nnz_per_kv_head == (tiles * (tiles + 1) // 2,) * hkv  # 134M pairs per kv head in 3.3 MB


def test_plan_cache_is_bounded_by_bytes_with_device_copies(monkeypatch):
    cache = plan_mod.BoundedCache(300_000, plan_mod.TilePlan.nbytes)
    monkeypatch.setattr(plan_mod, "_CACHE", cache)
    lay = S2Layout(block_size=16, local_blocks=2, vert_stride=4).with_heads(4)
    a = build_plan(lay, True, 2, 16384, 16384, 0, 0, None, 16)  # 1024 tiles: 57 KB
    assert build_plan(lay, True, 2, 16384, 16384, 0, 0, None, 16) is a and len(cache) == 1
    moved = a.to("meta")  # a device copy is cached on the plan and counted
    assert a.to("meta") is moved and a.nbytes() == 2 * 4 * (5 * 1024 + 2 * 1024 * 6)
    plans = [build_plan(lay, True, 2, 16384 + 16 * i, 16384, 16 * i, 0, None, 16) for i in range(1, 6)]
    assert cache.nbytes() <= 300_000 and len(cache) < 6
    assert build_plan(lay, True, 2, 16384, 16384, 0, 0, None, 16) is not a  # the oldest went first
    assert build_plan(lay, True, 2, 16384 + 80, 16384, 80, 0, None, 16) is plans[-1]
    huge = plan_mod.BoundedCache(1, plan_mod.TilePlan.nbytes)
    monkeypatch.setattr(plan_mod, "_CACHE", huge)
    assert build_plan(lay, True, 2, 64, 64, 0, 0, None, 16) is build_plan(lay, True, 2, 64, 64, 0, 0, None, 16)


@pytest.mark.parametrize("bad", [dict(num_dense_heads=3)])
def test_plan_validates_head_slice(bad):
    with pytest.raises(ValueError, match="num_dense_heads"):
        build_plan_uncached(S2Layout(block_size=16, **bad).with_heads(2), True, 2, 32, 32, 0, 0, None, 16)
