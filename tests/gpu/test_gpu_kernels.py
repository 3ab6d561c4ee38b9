"""Every Triton kernel, forward and backward, in bf16 and fp16 at realistic shapes on a GPU.

This is the only place where the real low-precision ``tl.dot`` paths run (the CPU interpreter
upcasts bf16). Each case compares the kernel with the fp64 reference by flash-attn's rule
(tests/tolerance.py): ``err(ours) <= 2 x err(reference in the same dtype)`` for outputs, 3x for
gradients. Shapes: head dim 64 and 128, sequences 4K-16K, GQA, varlen (``cu_seqlens``).
"""

from __future__ import annotations

import pytest
import torch

from gpu_common import DEVICE, block, cu, seq
from s2_check import check_attention
from tolerance import GRAD_FACTOR, OUT_FACTOR, assert_rel_close

from seqpar.kernels import S2Layout, flash_attention, lightning_attention, lightning_slopes, moh_attention, s2_attention
from seqpar.kernels.lightning.reference import lightning_reference
from seqpar.kernels.moh.reference import moh_attention_ref

DTYPES = [torch.bfloat16, torch.float16]
D128_BF16 = pytest.mark.kernels_d128_bf16  # `pytest tests/gpu -m kernels_d128_bf16`: make gpu-check's kernel step


def params(cases: dict, dim_index: int) -> list:
    """(case, dtype) parameters; head dim 128 in bf16 carries the kernels_d128_bf16 marker."""
    return [pytest.param(name, dt, id=f"{name}-{dt}", marks=[D128_BF16] if case[dim_index] == 128
                         and dt == torch.bfloat16 else [])
            for name, case in cases.items() for dt in DTYPES]


@pytest.fixture(autouse=True)
def _fresh(request):
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()   # the fp64 references at 16K are large


def _qkv(b, n, h, hkv, d, dtype, dv=None):
    q = torch.randn(b, n, h, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, n, hkv, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, n, hkv, dv or d, device=DEVICE, dtype=dtype)
    return q, k, v


# ------------------------------------------------------------------------------------- S2
S2_CASES = {
    # name: (batch, seq, heads, kv heads, head dim, layout kwargs, cu_seqlens bounds)
    "gqa-d128-4k": (1, 4096, 16, 4, 128, dict(local_blocks=4, vert_stride=8), None),
    "mha-d64-4k-dense-head": (2, 4096, 8, 8, 64, dict(local_blocks=2, vert_stride=4, num_dense_heads=1), None),
    "mqa-d64-16k": (1, 16384, 2, 1, 64, dict(local_blocks=4, vert_stride=16), None),
    "varlen-gqa-d128-8k-even-step": (1, 8192, 8, 2, 128, dict(local_blocks=4, vert_stride=8, head_sliding_step=4),
                                     (0, 1000, 3500, 8192)),
}


@pytest.mark.parametrize("case, dtype", params(S2_CASES, 4))
def test_s2_fwd_bwd_vs_fp64(case, dtype):
    b, n, h, hkv, d, lay, bounds = S2_CASES[case]
    layout = S2Layout(block_size=block(64), **lay)
    q, k, v = _qkv(b, seq(n), h, hkv, d, dtype)
    kw = {} if bounds is None else {"cu_seqlens": cu(*bounds)}
    check_attention(lambda a, bb, c: s2_attention(a, bb, c, layout, return_lse=True, backend="triton", **kw),
                    q, k, v, layout=layout, **kw)


# ---------------------------------------------------------------------------------- flash
FLASH_CASES = {
    "gqa-d128-4k": (1, 4096, 16, 4, 128, None),
    "mha-d64-4k-b2": (2, 4096, 8, 8, 64, None),
    "mqa-d64-16k": (1, 16384, 2, 1, 64, None),
    "varlen-gqa-d128-8k": (1, 8192, 8, 2, 128, (0, 1000, 3500, 8192)),
    # sliding window (last field): not a multiple of the 64-token tile, below a document's length
    "window-gqa-d128-4k": (1, 4096, 16, 4, 128, None, 1000),
    "window-varlen-d64-8k": (1, 8192, 8, 2, 64, (0, 1000, 3500, 8192), 700),
}


@pytest.mark.parametrize("case, dtype", params(FLASH_CASES, 4))
def test_flash_fwd_bwd_vs_fp64(case, dtype):
    b, n, h, hkv, d, bounds, *window = FLASH_CASES[case]
    q, k, v = _qkv(b, seq(n), h, hkv, d, dtype)
    kw = {} if bounds is None else {"cu_seqlens": cu(*bounds)}
    if window:
        kw["window"] = window[0]
    check_attention(lambda a, bb, c: flash_attention(a, bb, c, causal=True, return_lse=True, backend="triton", **kw),
                    q, k, v, causal=True, **kw)


# ------------------------------------------------------------------------------ lightning
LIGHTNING_CASES = {
    # name: (batch, seq, heads, kv heads, dk, dv, cu_seqlens bounds)
    "gqa-d128-4k": (1, 4096, 8, 2, 128, 128, None),
    "mha-d64-4k-b2": (2, 4096, 4, 4, 64, 64, None),
    "mqa-d64-16k": (1, 16384, 2, 1, 64, 64, None),
    "varlen-gqa-d64-8k": (1, 8192, 4, 2, 64, 128, (0, 1000, 5000, 8192)),
}


def _lightning_run(fn, q, k, v, s0, do, dst, dtype):
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    st = s0.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    o, fin = fn(*xs, st)
    loss = (o.double() * do).sum() + (fin.double() * dst).sum()
    loss.backward()
    return [o.detach(), fin.detach()] + [x.grad for x in xs] + [st.grad]


@pytest.mark.parametrize("case, dtype", params(LIGHTNING_CASES, 4))
def test_lightning_fwd_bwd_vs_fp64(case, dtype):
    b, n, h, hkv, dk, dv, bounds = LIGHTNING_CASES[case]
    n = seq(n)
    cs = None if bounds is None else cu(*bounds)
    docs = b if cs is None else cs.numel() - 1
    # keys scaled so the state stays O(1) over thousands of tokens at the weakest decay
    q, k, v = _qkv(b, n, h, hkv, dk, torch.float64, dv=dv)
    k = k * dk ** -0.5
    slope = lightning_slopes(h, 0, 2).to(DEVICE)   # strong decay (layer 0) keeps bf16 outputs bounded
    s0 = torch.randn(docs, h, dk, dv, device=DEVICE, dtype=torch.float64) * 0.1
    do = torch.randn(b, n, h, dv, device=DEVICE, dtype=torch.float64)
    dst = torch.randn(docs, h, dk, dv, device=DEVICE, dtype=torch.float64)
    kw = {} if cs is None else {"cu_seqlens": cs}

    def ours(a, bb, c, st):
        return lightning_attention(a, bb, c, slope, initial_state=st, output_final_state=True, backend="triton", **kw)

    def ref(a, bb, c, st):
        return lightning_reference(a, bb, c, slope, initial_state=st, **kw)

    got = _lightning_run(ours, q, k, v, s0, do, dst, dtype)
    low = _lightning_run(ref, q, k, v, s0, do, dst, dtype)
    r64 = _lightning_run(ref, q, k, v, s0, do, dst, torch.float64)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for i, name in enumerate(("o", "final_state", "dq", "dk", "dv", "d_initial_state")):
        factor = OUT_FACTOR if i < 2 else GRAD_FACTOR
        assert_rel_close(name, got[i], low[i].to(got[i].dtype), r64[i], factor)


# ------------------------------------------------------------------------------------ MoH
MOH_CASES = {
    # name: (batch, seq, heads, kv heads, head dim, active fraction)
    "gqa-d128-4k-half": (1, 4096, 16, 4, 128, 0.5),
    "mha-d64-4k-b2": (2, 4096, 8, 8, 64, 0.75),
    "mqa-d64-16k": (1, 16384, 2, 1, 64, 0.5),
}


def _moh_run(fn, q, k, v, gates, do, dlse):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, gates)]
    o, lse = fn(*leaves)
    loss = (o.double() * do).sum() + (torch.where(torch.isinf(lse), 0.0, lse).double() * dlse).sum()
    loss.backward()
    return [o.detach(), lse.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("case, dtype", params(MOH_CASES, 4))
def test_moh_fwd_bwd_vs_fp64(case, dtype):
    b, n, h, hkv, d, active = MOH_CASES[case]
    n = seq(n)
    q, k, v = _qkv(b, n, h, hkv, d, dtype)
    keep = torch.rand(b, n, h, device=DEVICE) < active
    gates = ((torch.rand(b, n, h, device=DEVICE) + 0.1) * keep).to(dtype)
    do = torch.randn(b, n, h, d, device=DEVICE, dtype=torch.float64)
    dlse = torch.randn(b, h, n, device=DEVICE, dtype=torch.float64)
    got = _moh_run(lambda *x: moh_attention(*x, return_lse=True, backend="triton"), q, k, v, gates, do, dlse)
    low = _moh_run(moh_attention_ref, q, k, v, gates, do, dlse)
    r64 = _moh_run(moh_attention_ref, *(t.double() for t in (q, k, v, gates)), do, dlse)
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(r64[1]))   # -inf exactly where gate == 0
    fin = torch.isfinite(r64[1])
    assert_rel_close("o", got[0], low[0], r64[0], OUT_FACTOR)
    assert_rel_close("lse", got[1][fin], low[1][fin].float(), r64[1][fin], OUT_FACTOR)
    for i, name in ((2, "dq"), (3, "dk"), (4, "dv"), (5, "dgates")):
        assert got[i].dtype == dtype
        assert_rel_close(name, got[i], low[i], r64[i], GRAD_FACTOR)
    # unselected (token, head) pairs: zero output and no gate gradient
    assert (got[0][~keep] == 0).all()
    assert (got[5][~keep] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_moh_varlen_vs_fp64(dtype, causal):
    """Packed documents (cu_seqlens) on the real kernels: 1-token, sub-tile and multi-tile documents."""
    n = seq(4096)
    cuts = [0, 1, 37, 37 + n // 5, n - 3, n]
    cu = torch.tensor(cuts, dtype=torch.int32, device=DEVICE)
    q, k, v = _qkv(1, n, 8, 2, 64, dtype)
    keep = torch.rand(1, n, 8, device=DEVICE) < 0.6
    gates = ((torch.rand(1, n, 8, device=DEVICE) + 0.1) * keep).to(dtype)
    do = torch.randn(1, n, 8, 64, device=DEVICE, dtype=torch.float64)
    dlse = torch.randn(1, 8, n, device=DEVICE, dtype=torch.float64)
    kw = dict(causal=causal, cu_seqlens=cu)
    got = _moh_run(lambda *x: moh_attention(*x, return_lse=True, backend="triton", **kw), q, k, v, gates, do, dlse)
    low = _moh_run(lambda *x: moh_attention_ref(*x, **kw), q, k, v, gates, do, dlse)
    r64 = _moh_run(lambda *x: moh_attention_ref(*x, **kw), *(t.double() for t in (q, k, v, gates)), do, dlse)
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(r64[1]))
    assert_rel_close("o", got[0], low[0], r64[0], OUT_FACTOR)
    for i, name in ((2, "dq"), (3, "dk"), (4, "dv"), (5, "dgates")):
        assert_rel_close(name, got[i], low[i], r64[i], GRAD_FACTOR)
