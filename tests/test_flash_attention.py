"""flash_attention (Triton via the interpreter, and the torch fallback) against the fp64 dense
reference: causal / full, odd lengths, GQA, varlen, offsets (incl. rows without keys), dtypes,
lse gradients, the dense block counter, and bad input."""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels import S2Layout, flash_attention, s2_attention
from seqpar.kernels.flash.api import _flash_attention
from seqpar.kernels.s2.plan import build_plan
from seqpar.kernels.s2.triton_bwd import s2_bwd
from seqpar.kernels.s2.triton_fwd import s2_fwd
from s2_check import DEVICE, check_attention, make_qkv

BACKENDS = ("triton", "torch")


def _flash(backend, block_size=32, **kw):
    return lambda q, k, v: _flash_attention(q, k, v, return_lse=True, backend=backend, block_size=block_size, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq", [1, 17, 200, 257])
def test_seq_lengths(backend, causal, seq):
    q, k, v = make_qkv(1, seq, seq, 2, 1, 32, torch.float32)
    check_attention(_flash(backend, causal=causal), q, k, v, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_heads", [6, 3, 2, 1])
def test_gqa_kv_heads(backend, kv_heads):
    q, k, v = make_qkv(2, 50, 50, 6, kv_heads, 16, torch.float32)
    check_attention(_flash(backend), q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_three_uneven_documents(backend, causal):
    cu = torch.tensor([0, 37, 50, 141], dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(1, 141, 141, 4, 2, 32, torch.float32)
    check_attention(_flash(backend, causal=causal, cu_seqlens=cu), q, k, v, causal=causal, cu_seqlens=cu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets(backend):
    q, k, v = make_qkv(1, 100, 100, 2, 2, 16, torch.float32)
    # fewer queries than keys: bottom-right aligned by default; equals the last rows of the full op
    o_tail, lse_tail = check_attention(_flash(backend), q[:, 60:], k, v)
    o_full, lse_full = _flash_attention(q, k, v, return_lse=True, backend=backend, block_size=32)
    torch.testing.assert_close(o_tail, o_full[:, 60:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_tail, lse_full[:, :, 60:], rtol=1e-5, atol=1e-6)
    # arbitrary (not tile-aligned) positions, as a CP ring step produces
    check_attention(_flash(backend, q_offset=53, k_offset=21), q[:, 53:], k[:, 21:70], v[:, 21:70],
                    q_offset=53, k_offset=21)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys(backend):
    # more queries than keys, default alignment: the first 30 queries see nothing
    q, k, v = make_qkv(1, 70, 40, 2, 1, 16, torch.float32)
    o, lse = check_attention(_flash(backend), q, k, v)
    assert torch.isneginf(lse[:, :, :30]).all() and torch.isfinite(lse[:, :, 30:]).all()
    # a kv chunk entirely in the future of every query
    check_attention(_flash(backend, q_offset=0, k_offset=70), q[:, :40], k, v, q_offset=0, k_offset=70)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    q, k, v = make_qkv(1, 130, 130, 4, 2, 64, dtype)
    check_attention(_flash(backend), q, k, v)


def test_default_block_size_and_head_dim_96():
    q, k, v = make_qkv(1, 150, 150, 2, 1, 96, torch.float32)
    check_attention(lambda a, b, c: flash_attention(a, b, c, return_lse=True, backend="triton"), q, k, v)


def test_matches_s2_with_stride_one():
    """S2 with vert_stride=1 reads every causal block: it must equal dense causal attention."""
    q, k, v = make_qkv(1, 90, 90, 4, 2, 32, torch.float32)
    for backend in BACKENDS:
        s2 = s2_attention(q, k, v, S2Layout(block_size=32, local_blocks=1, vert_stride=1), backend=backend)
        torch.testing.assert_close(s2, _flash_attention(q, k, v, backend=backend, block_size=32),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_block_counter_dense(causal):
    q, k, v = make_qkv(1, 100, 100, 2, 1, 16, torch.float32)
    plan = build_plan(None, causal, 1, 100, 100, 0, 0, None, 32)
    expected = 2 * (10 if causal else 16)  # 4 tiles: 4*5/2 causal pairs or 4*4, per q head
    assert plan.nnz(2) == expected
    fwd, c1, c2 = (torch.zeros(1, dtype=torch.int32, device=DEVICE) for _ in range(3))
    o, lse = s2_fwd(q, k, v, plan, 0.25, counter=fwd)
    s2_bwd(q, k, v, o, lse, torch.randn_like(o), torch.randn_like(lse), plan, 0.25, counters=(c1, c2))
    assert int(fwd) == int(c1) == int(c2) == expected


def test_tile_size_is_not_public():
    """Only the default tile is checked for GPU resources (tests/test_kernel_resources.py)."""
    import inspect

    assert not any("block" in p for p in inspect.signature(flash_attention).parameters)
    q, k, v = make_qkv(1, 64, 64, 4, 2, 16, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="block_size"):
        _flash_attention(q, k, v, block_size=24)


@pytest.mark.parametrize("kwargs, match", [
    (dict(causal=None), "causal"),
    (dict(cu_seqlens=torch.tensor([0, 20, 64], dtype=torch.int32), q_offset=0), "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 20, 64], dtype=torch.int64)), "int32"),
    (dict(cu_seqlens=torch.tensor([0, 20, 20, 64], dtype=torch.int32)), "increasing"),
    (dict(q_offset=1.5), "q_offset"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_input_raises_value_error(kwargs, match):
    q, k, v = make_qkv(1, 64, 64, 4, 2, 16, torch.float32, device="cpu")  # validation only
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **kwargs)


def test_bad_shapes_raise_value_error():
    q, k, v = make_qkv(1, 64, 64, 4, 2, 16, torch.float32, device="cpu")  # validation only
    with pytest.raises(ValueError, match="num_kv_heads"):
        flash_attention(q, torch.randn(1, 64, 3, 16), torch.randn(1, 64, 3, 16))
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="device"):
        flash_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="equal length"):
        flash_attention(q[:, :32], k, v, cu_seqlens=torch.tensor([0, 64], dtype=torch.int32))


def _merge(o1, lse1, o2, lse2):
    """Combine two partial attentions over disjoint key sets (what a CP ring step does)."""
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(lse1 - safe).transpose(1, 2)[..., None]
    w2 = torch.exp(lse2 - safe).transpose(1, 2)[..., None]
    return w1 * o1 + w2 * o2, lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["flash", "s2"])
def test_key_chunks_merged_through_lse_equal_full(backend, kind):
    """Two key chunks with k_offset, merged with their lse: output and every gradient (which flow
    through both lse values) equal the single call on the full sequence."""
    lay = S2Layout(block_size=16, local_blocks=1, vert_stride=2)
    q, k, v = make_qkv(1, 96, 96, 4, 2, 16, torch.float32)

    def op(a, b, c, **kw):
        if kind == "flash":
            return _flash_attention(a, b, c, return_lse=True, backend=backend, block_size=16, **kw)
        return s2_attention(a, b, c, lay, return_lse=True, backend=backend, **kw)

    def chunked(a, b, c):
        o1, l1 = op(a, b[:, :48], c[:, :48], q_offset=0, k_offset=0)
        o2, l2 = op(a, b[:, 48:], c[:, 48:], q_offset=0, k_offset=48)
        return _merge(o1, l1, o2, l2)

    ref = {} if kind == "flash" else {"layout": lay}
    check_attention(chunked, q, k, v, **ref)


# ---- sliding window (Mistral: query i sees keys i - window < j <= i) --------------------------------
@pytest.mark.parametrize("backend, window", [  # below, at and above the 16-token tile
    ("triton", 7), ("triton", 23), ("torch", 1), ("torch", 16), ("torch", 45)])
def test_window_odd_lengths_gqa(backend, window):
    q, k, v = make_qkv(1, 53, 53, 4, 2, 16, torch.float32)
    check_attention(_flash(backend, block_size=16, window=window), q, k, v, window=window)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_varlen_offsets_low_precision(backend):
    cu = torch.tensor([0, 5, 42, 61], dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(1, 61, 61, 2, 1, 16, torch.float32)
    check_attention(_flash(backend, block_size=16, window=20, cu_seqlens=cu), q, k, v, window=20, cu_seqlens=cu)
    # a CP ring step: unaligned positions, the key chunk partly outside every query's window
    check_attention(_flash(backend, block_size=16, window=11, q_offset=41, k_offset=9), q[:, 41:], k[:, 9:45],
                    v[:, 9:45], q_offset=41, k_offset=9, window=11)
    q, k, v = make_qkv(1, 37, 37, 2, 1, 16, torch.bfloat16)
    check_attention(_flash(backend, block_size=16, window=9), q, k, v, window=9)


def test_window_skips_tiles_not_only_masks():
    """The plan lists only tiles that meet the window: O(seq x window), and the kernels' block
    counters see exactly those tiles (forward, dq and dk/dv)."""
    from seqpar.kernels.flops import causal_pairs
    from seqpar.kernels.s2.reference import token_mask

    n, bs = 160, 16  # 10 tiles
    full = build_plan(None, True, 1, n, n, 0, 0, None, bs)
    assert full.nnz(1) == 55
    for window in (1, 33, 200):  # the FLOPs count (MFU) takes the window's pairs, as the reference mask
        mask = token_mask(1, 1, n, n, layout=None, causal=True, q_offset=0, k_offset=0, cu_seqlens=None, window=window)
        assert causal_pairs(n, window) == int(mask.sum())
    for window, want in ((1, 10), (16, 19), (17, 19), (33, 27)):
        plan = build_plan(None, True, 1, n, n, 0, 0, None, bs, window=window)
        # tile t reads kv tiles from the one holding t*bs - window + 1 up to the diagonal
        assert plan.nnz(1) == sum(t - max(0, (t * bs - window + 1) // bs) + 1 for t in range(10)) == want
        assert plan.csr().col_ptr[0, -1] == want  # the dk/dv columns list the same tiles
    q, k, v = make_qkv(1, n, n, 2, 1, 16, torch.float32)
    plan = build_plan(None, True, 1, n, n, 0, 0, None, bs, window=16)
    fwd, c1, c2 = (torch.zeros(1, dtype=torch.int32, device=DEVICE) for _ in range(3))
    o, lse = s2_fwd(q, k, v, plan, 0.25, counter=fwd)
    s2_bwd(q, k, v, o, lse, torch.randn_like(o), torch.randn_like(lse), plan, 0.25, counters=(c1, c2))
    assert int(fwd) == int(c1) == int(c2) == 2 * 19


@pytest.mark.parametrize("kwargs, match", [
    (dict(window=0), "window"), (dict(window=2.0), "window"), (dict(window=True), "window"),
    (dict(window=4, causal=False), "causal=True"),
])
def test_window_bad_input(kwargs, match):
    q, k, v = make_qkv(1, 64, 64, 4, 2, 16, torch.float32, device="cpu")  # validation only
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **kwargs)
