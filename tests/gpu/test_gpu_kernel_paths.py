"""The kernel paths test_gpu_kernels.py does not reach, compiled on a GPU (issue 20 item 13).

* the backward with a given merged ``(out, lse)`` (the ring and decode path: ``*_attention_backward``
  per key block, with the output and LSE merged over all blocks) vs the fp64 autograd gradients;
* ``q_offset`` / ``k_offset`` (mid-block, keys starting mid-block) for S2, flash and MoH;
* ``kv_head_offset`` / ``total_kv_heads``: a head slice equals the same heads of the full call;
* head dims 16 / 32 / 80 / 96 for every kernel, and fp32 inputs.

Same rule as everywhere (tests/tolerance.py): our error vs fp64 at most a small multiple of the
plain reference's error in the same dtype.
"""

from __future__ import annotations

import pytest
import torch

from gpu_common import DEVICE, block, seq
from s2_check import check_attention
from tolerance import GRAD_FACTOR, OUT_FACTOR, assert_rel_close

from seqpar.kernels import S2Layout, flash_attention, lightning_attention, lightning_slopes, moh_attention, s2_attention
from seqpar.kernels.flash.api import flash_attention_backward
from seqpar.kernels.lightning.reference import lightning_reference
from seqpar.kernels.moh.api import moh_attention_backward
from seqpar.kernels.moh.reference import moh_attention_ref
from seqpar.kernels.s2.api import s2_attention_backward
from seqpar.kernels.s2.reference import attention_reference


@pytest.fixture(autouse=True)
def _fresh():
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _qkv(b, sq, sk, h, hkv, d, dtype):
    return (torch.randn(b, sq, h, d, device=DEVICE, dtype=dtype), torch.randn(b, sk, hkv, d, device=DEVICE, dtype=dtype),
            torch.randn(b, sk, hkv, d, device=DEVICE, dtype=dtype))


def _layout():
    return S2Layout(block_size=block(64), local_blocks=2, vert_stride=4)


# ------------------------------------------------ backward with a merged (out, lse): the ring path
def _ring_grads(kind, q, k, v, do, gates=None, parts=2):
    """dq, dk, dv of attention over all keys, computed the ring way: the forward over all keys gives
    (o, lse); each key block's backward runs with that merged (o, lse); dq sums over blocks."""
    sq, sk = q.shape[1], k.shape[1]
    if kind == "moh":
        o, lse = moh_attention(q, k, v, gates, return_lse=True, backend="triton")
    elif kind == "s2":
        o, lse = s2_attention(q, k, v, _layout(), return_lse=True, backend="triton")
    else:
        o, lse = flash_attention(q, k, v, return_lse=True, backend="triton")
    cut = (sk // parts // block(64)) * block(64) + block(64) // 2  # a block boundary mid-tile
    dq, dks, dvs = 0, [], []
    for lo, hi in ((0, cut), (cut, sk)):
        kw = dict(q_offset=sk - sq, k_offset=lo)
        kb, vb = k[:, lo:hi].contiguous(), v[:, lo:hi].contiguous()
        if kind == "moh":
            g = moh_attention_backward(q, kb, vb, gates, o, lse, do, backend="triton", **kw)
        elif kind == "s2":
            g = s2_attention_backward(q, kb, vb, o, lse, do, _layout(), backend="triton", **kw)
        else:
            g = flash_attention_backward(q, kb, vb, o, lse, do, backend="triton", **kw)
        dq = dq + g[0].float()
        dks.append(g[1])
        dvs.append(g[2])
    return dq.to(q.dtype), torch.cat(dks, 1), torch.cat(dvs, 1)


def _ref_grads(kind, q, k, v, do, gates=None):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    if kind == "moh":
        o, _ = moh_attention_ref(q, k, v, gates.to(q.dtype))
    else:
        o, _ = attention_reference(q, k, v, layout=_layout() if kind == "s2" else None)
    (o * do.to(o.dtype)).sum().backward()
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["flash", "s2", "moh"])
def test_backward_with_merged_out_lse(kind, dtype):
    n = seq(2048)
    q, k, v = _qkv(1, n, n, 8, 2, 128 if dtype == torch.bfloat16 else 64, dtype)
    do = torch.randn_like(q)
    gates = ((torch.rand(1, n, 8, device=DEVICE) + 0.1) * (torch.rand(1, n, 8, device=DEVICE) < 0.5)) \
        if kind == "moh" else None
    ours = _ring_grads(kind, q, k, v, do, gates)
    low = _ref_grads(kind, q, k, v, do, gates)
    r64 = _ref_grads(kind, q.double(), k.double(), v.double(), do, None if gates is None else gates.double())
    for name, a, b, c in zip(("dq", "dk", "dv"), ours, low, r64):
        assert a.dtype == dtype
        assert_rel_close(name, a, b, c, GRAD_FACTOR)


# --------------------------------------------------------------------------- offsets
@pytest.mark.parametrize("kind", ["flash", "s2"])
def test_offsets_mid_block(kind):
    n = seq(4096)
    q, k, v = _qkv(2, n, n, 8, 2, 128, torch.bfloat16)
    layout = _layout() if kind == "s2" else None
    fn = (lambda *x, **kw: s2_attention(*x, layout, **kw)) if kind == "s2" else flash_attention
    qo = n // 2 + 37  # queries from mid-block against all keys
    check_attention(lambda a, b, c: fn(a, b, c, return_lse=True, q_offset=qo, backend="triton"),
                    q[:, qo:], k, v, layout=layout, q_offset=qo)
    ko = 5  # keys starting mid-block
    check_attention(lambda a, b, c: fn(a, b, c, return_lse=True, q_offset=qo, k_offset=ko, backend="triton"),
                    q[:, qo:], k[:, ko:], v[:, ko:], layout=layout, q_offset=qo, k_offset=ko)


def test_moh_offsets():
    n = seq(4096)
    q, k, v = _qkv(1, n // 2, n, 8, 2, 128, torch.bfloat16)
    gates = ((torch.rand(1, n // 2, 8, device=DEVICE) + 0.1) * (torch.rand(1, n // 2, 8, device=DEVICE) < 0.5))
    kw = dict(q_offset=n // 2 + 19, k_offset=7)
    do = torch.randn(q.shape, device=DEVICE, dtype=torch.float64)

    def run(fn, *x):
        leaves = [t.detach().clone().requires_grad_() for t in x]
        o, _ = fn(*leaves)
        (o.double() * do).sum().backward()
        return [o.detach()] + [t.grad for t in leaves[:3]]
    got = run(lambda *x: moh_attention(*x, return_lse=True, backend="triton", **kw), q, k, v, gates.to(q.dtype))
    low = run(lambda *x: moh_attention_ref(*x, **kw), q, k, v, gates.to(q.dtype))
    r64 = run(lambda *x: moh_attention_ref(*x, **kw), q.double(), k.double(), v.double(), gates.double())
    for i, name in enumerate(("o", "dq", "dk", "dv")):
        assert_rel_close(name, got[i], low[i], r64[i], OUT_FACTOR if i == 0 else GRAD_FACTOR)


def test_kv_head_offset_slice_equals_full_call():
    # the head slice a TP / Ulysses rank computes is exactly those heads of the full call
    n = seq(4096)
    h, hkv, lo, hi = 16, 4, 1, 3
    q, k, v = _qkv(1, n, n, h, hkv, 128, torch.bfloat16)
    layout = S2Layout(block_size=block(64), local_blocks=2, vert_stride=8, num_dense_heads=1)
    g = h // hkv
    full = s2_attention(q, k, v, layout, backend="triton")
    part = s2_attention(q[:, :, lo * g:hi * g], k[:, :, lo:hi], v[:, :, lo:hi], layout.with_heads(h),
                        kv_head_offset=lo, total_kv_heads=hkv, backend="triton")
    torch.testing.assert_close(part, full[:, :, lo * g:hi * g], rtol=0, atol=0)


# ----------------------------------------------------------- head dims and fp32, every kernel
DIMS = [16, 32, 80, 96]


# bf16 at every head dim; fp32 at 64 (the "m" tile class) and 96 (padded to 128: the "l" class)
SOFTMAX_DIMS = [(d, torch.bfloat16) for d in DIMS] + [(64, torch.float32), (96, torch.float32)]


@pytest.mark.parametrize("d, dtype", SOFTMAX_DIMS, ids=lambda x: str(x))
@pytest.mark.parametrize("kind", ["flash", "s2"])
def test_softmax_kernels_head_dims_and_fp32(kind, d, dtype):
    n = seq(4096)
    q, k, v = _qkv(1, n, n, 8, 2, d, dtype)
    layout = _layout() if kind == "s2" else None
    fn = (lambda *x, **kw: s2_attention(*x, layout, **kw)) if kind == "s2" else flash_attention
    check_attention(lambda a, b, c: fn(a, b, c, return_lse=True, backend="triton"), q, k, v, layout=layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", DIMS)
def test_moh_head_dims_and_fp32(d, dtype):
    n = seq(4096)
    q, k, v = _qkv(1, n, n, 8, 2, d, dtype)
    gates = ((torch.rand(1, n, 8, device=DEVICE) + 0.1) * (torch.rand(1, n, 8, device=DEVICE) < 0.5)).to(dtype)
    do = torch.randn(q.shape, device=DEVICE, dtype=torch.float64)

    def run(fn, *x):
        leaves = [t.detach().clone().requires_grad_() for t in x]
        o, _ = fn(*leaves)
        (o.double() * do).sum().backward()
        return [o.detach()] + [t.grad for t in leaves]
    got = run(lambda *x: moh_attention(*x, return_lse=True, backend="triton"), q, k, v, gates)
    low = run(moh_attention_ref, q, k, v, gates)
    r64 = run(moh_attention_ref, q.double(), k.double(), v.double(), gates.double())
    for i, name in enumerate(("o", "dq", "dk", "dv", "dgates")):
        assert_rel_close(name, got[i], low[i], r64[i], OUT_FACTOR if i == 0 else GRAD_FACTOR)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", DIMS)
def test_lightning_head_dims_and_fp32(d, dtype):
    n = seq(2048)
    q, k, v = _qkv(1, n, n, 4, 2, d, torch.float64)
    k = k * d ** -0.5
    slope = lightning_slopes(4, 0, 2).to(DEVICE)
    s0 = torch.randn(1, 4, d, d, device=DEVICE, dtype=torch.float64) * 0.1
    do = torch.randn(1, n, 4, d, device=DEVICE, dtype=torch.float64)

    def run(fn, dt):
        xs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        st = s0.detach().to(torch.float64 if dt == torch.float64 else torch.float32).requires_grad_()
        o, fin = fn(*xs, st)
        ((o.double() * do).sum() + fin.double().sum()).backward()
        return [o.detach(), fin.detach()] + [x.grad for x in xs] + [st.grad]
    got = run(lambda a, b, c, st: lightning_attention(a, b, c, slope, initial_state=st, output_final_state=True,
                                                      backend="triton"), dtype)
    ref = lambda a, b, c, st: lightning_reference(a, b, c, slope, initial_state=st)  # noqa: E731
    low, r64 = run(ref, dtype), run(ref, torch.float64)
    for i, name in enumerate(("o", "final_state", "dq", "dk", "dv", "d_initial_state")):
        assert_rel_close(name, got[i], low[i].to(got[i].dtype), r64[i], OUT_FACTOR if i < 2 else GRAD_FACTOR)
