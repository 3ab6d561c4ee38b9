"""Launch grids within CUDA's limits at the largest shapes README promises, without a GPU.

CUDA accepts 2^31 - 1 programs on grid axis 0 and 65535 on axes 1 and 2. Every launcher computes
its grids with its op's ``grids`` function (S2 / flash, MoH, Lightning), which this file calls at
README's limits per call (1M tokens, 64 query heads, 4096 documents, batch up to 65535, head dims
16 .. 256) and checks against the limits, and then checks that the launchers really launch those
grids (``_tuning.record_launches(run=False)`` records every launch without running it).

Before the Lightning and MoH grids were folded into axis 0, Lightning put ``chunks x heads`` (1M
tokens, 64 heads: 1M programs) and ``documents x heads`` on axes 1 / 2 (> 65535 from about 4.2M
tokens x heads) and MoH ``batch x heads``. S2 / flash keep (tiles, heads, batch): heads and batch
stay far below 65535 at these shapes, and folding them cost the sm_90 kernels registers.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from seqpar.kernels._grid import GRID_LIMITS, check_grid
from seqpar.kernels._tuning import record_launches
from seqpar.kernels.lightning import triton_fwd as lfwd
from seqpar.kernels.moh import triton_fwd as mfwd
from seqpar.kernels.s2 import triton_fwd as sfwd

# README "Limits per call"
MAX_TOKENS = 1 << 20
MAX_HEADS = 64
MAX_DOCS = 4096
BATCHES = (1, 16, 4096, 65535)   # batch x seq <= 1M tokens
HEAD_DIMS = (16, 64, 128, 256)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KV_HEADS = (1, 8, MAX_HEADS)


def _within(grid) -> bool:
    return all(0 < n <= lim for n, lim in zip(grid, GRID_LIMITS)) and len(grid) <= 3


def _s2_grids():
    for b, bs, hkv in itertools.product(BATCHES, (16, 64), KV_HEADS):
        seq = MAX_TOKENS // b
        tiles = -(-seq // bs) + (1 if seq % bs else 0)  # a partial first tile (offset) and a partial last
        yield (b, bs, hkv), sfwd.grids(tiles, tiles, b, MAX_HEADS, hkv, seq)
    for bs, hkv in itertools.product((16, 64), KV_HEADS):  # varlen: every document adds a partial tile
        tiles = MAX_TOKENS // bs + MAX_DOCS
        yield ("varlen", bs, hkv), sfwd.grids(tiles, tiles, 1, MAX_HEADS, hkv, MAX_TOKENS)


def _moh_grids():
    for b, d, dt, hkv in itertools.product(BATCHES, HEAD_DIMS, DTYPES, KV_HEADS):
        seq = MAX_TOKENS // b
        yield (b, d, dt, hkv), mfwd.grids(b, seq, seq, MAX_HEADS, hkv, d, dt)


def _lightning_grids():
    for b, dk, dv, dt in itertools.product(BATCHES, HEAD_DIMS, HEAD_DIMS, DTYPES):
        seq = MAX_TOKENS // b
        yield (b, dk, dv, dt), lfwd.grids(b * -(-seq // 64), b, MAX_HEADS, dk, dv, dt)
    for dk, dt in itertools.product(HEAD_DIMS, DTYPES):  # varlen: 4096 documents, each a partial chunk
        yield ("varlen", dk, dt), lfwd.grids(MAX_TOKENS // 64 + MAX_DOCS, MAX_DOCS, MAX_HEADS, dk, dk, dt)


@pytest.mark.parametrize("op", ["s2", "moh", "lightning"])
def test_every_grid_fits_cuda_at_the_largest_promised_shapes(op):
    cases = {"s2": _s2_grids, "moh": _moh_grids, "lightning": _lightning_grids}[op]()
    seen = 0
    for shape, grids in cases:
        for kernel, grid in grids.items():
            assert _within(grid), (op, kernel, shape, grid)
            seen += 1
    assert seen > 20
    # the largest: Lightning's chunk-local state pass at 1M tokens x 64 heads, d 256 (4 x 4 tiles)
    big = lfwd.grids(MAX_TOKENS // 64, 1, MAX_HEADS, 256, 256, torch.bfloat16)["chunk_state"]
    assert big == (16 * (MAX_TOKENS // 64) * MAX_HEADS,) and big[0] > 65535 * 16


def test_grid_past_cuda_limits_is_a_clear_error():
    with pytest.raises(ValueError, match=r"lightning state scan: launch grid .* over CUDA's limit of 2147483647"):
        lfwd.grids(1, 2 ** 30, 64, 128, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="axis 1"):
        check_grid("k", (1, 65536))
    with pytest.raises(ValueError, match="s2 fwd: .* axis 2"):
        sfwd.grids(1, 1, 65536, 8, 8, 16)  # a batch of 65536 sequences: fold them into cu_seqlens
    with pytest.raises(ValueError, match="heads x seq_q"):
        sfwd.grids(2 ** 20, 2 ** 20, 1, 64, 8, 2 ** 25)
    assert check_grid("k", (2 ** 31 - 1, 65535, 65535)) == (2 ** 31 - 1, 65535, 65535)


def _launched(fn) -> dict:
    with record_launches(run=False) as found:
        fn()
    out: dict = {}
    for name, grid in found:
        out.setdefault(name, set()).add(grid)
    return out


def test_launchers_launch_exactly_the_grids_functions():
    """Every kernel of every launcher (fwd, bwd, preprocess) at awkward shapes: the grid it launches
    is its ``grids`` entry, 1-D."""
    from seqpar.kernels.lightning._plan import make_plan
    from seqpar.kernels.lightning.triton_bwd import lightning_bwd
    from seqpar.kernels.lightning.triton_fwd import lightning_fwd
    from seqpar.kernels.moh.rows import build_active_rows
    from seqpar.kernels.moh.triton_bwd import moh_bwd
    from seqpar.kernels.moh.triton_fwd import moh_fwd
    from seqpar.kernels.s2.layout import S2Layout
    from seqpar.kernels.s2.plan import build_plan
    from seqpar.kernels.s2.triton_bwd import s2_bwd
    from seqpar.kernels.s2.triton_fwd import s2_fwd

    b, sq, sk, h, hkv, d = 3, 45, 77, 6, 2, 24
    q, k, v = torch.randn(b, sq, h, d), torch.randn(b, sk, hkv, d), torch.randn(b, sk, hkv, d)
    lay = S2Layout(block_size=16, local_blocks=2, vert_stride=3).with_heads(h)
    for layout in (lay, None):
        plan = build_plan(layout, True, hkv, sq, sk, sk - sq + 5, 3, None, 16)

        def s2():
            o, lse = s2_fwd(q, k, v, plan, 0.1)
            s2_bwd(q, k, v, o, lse, q, lse, plan, 0.1)
        got = _launched(s2)
        want = sfwd.grids(plan.num_q_tiles, plan.num_kv_tiles, b, h, hkv, sq)
        assert got == {"_s2_fwd_kernel": {want["fwd"]}, "_s2_bwd_preprocess_kernel": {want["preprocess"]},
                       "_s2_bwd_dq_kernel": {want["dq"]}, "_s2_bwd_dkdv_kernel": {want["dkdv"]}}, got

    gates = (torch.rand(b, sq, h) < 0.5).float()
    act = build_active_rows(gates)
    kw = dict(causal=True, sm_scale=0.1, q_offset=sk - sq, k_offset=0)

    def moh():
        o, lse = moh_fwd(q, k, v, gates, act, **kw)
        moh_bwd(q, lse, q, k, v, gates, o, lse, act, **kw)
    want = mfwd.grids(b, sq, sk, h, hkv, d, q.dtype)
    assert _launched(moh) == {"_moh_fwd_kernel": {want["fwd"]}, "_moh_bwd_preprocess_kernel": {want["preprocess"]},
                              "_moh_bwd_dq_kernel": {want["dq"]}, "_moh_bwd_dkdv_kernel": {want["dkdv"]}}

    dv = 40
    cu = torch.tensor([0, 30, 31, 100, 135], dtype=torch.int32)
    for plan in (make_plan(b, sq, None, 64, torch.device("cpu")), make_plan(1, 135, cu, 64, torch.device("cpu"))):
        T = int(plan.cu[-1])
        qf, kf, vf = torch.randn(T, h, d), torch.randn(T, hkv, d), torch.randn(T, hkv, dv)
        slope = torch.linspace(0.1, 1, h)

        def lightning():
            h0 = torch.zeros(plan.num_docs, h, d, dv)
            lightning_fwd(qf, kf, vf, slope, h0, plan)
            lightning_bwd(qf, kf, vf, slope, h0, torch.randn(T, h, dv), h0, plan, need_dh0=True)
        want = lfwd.grids(plan.num_chunks, plan.num_docs, h, d, dv, qf.dtype)
        got = _launched(lightning)
        # the backward's reverse state pass over (q, do) has the forward's (k, v) tiles: dk x dv
        assert got == {"_chunk_state_kernel": {want["chunk_state"]},
                       "_state_scan_kernel": {want["state_scan"]}, "_output_kernel": {want["output"]},
                       "_dv_kernel": {want["dv"]}, "_dqk_kernel": {want["dqk"]}}, got
        assert all(len(g) == 1 for grids in got.values() for g in grids)
