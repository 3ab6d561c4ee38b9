"""S2Layout: hand-drawn pictures (docs/s2.md), DKernel's GQA rotation, coverage, plans, stats, validation."""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels import S2Layout
from seqpar.kernels.s2 import s2_stats
from seqpar.kernels.s2.plan import build_plan


def _parse(rows: str) -> torch.Tensor:
    """Rows of 'x'/'.' cells (upper triangle omitted) -> bool [n, n]."""
    lines = [ln.split() for ln in rows.strip().splitlines()]
    n = len(lines)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, cells in enumerate(lines):
        assert len(cells) == i + 1
        m[i, : i + 1] = torch.tensor([c == "x" for c in cells])
    return m


# docs/s2.md: 8 blocks, vert_stride=4, local_blocks=2, 4 heads (step = 1)
DOC_HEAD0 = """
x
x x
x x x
x . x x
x . . x x
x . . . x x
x . . . x x x
x . . . x . x x
"""
DOC_HEAD1 = """
x
x x
. x x
. . x x
. . . x x
. . . x x x
. . . x . x x
. . . x . . x x
"""
# same layout, kv heads 2 and 3: columns with (j + g) % 4 == 0
DOC_HEAD2 = """
x
x x
. x x
. . x x
. . x x x
. . x . x x
. . x . . x x
. . x . . . x x
"""
DOC_HEAD3 = """
x
x x
. x x
. x x x
. x . x x
. x . . x x
. x . . . x x
. x . . . x x x
"""


def test_design_picture_heads():
    lay = S2Layout(block_size=16, local_blocks=2, vert_stride=4)
    m = lay.block_mask(4, 4, 8, 8)
    for g, pic in enumerate((DOC_HEAD0, DOC_HEAD1, DOC_HEAD2, DOC_HEAD3)):
        assert torch.equal(m[g], _parse(pic)), f"kv head {g}"


def test_picture_text_matches_design_drawing():
    text = S2Layout(block_size=16, local_blocks=2, vert_stride=4).picture(4, 8, heads=[0, 1])
    lines = text.splitlines()
    assert lines[0].split() == ["kv", "head", "0", "kv", "head", "1"]
    assert lines[1].split() == ["q\\k", *map(str, range(8)), "q\\k", *map(str, range(8))]
    assert lines[5].split() == "3 x . x x 3 . . x x".split()
    assert lines[9].split() == "7 x . . . x . x x 7 . . . x . . x x".split()


def test_homo_head_dense_heads_and_sliding_offset():
    homo = S2Layout(block_size=16, local_blocks=2, vert_stride=4, homo_head=True).block_mask(4, 4, 8, 8)
    assert all(torch.equal(homo[g], _parse(DOC_HEAD0)) for g in range(4))
    dense = S2Layout(block_size=16, local_blocks=2, vert_stride=4, num_dense_heads=2).block_mask(4, 4, 8, 8)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(dense[0], _parse(DOC_HEAD0)) and torch.equal(dense[1], _parse(DOC_HEAD1))
    assert torch.equal(dense[2], causal) and torch.equal(dense[3], causal)
    shifted = S2Layout(block_size=16, local_blocks=2, vert_stride=4, head_sliding_offset=1).block_mask(4, 4, 8, 8)
    assert torch.equal(shifted[0], _parse(DOC_HEAD1)) and torch.equal(shifted[3], _parse(DOC_HEAD0))


def test_gqa_groups_share_kv_head_pattern():
    lay = S2Layout(block_size=16, local_blocks=1, vert_stride=4)
    m = lay.block_mask(8, 2, 12, 12)  # DKernel: step = max(1, 4 // 8 q heads) = 1: kv head 1 reads j % 4 == 3
    per_kv = lay.kv_block_mask(2, torch.arange(12), torch.arange(12), num_heads=8)
    for h in range(8):
        assert torch.equal(m[h], per_kv[h // 4])
    assert m[4, 11, 3] and not m[4, 11, 2] and not m[4, 11, 1]


def test_bottom_right_alignment():
    lay = S2Layout(block_size=16, local_blocks=2, vert_stride=3)
    full = lay.block_mask(3, 3, 10, 10)
    assert torch.equal(lay.block_mask(3, 3, 4, 10), full[:, 6:])


@pytest.mark.parametrize("vert_stride", range(1, 9))
def test_union_covers_causal_when_heads_ge_stride(vert_stride):
    lay = S2Layout(block_size=16, local_blocks=1, vert_stride=vert_stride)
    for heads in (vert_stride, vert_stride + 3):
        m = lay.block_mask(heads, heads, 20, 20)
        assert torch.equal(m.any(0), torch.ones(20, 20, dtype=torch.bool).tril())
        # each head alone is sparse once the stride is > 1 and the sequence long enough
        if vert_stride > 1:
            assert (m.sum((1, 2)) < 210).all()


def test_union_does_not_cover_with_fewer_heads():
    m = S2Layout(block_size=16, local_blocks=1, vert_stride=4).block_mask(2, 2, 12, 12)
    assert not torch.equal(m.any(0), torch.ones(12, 12, dtype=torch.bool).tril())


def test_plan_csr_csc_match_block_mask():
    lay = S2Layout(block_size=16, local_blocks=2, vert_stride=3)
    lay = lay.with_heads(2)
    plan = build_plan(lay, True, 2, 150, 150, 0, 0, None, 16)
    m = lay.kv_block_mask(2, torch.arange(10), torch.arange(10))
    csr = plan.csr()
    for g in range(2):
        for t in range(10):
            cols = csr.col_idx[csr.row_ptr[g, t]:csr.row_ptr[g, t + 1]].tolist()
            assert cols == m[g, t].nonzero().flatten().tolist() == plan.kv_tiles(g, t)
            rows = csr.row_idx[csr.col_ptr[g, t]:csr.col_ptr[g, t + 1]].tolist()
            assert rows == m[g, :, t].nonzero().flatten().tolist() == plan.q_tiles(g, t)
    assert plan.nnz(6) == 3 * int(m.sum())
    assert build_plan(lay, True, 2, 150, 150, 0, 0, None, 16) is plan  # cached


def test_plan_varlen_restarts_layout_per_document():
    lay = S2Layout(block_size=16, local_blocks=1, vert_stride=2).with_heads(1)
    cu = (0, 40, 57, 130)
    plan = build_plan(lay, True, 1, 130, 130, 0, 0, cu, 16)
    assert plan.q_start.tolist() == [0, 16, 32, 40, 56, 57, 73, 89, 105, 121]
    per_doc = [lay.kv_block_mask(1, torch.arange(n), torch.arange(n))[0] for n in (3, 2, 5)]
    assert plan.nnz(1) == sum(int(m.sum()) for m in per_doc)
    # no tile pair crosses documents
    for t in range(plan.num_q_tiles):
        for u in plan.kv_tiles(0, t):
            assert plan.q_end[t] == plan.kv_end[u]


def test_s2_stats():
    lay = S2Layout(block_size=16, local_blocks=2, vert_stride=4)
    st = s2_stats(lay, 128, 8, 4)
    m = lay.block_mask(8, 4, 8, 8)
    assert st["computed_blocks"] == int(m.sum())
    assert st["causal_blocks"] == 8 * 36
    assert st["density"] == pytest.approx(int(m.sum()) / (8 * 36))
    st_v = s2_stats(lay, 130, 8, 4, cu_seqlens=[0, 40, 57, 130])
    assert st_v["causal_blocks"] == 8 * (6 + 3 + 15)


@pytest.mark.parametrize("kwargs, field", [
    (dict(block_size=48), "block_size"), (dict(block_size=8), "block_size"),
    (dict(local_blocks=0), "local_blocks"), (dict(vert_stride=0), "vert_stride"),
    (dict(num_dense_heads=-1), "num_dense_heads"), (dict(head_sliding_offset=-2), "head_sliding_offset"),
    (dict(homo_head=1), "homo_head"), (dict(head_sliding_step=-1), "head_sliding_step"),
    (dict(head_sliding_step=1.0), "head_sliding_step"), (dict(homo_head=True, head_sliding_step=2), "homo_head"),
])
def test_layout_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        S2Layout(**kwargs)


def test_dense_heads_must_fit_kv_heads():
    with pytest.raises(ValueError, match="num_dense_heads"):
        S2Layout(num_dense_heads=3).block_mask(4, 2, 4, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        S2Layout().block_mask(6, 4, 4, 4)


# ------------------------------------------------------------------ DKernel's GQA rotation (issue 10, item 11)
# Pictures drawn by hand from DKernel's get_sparse_attn_mask (dkernel/utils.py): per kv head h,
# column j is strided iff (j + h * step + head_sliding_offset) % vert_stride == 0 with
# step = max(1, vert_stride // num_heads) over the QUERY heads, q heads of a group repeat their kv
# head. 8 heads, 2 kv heads, vert_stride=8, local_blocks=2, 12 blocks: step = 1.
GQA_KV0 = """
x
x x
x x x
x . x x
x . . x x
x . . . x x
x . . . . x x
x . . . . . x x
x . . . . . . x x
x . . . . . . . x x
x . . . . . . . x x x
x . . . . . . . x . x x
"""
# kv head 1, DKernel step 1: column 7 ((7 + 1) % 8 == 0)
GQA_KV1_DKERNEL = """
x
x x
. x x
. . x x
. . . x x
. . . . x x
. . . . . x x
. . . . . . x x
. . . . . . . x x
. . . . . . . x x x
. . . . . . . x . x x
. . . . . . . x . . x x
"""
# kv head 1 with head_sliding_step=4 (evenly spread over the kv heads): column 4
GQA_KV1_EVEN = """
x
x x
. x x
. . x x
. . . x x
. . . . x x
. . . . x x x
. . . . x . x x
. . . . x . . x x
. . . . x . . . x x
. . . . x . . . . x x
. . . . x . . . . . x x
"""


def test_gqa_default_step_is_dkernels_query_head_step():
    lay = S2Layout(block_size=16, local_blocks=2, vert_stride=8)
    m = lay.block_mask(8, 2, 12, 12)
    for h in range(4):
        assert torch.equal(m[h], _parse(GQA_KV0)), f"q head {h}"
    for h in range(4, 8):
        assert torch.equal(m[h], _parse(GQA_KV1_DKERNEL)), f"q head {h}"
    assert lay.head_step(8) == 1 and lay.with_heads(8).head_sliding_step == 1


def test_explicit_head_sliding_step_spreads_kv_heads_evenly():
    lay = S2Layout(block_size=16, local_blocks=2, vert_stride=8, head_sliding_step=4)
    m = lay.block_mask(8, 2, 12, 12)
    assert torch.equal(m[0], _parse(GQA_KV0)) and torch.equal(m[7], _parse(GQA_KV1_EVEN))
    assert lay.resolved and lay.with_heads(8) is lay and lay.head_step() == 4


def test_unresolved_layout_needs_query_heads():
    lay = S2Layout(block_size=16, local_blocks=1, vert_stride=8)
    assert not lay.resolved
    with pytest.raises(ValueError, match="num_heads"):
        lay.kv_block_mask(2, torch.arange(4), torch.arange(4))
    with pytest.raises(ValueError, match="num_heads"):
        build_plan(lay, True, 2, 64, 64, 0, 0, None, 16)
    assert S2Layout(homo_head=True).resolved


def _dkernel_block_mask(num_heads, num_kv_heads, nblocks, *, local_blocks, vert_stride, homo_head=False,
                        head_sliding_step=None, head_sliding_offset=0, num_dense_heads=0):
    """DKernel's get_sparse_attn_mask (causal, absolute positions) transcribed loop by loop."""
    if homo_head:
        num_heads = 1
    num_q_per_kv = num_heads // num_kv_heads if not homo_head else 1
    nkv = num_kv_heads if not homo_head else 1
    step = max(1, int(vert_stride / num_heads)) if head_sliding_step is None else head_sliding_step
    rows = []
    for h in range(nkv):
        for _ in range(num_q_per_kv):
            rows.append([[
                j <= i and (i - j < local_blocks
                            or (h >= nkv - num_dense_heads) or (j + h * step + head_sliding_offset) % vert_stride == 0)
                for j in range(nblocks)] for i in range(nblocks)])
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize("heads, kv_heads, vert_stride, local_blocks, extra", [
    (8, 2, 8, 1, {}), (8, 2, 8, 2, dict(head_sliding_offset=3)), (32, 8, 8, 2, {}), (12, 4, 16, 1, {}),
    (16, 4, 4, 3, dict(num_dense_heads=1)), (4, 4, 4, 2, {}), (6, 3, 8, 1, dict(head_sliding_step=2)),
    (8, 1, 16, 2, {}), (8, 8, 3, 1, dict(homo_head=True)),
])
def test_block_mask_equals_dkernel_definition(heads, kv_heads, vert_stride, local_blocks, extra):
    lay = S2Layout(block_size=16, local_blocks=local_blocks, vert_stride=vert_stride, **extra)
    want = _dkernel_block_mask(heads, kv_heads, 20, local_blocks=local_blocks, vert_stride=vert_stride, **extra)
    got = lay.block_mask(heads, kv_heads, 20, 20)
    if extra.get("homo_head"):
        want = want.expand(heads, -1, -1)
    assert torch.equal(got, want)


def test_tp_slice_of_resolved_layout_is_the_full_models_rows():
    # 16 heads / 4 kv heads / vert_stride 16: DKernel step 1 (the kv-head step would be 4); a TP=2 rank holds
    # kv heads 2, 3 and must compute exactly those rows of the full model's mask
    lay = S2Layout(block_size=16, local_blocks=1, vert_stride=16).with_heads(16)
    full = lay.kv_block_mask(4, torch.arange(20), torch.arange(20))
    part = lay.kv_block_mask(2, torch.arange(20), torch.arange(20), kv_head_offset=2, total_kv_heads=4)
    assert torch.equal(part, full[2:])
    assert torch.equal(full, _dkernel_block_mask(16, 4, 20, local_blocks=1, vert_stride=16)[::4])
