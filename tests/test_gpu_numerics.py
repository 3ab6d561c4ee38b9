"""bf16 numerics at GPU semantics, on CPU.

The interpreter upcasts bf16 tiles, so the kernel tests never see the roundings a GPU performs.
``gpu_mirror`` replays each kernel's arithmetic tile by tile and rounds where the compiled kernel
casts to bf16 (P and dS before the second matmuls; decayed scores and bf16 state snapshots in
Lightning). Two checks per kernel family:

1. without rounding the mirror equals the Triton kernel (interpreter) -- it follows the kernel;
2. with bf16 rounding it passes flash-attn's rule against the fp64 reference: a bf16 precision
   bug in the kernel's arithmetic (a missing fp32 accumulator, an early cast) fails here first.
"""

from __future__ import annotations

import pytest
import torch

from gpu_mirror import lightning_mirror_fwd_bwd, s2_mirror
from s2_check import check_attention, make_qkv
from seqpar.kernels import S2Layout, lightning_attention, s2_attention
from seqpar.kernels.flash.api import _flash_attention
from seqpar.kernels.lightning.reference import lightning_reference
from tolerance import GRAD_FACTOR, OUT_FACTOR, assert_rel_close, max_err

BF16 = torch.bfloat16


def _grads(fn, q, k, v, do, dlse):
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o, lse = fn(*xs)
    fin = torch.isfinite(lse)
    ((o.float() * do).sum() + (torch.where(fin, lse, 0.0) * dlse).sum()).backward()
    return [o.detach(), lse.detach()] + [x.grad for x in xs]


S2_CASES = {
    "s2 gqa": dict(shape=(1, 160, 160, 4, 2, 32), layout=S2Layout(block_size=32, local_blocks=1, vert_stride=2)),
    "flash causal": dict(shape=(2, 100, 100, 2, 1, 32), block_size=32),
    "flash full varlen": dict(shape=(1, 120, 120, 2, 2, 16), block_size=32, causal=False,
                              cu_seqlens=torch.tensor([0, 50, 120], dtype=torch.int32)),
}


def _kernel_op(case):
    kw = {k: case[k] for k in ("causal", "cu_seqlens") if k in case}
    if "layout" in case:
        return lambda a, b, c: s2_attention(a, b, c, case["layout"], return_lse=True, backend="triton", **kw)
    return lambda a, b, c: _flash_attention(a, b, c, block_size=case["block_size"], return_lse=True,
                                            backend="triton", **kw)


def _mirror_op(case, rnd):
    kw = {k: case[k] for k in ("layout", "causal", "cu_seqlens", "block_size") if k in case}
    return lambda a, b, c: s2_mirror(a, b, c, rnd=rnd, **kw)


@pytest.mark.parametrize("name", list(S2_CASES))
def test_s2_mirror_follows_the_kernel(name):
    case = S2_CASES[name]
    q, k, v = make_qkv(*case["shape"], torch.float32, device="cpu")
    do = torch.randn(q.shape)
    dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1])
    ours = _grads(_kernel_op(case), q, k, v, do, dlse)
    mirror = _grads(_mirror_op(case, None), q, k, v, do, dlse)
    for a, b in zip(ours, mirror):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", list(S2_CASES))
def test_s2_bf16_at_gpu_rounding(name):
    case = S2_CASES[name]
    q, k, v = make_qkv(*case["shape"], BF16, device="cpu")
    ref = {k_: case[k_] for k_ in ("layout", "causal", "cu_seqlens") if k_ in case}
    check_attention(_mirror_op(case, BF16), q, k, v, **ref)


SLOPES = [0.05, 0.3, 1.0, 0.0]


def _lightning_inputs(b, n, h, hkv, dk, dv, dtype, docs=None):
    num = b if docs is None else docs
    q = (torch.randn(b, n, h, dk) * 0.5).to(dtype)
    k = (torch.randn(b, n, hkv, dk) * 0.5).to(dtype)
    v = torch.randn(b, n, hkv, dv).to(dtype)
    s0 = torch.randn(num, h, dk, dv)
    slope = torch.tensor((SLOPES * h)[:h])
    do = torch.randn(b, n, h, dv).to(dtype)
    dst = torch.randn(num, h, dk, dv)
    return q, k, v, slope, s0, do, dst


def _lightning_kernel(q, k, v, slope, s0, do, dst, cu):
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    st = s0.detach().clone().requires_grad_()
    o, fin = lightning_attention(*xs, slope, initial_state=st, output_final_state=True, cu_seqlens=cu,
                                 backend="triton")
    ((o.double() * do.double()).sum() + (fin.double() * dst.double()).sum()).backward()
    return [o.detach(), fin.detach()] + [x.grad for x in xs] + [st.grad]


LIGHTNING_CASES = {
    "gqa two chunks + tail": dict(shape=(1, 150, 4, 2, 16, 24), cu=None),
    "varlen": dict(shape=(1, 140, 2, 1, 16, 16), cu=torch.tensor([0, 70, 140], dtype=torch.int32), docs=2),
}


@pytest.mark.parametrize("name", list(LIGHTNING_CASES))
def test_lightning_mirror_follows_the_kernel(name):
    case = LIGHTNING_CASES[name]
    args = _lightning_inputs(*case["shape"], torch.float32, docs=case.get("docs"))
    ours = _lightning_kernel(*args, case["cu"])
    mirror = lightning_mirror_fwd_bwd(*args, cu=case["cu"], rnd=None)
    for name_, a, b in zip(("o", "final", "dq", "dk", "dv", "ds0"), ours, mirror):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name_)


@pytest.mark.parametrize("name", list(LIGHTNING_CASES))
def test_lightning_bf16_at_gpu_rounding(name):
    case = LIGHTNING_CASES[name]
    q, k, v, slope, s0, do, dst = _lightning_inputs(*case["shape"], BF16, docs=case.get("docs"))
    cu = case["cu"]
    ours = lightning_mirror_fwd_bwd(q, k, v, slope, s0, do, dst, cu=cu, rnd=BF16)

    def ref(dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        st = s0.detach().to(torch.float64 if dtype == torch.float64 else dtype).requires_grad_()
        o, fin = lightning_reference(*xs, slope.to(dtype), st, cu)
        ((o.double() * do.double()).sum() + (fin.double() * dst.double()).sum()).backward()
        return [o.detach(), fin.detach()] + [x.grad for x in xs] + [st.grad]

    lowp, r64 = ref(BF16), ref(torch.float64)
    for i, name_ in enumerate(("o", "final", "dq", "dk", "dv", "ds0")):
        assert_rel_close(name_, ours[i], lowp[i], r64[i], factor=OUT_FACTOR if i < 2 else GRAD_FACTOR)
    # the bf16 recurrence keeps a bf16 state, so that rule is loose; the kernels' state is fp32 and
    # only the snapshots are bf16: hold o and the final state to a few bf16 ulps of their scale
    eps = torch.finfo(BF16).eps
    assert max_err(ours[0], r64[0]) <= 8 * eps * r64[0].abs().max().item()
    assert max_err(ours[1], r64[1]) <= 8 * eps * r64[1].abs().max().item()


def _moh_inputs(dtype):
    q, k, v = make_qkv(2, 90, 90, 4, 2, 32, dtype, device="cpu")
    gates = ((torch.rand(2, 90, 4) + 0.1) * (torch.rand(2, 90, 4) < 0.6)).to(dtype)
    return q, k, v, gates


def _moh_grads(fn, q, k, v, gates, do, dlse):
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v, gates)]
    o, lse = fn(*xs)
    ((o.double() * do.double()).sum() + (torch.where(torch.isinf(lse), 0.0, lse).double() * dlse).sum()).backward()
    return [o.detach(), lse.detach()] + [x.grad for x in xs]


def test_moh_mirror_follows_the_kernel():
    from gpu_mirror import moh_mirror
    from seqpar.kernels import moh_attention

    q, k, v, gates = _moh_inputs(torch.float32)
    do, dlse = torch.randn(q.shape), torch.randn(2, 4, 90, dtype=torch.float64)
    ours = _moh_grads(lambda *x: moh_attention(*x, return_lse=True, backend="triton"), q, k, v, gates, do, dlse)
    mirror = _moh_grads(lambda *x: moh_mirror(*x, rnd=None, block_size=32), q, k, v, gates, do, dlse)
    for name_, a, b in zip(("o", "lse", "dq", "dk", "dv", "dgates"), ours, mirror):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=name_)


def test_moh_bf16_at_gpu_rounding():
    from gpu_mirror import moh_mirror
    from seqpar.kernels.moh import moh_attention_ref

    q, k, v, gates = _moh_inputs(BF16)
    do, dlse = torch.randn(q.shape), torch.randn(2, 4, 90, dtype=torch.float64)
    ours = _moh_grads(lambda *x: moh_mirror(*x, rnd=BF16), q, k, v, gates, do, dlse)
    lowp = _moh_grads(moh_attention_ref, q, k, v, gates, do, dlse)
    r64 = _moh_grads(moh_attention_ref, *(t.double() for t in (q, k, v, gates)), do, dlse)
    fin = torch.isfinite(r64[1])
    assert torch.equal(torch.isfinite(ours[1]), fin)
    assert_rel_close("o", ours[0], lowp[0], r64[0], OUT_FACTOR)
    assert_rel_close("lse", ours[1][fin], lowp[1][fin], r64[1][fin], OUT_FACTOR)
    for i, name_ in ((2, "dq"), (3, "dk"), (4, "dv"), (5, "dgates")):
        assert_rel_close(name_, ours[i], lowp[i], r64[i], GRAD_FACTOR)
