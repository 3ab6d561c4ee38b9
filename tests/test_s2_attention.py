"""s2_attention (Triton via the interpreter, and the torch block-sparse fallback) against the fp64
dense masked-softmax reference: forward, lse, dq/dk/dv (also through lse), odd shapes, GQA,
layout variants, varlen, offsets, empty rows, dtypes, the block counter, and bad input."""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels import S2Layout, s2_attention
from seqpar.kernels.s2 import s2_stats
from seqpar.kernels.s2.plan import build_plan
from seqpar.kernels.s2.triton_bwd import s2_bwd
from seqpar.kernels.s2.triton_fwd import s2_fwd
from s2_check import DEVICE, check_attention, make_qkv

BACKENDS = ("triton", "torch")
LAY = S2Layout(block_size=16, local_blocks=2, vert_stride=3)


def _s2(layout, backend, **kw):
    return lambda q, k, v: s2_attention(q, k, v, layout, return_lse=True, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seq", [1, 17, 200, 257])
def test_seq_lengths(backend, seq):
    q, k, v = make_qkv(1, seq, seq, 2, 1, 32, torch.float32)
    check_attention(_s2(LAY, backend), q, k, v, layout=LAY)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_heads", [6, 3, 2, 1])
def test_gqa_kv_heads(backend, kv_heads):
    q, k, v = make_qkv(1, 75, 75, 6, kv_heads, 16, torch.float32)
    check_attention(_s2(LAY, backend), q, k, v, layout=LAY)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vert_stride, local_blocks", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 1), (6, 2), (7, 3), (8, 4)])
def test_vert_stride_and_local_blocks(backend, vert_stride, local_blocks):
    lay = S2Layout(block_size=16, local_blocks=local_blocks, vert_stride=vert_stride)
    q, k, v = make_qkv(1, 128, 128, 4, 4, 16, torch.float32)
    check_attention(_s2(lay, backend), q, k, v, layout=lay)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", [
    S2Layout(block_size=16, local_blocks=1, vert_stride=4, num_dense_heads=1),
    S2Layout(block_size=16, local_blocks=1, vert_stride=4, homo_head=True),
    S2Layout(block_size=32, local_blocks=1, vert_stride=2, head_sliding_offset=1),
], ids=["dense_heads", "homo_head", "sliding_offset"])
def test_layout_variants(backend, layout):
    q, k, v = make_qkv(1, 100, 100, 6, 3, 32, torch.float32)
    check_attention(_s2(layout, backend), q, k, v, layout=layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_three_uneven_documents(backend):
    cu = torch.tensor([0, 37, 50, 141], dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(1, 141, 141, 4, 2, 32, torch.float32)
    check_attention(_s2(LAY, backend, cu_seqlens=cu), q, k, v, layout=LAY, cu_seqlens=cu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_match_reference_and_full_sequence(backend):
    q, k, v = make_qkv(1, 128, 128, 4, 2, 16, torch.float32)
    # second half of the queries against the full K (default q_offset = 128 - 64 = 64)
    o_half, lse_half = check_attention(_s2(LAY, backend), q[:, 64:], k, v, layout=LAY)
    o_full, lse_full = s2_attention(q, k, v, LAY, return_lse=True, backend=backend)
    torch.testing.assert_close(o_half, o_full[:, 64:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_half, lse_full[:, :, 64:], rtol=1e-5, atol=1e-6)
    # a CP-style chunk: queries 96..127 against keys 32..95 (partial result of a ring step)
    check_attention(_s2(LAY, backend, q_offset=96, k_offset=32), q[:, 96:], k[:, 32:96], v[:, 32:96],
                    layout=LAY, q_offset=96, k_offset=32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout, h, hkv, lo, hi", [
    (S2Layout(block_size=16, local_blocks=1, vert_stride=4), 6, 3, 1, 3),
    (S2Layout(block_size=16, local_blocks=2, vert_stride=8, num_dense_heads=1, head_sliding_offset=1), 4, 4, 2, 4),
    (S2Layout(block_size=16, local_blocks=1, vert_stride=4, num_dense_heads=1), 4, 2, 0, 1),
], ids=["gqa-middle", "dense-last-offset", "dense-not-in-slice"])
def test_kv_head_slice_equals_same_heads_of_full_call(backend, layout, h, hkv, lo, hi):
    # Ulysses CP hands a rank kv heads lo..hi-1: patterns (step, dense heads) follow global indices
    q, k, v = make_qkv(1, 112, 112, h, hkv, 16, torch.float32)
    grp = h // hkv
    qs, ks, vs = q[:, :, lo * grp:hi * grp], k[:, :, lo:hi], v[:, :, lo:hi]
    kw = dict(kv_head_offset=lo, total_kv_heads=hkv)
    o_s, lse_s = check_attention(_s2(layout, backend, **kw), qs, ks, vs, layout=layout, **kw)
    o_f, lse_f = s2_attention(q, k, v, layout, return_lse=True, backend=backend)
    torch.testing.assert_close(o_s, o_f[:, :, lo * grp:hi * grp], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_s, lse_f[:, lo * grp:hi * grp], rtol=1e-5, atol=1e-6)
    # the slice's plan is the full plan's rows, and differs from an un-offset call on the slice
    layout = layout.with_heads(h)  # build_plan takes the resolved layout (step from the q heads)
    full = build_plan(layout, True, hkv, 112, 112, 0, 0, None, 16)
    part = build_plan(layout, True, hi - lo, 112, 112, 0, 0, None, 16, lo, hkv)
    assert part.nnz_per_kv_head == full.nnz_per_kv_head[lo:hi]
    assert build_plan(layout, True, hi - lo, 112, 112, 0, 0, None, 16).nnz_per_kv_head != part.nnz_per_kv_head


@pytest.mark.parametrize("kw, match", [
    (dict(kv_head_offset=-1), "kv_head_offset"),
    (dict(kv_head_offset=1, total_kv_heads=2), "total_kv_heads"),
    (dict(total_kv_heads=True), "total_kv_heads"),
])
def test_bad_kv_head_slice(kw, match):
    q, k, v = make_qkv(1, 32, 32, 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        s2_attention(q, k, v, LAY, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys(backend):
    # queries 0..31 against keys 16..63: the first q tile sees nothing -> o = 0, lse = -inf,
    # gradients finite (checked inside check_attention together with everything else)
    q, k, v = make_qkv(1, 32, 48, 2, 1, 16, torch.float32)
    o, lse = check_attention(_s2(LAY, backend, q_offset=0, k_offset=16), q, k, v, layout=LAY,
                             q_offset=0, k_offset=16)
    assert torch.isneginf(lse[:, :, :16]).all() and torch.isfinite(lse[:, :, 16:]).all()


@pytest.mark.parametrize("backend, dtype", [
    ("triton", torch.float16), ("triton", torch.bfloat16), ("torch", torch.float16), ("torch", torch.bfloat16),
])
def test_low_precision(backend, dtype):
    q, k, v = make_qkv(1, 130, 130, 4, 2, 64, dtype)
    check_attention(_s2(LAY, backend), q, k, v, layout=LAY)


@pytest.mark.parametrize("head_dim", [16, 80, 128])
def test_head_dims(head_dim):
    q, k, v = make_qkv(1, 70, 70, 2, 1, head_dim, torch.float32)
    check_attention(_s2(LAY, "triton"), q, k, v, layout=LAY)


def test_noncontiguous_inputs_and_sm_scale():
    q, k, v = make_qkv(1, 90, 90, 4, 2, 32, torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [b, h, s, d] memory
    for backend in BACKENDS:
        check_attention(_s2(LAY, backend, sm_scale=0.3), qt, k, v, layout=LAY, sm_scale=0.3)


@pytest.mark.parametrize("cu", [None, (0, 37, 50, 141)])
def test_block_counter_equals_layout_nonzeros(cu):
    """The Triton kernels count the blocks they compute: == layout nonzeros, forward and backward."""
    b = 2 if cu is None else 1
    q, k, v = make_qkv(b, 141, 141, 4, 2, 16, torch.float32)
    lay = S2Layout(block_size=16, local_blocks=1, vert_stride=4)
    plan = build_plan(lay.with_heads(4), True, 2, 141, 141, 0, 0, cu, 16)
    expected = b * s2_stats(lay, 141, 4, 2, cu_seqlens=cu)["computed_blocks"]
    if cu is None:
        assert expected == b * int(lay.block_mask(4, 2, 9, 9).sum())
    assert expected < b * s2_stats(lay, 141, 4, 2, cu_seqlens=cu)["causal_blocks"]  # really sparse
    fwd = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    o, lse = s2_fwd(q, k, v, plan, 0.25, counter=fwd)
    dq_c, kv_c = torch.zeros(1, dtype=torch.int32, device=DEVICE), torch.zeros(1, dtype=torch.int32, device=DEVICE)
    s2_bwd(q, k, v, o, lse, torch.randn_like(o), None, plan, 0.25, counters=(dq_c, kv_c))
    assert int(fwd) == int(dq_c) == int(kv_c) == expected


def test_auto_backend_and_plain_output():
    q, k, v = make_qkv(1, 40, 40, 2, 2, 16, torch.float32)
    o = s2_attention(q, k, v, LAY)
    assert isinstance(o, torch.Tensor) and o.shape == q.shape
    torch.testing.assert_close(o, s2_attention(q, k, v, LAY, backend="torch"), rtol=1e-5, atol=1e-6)


def _bad(**over):
    q, k, v = make_qkv(1, 64, 64, 4, 2, 16, torch.float32, device="cpu")  # validation only
    args = dict(q=q, k=k, v=v, layout=LAY)
    args.update(over)
    return args


@pytest.mark.parametrize("over, match", [
    (dict(k=torch.randn(1, 64, 2, 32)), "head dims"),
    (dict(v=torch.randn(1, 60, 2, 16)), "seq length"),
    (dict(q=torch.randn(2, 64, 4, 16)), "batch"),
    (dict(k=torch.randn(1, 64, 2, 16, dtype=torch.float16)), "dtype"),
    (dict(k=torch.randn(1, 64, 3, 16), v=torch.randn(1, 64, 3, 16)), "num_kv_heads"),
    (dict(q=torch.randn(1, 64, 4, 16, device="meta")), "device"),
    (dict(layout="s2"), "layout"),
    (dict(cu_seqlens=torch.tensor([0, 30, 64])), "int32"),
    (dict(cu_seqlens=torch.tensor([0, 40, 30, 64], dtype=torch.int32)), "increasing"),
    (dict(cu_seqlens=torch.tensor([0, 30, 60], dtype=torch.int32)), "cu_seqlens"),
    (dict(q_offset=-16, k_offset=0), "q_offset"),
    (dict(q_offset=16, k_offset=-16), "k_offset"),
    (dict(cu_seqlens=torch.tensor([0, 64], dtype=torch.int32), k_offset=16), "cu_seqlens"),
    (dict(causal=False), "causal"),
    (dict(sm_scale=-1.0), "sm_scale"),
    (dict(backend="cuda"), "backend"),
    (dict(layout=S2Layout(block_size=16, num_dense_heads=3)), "num_dense_heads"),
])
def test_bad_input_raises_value_error(over, match):
    args = _bad(**over)
    q, k, v, layout = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("layout")
    with pytest.raises(ValueError, match=match):
        s2_attention(q, k, v, layout, **args)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_default_offset_need_not_be_block_aligned(backend):
    """Bottom-right default q_offset = 44 is not a multiple of the block (16): the first q tile
    is the partial block up to the next boundary, and the result equals the reference."""
    q, k, v = make_qkv(1, 20, 64, 2, 2, 16, torch.float32)
    check_attention(lambda a, b, c: s2_attention(a, b, c, LAY, return_lse=True, backend=backend), q, k, v,
                    layout=LAY)


def test_torch_fallback_memory_is_seq_times_block():
    """No allocation of the torch path (forward + backward) comes near a dense [seq, seq] matrix."""
    from torch.profiler import ProfilerActivity, profile

    seq, bs = 2048, 64
    q, k, v = (x.cpu().requires_grad_(True) for x in make_qkv(1, seq, seq, 1, 1, 16, torch.float32))
    lay = S2Layout(block_size=bs, local_blocks=2, vert_stride=8)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        o, lse = s2_attention(q, k, v, lay, return_lse=True, backend="torch")
        (o.sum() + lse.sum()).backward()
    peak_op = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < peak_op <= 8 * seq * bs * 4, f"largest allocation {peak_op} B is not O(seq * block)"
    assert peak_op < seq * seq * 4 // 4


def test_backward_without_lse_output():
    """return_lse=False: the lse gradient arrives as None and only o drives the backward."""
    q, k, v = make_qkv(1, 70, 70, 4, 2, 32, torch.float32)
    for backend in BACKENDS:
        def fn(a, b, c):
            lse = s2_attention(a.detach(), b.detach(), c.detach(), LAY, return_lse=True, backend=backend)[1]
            return s2_attention(a, b, c, LAY, backend=backend), lse

        check_attention(fn, q, k, v, lse_grad=False, layout=LAY)
