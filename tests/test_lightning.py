"""Lightning attention vs the fp64 token-by-token recurrence (flash-attn style tolerances).

Both backends: "torch" (chunked, CPU fallback) and "triton" (TRITON_INTERPRET=1 on CPU). Shapes
are small so the interpreter runs few programs; every case has GQA and dk != dv (non powers of
two, so the padded/masked tiles are exercised).
"""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels import lightning_attention
from seqpar.kernels.lightning.chunked import lightning_chunked
from seqpar.kernels.lightning.function import LightningFunction
from seqpar.kernels.lightning.reference import lightning_reference
from tolerance import GRAD_FACTOR, OUT_FACTOR, assert_rel_close, max_err

BACKENDS = ["torch", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _on_device():
    # On a CUDA machine the Triton path runs for real; on CPU it is interpreted (tests/conftest.py).
    with torch.device(DEVICE):
        yield


# tiny to 1, plus exactly 0 (no decay)
SLOPES = [0.0, 1e-3, 0.25, 1.0]


def make_inputs(b, n, h, hkv, dk, dv, dtype, docs=None, state=True):
    num = b if docs is None else docs
    q = torch.randn(b, n, h, dk, dtype=dtype) * 0.5
    k = torch.randn(b, n, hkv, dk, dtype=dtype) * 0.5
    v = torch.randn(b, n, hkv, dv, dtype=dtype)
    s0 = torch.randn(num, h, dk, dv) if state else None
    slope = torch.tensor((SLOPES * h)[:h], dtype=torch.float32)
    do = torch.randn(b, n, h, dv, dtype=dtype)
    dst = torch.randn(num, h, dk, dv)
    return q, k, v, slope, s0, do, dst


def run(fn, q, k, v, s0, do, dst, dtype=None):
    """Forward + backward of ``fn(q, k, v, s0) -> (o, final)`` with the loss o·do + final·dst
    (so the gradient also flows in through the final state). Inputs cast to ``dtype``."""
    dtype = dtype or q.dtype
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    st = None if s0 is None else s0.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    o, fin = fn(*xs, st)
    loss = (o.to(torch.float64) * do.to(torch.float64)).sum() + (fin.to(torch.float64) * dst.to(torch.float64)).sum()
    loss.backward()
    grads = [x.grad for x in xs] + ([] if st is None else [st.grad])
    return [o, fin] + grads


def check_all(name, ours, lowp, ref64):
    names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]
    for i, (a, b_, c) in enumerate(zip(ours, lowp, ref64)):
        assert_rel_close(f"{name}:{names[i]}", a, b_, c, factor=OUT_FACTOR if i < 2 else GRAD_FACTOR)


def compare(backend, q, k, v, slope, s0, do, dst, dtype, cu=None):
    ours = run(lambda q_, k_, v_, s_: lightning_attention(q_, k_, v_, slope, initial_state=s_,
                                                          output_final_state=True, cu_seqlens=cu,
                                                          backend=backend), q, k, v, s0, do, dst, dtype)
    lowp = run(lambda q_, k_, v_, s_: lightning_reference(q_, k_, v_, slope.to(dtype), None if s_ is None else s_.to(dtype), cu),
               q, k, v, s0, do, dst, dtype)
    ref64 = run(lambda q_, k_, v_, s_: lightning_reference(q_, k_, v_, slope.double(), s_, cu),
                q, k, v, s0, do, dst, torch.float64)
    check_all(f"{backend}/{dtype}", ours, lowp, ref64)
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 63, 65, 300])
def test_fp32_lengths(backend, n):
    q, k, v, slope, s0, do, dst = make_inputs(1, n, 4, 2, 20, 36, torch.float32)
    compare(backend, q, k, v, slope, s0, do, dst, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    q, k, v, slope, s0, do, dst = make_inputs(2, 97, 4, 1, 16, 24, torch.float32)
    ours = compare(backend, q, k, v, slope, s0, do, dst, dtype)
    # The low-precision recurrence keeps its state in fp16/bf16, so the rule above is loose; our
    # state is fp32, so also hold the output to a few ulps of its scale.
    o64, fin64 = lightning_reference(*(t.to(dtype).double() for t in (q, k, v)), slope.double(), s0.double())
    eps = torch.finfo(dtype).eps
    assert max_err(ours[0], o64) <= 8 * eps * o64.abs().max().item()
    assert max_err(ours[1], fin64) <= 8 * eps * fin64.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_initial_state_and_unused_final(backend):
    q, k, v, slope, _, do, _ = make_inputs(2, 70, 2, 2, 16, 16, torch.float32, state=False)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    o, fin = lightning_attention(*ours, slope, backend=backend)
    assert fin is None
    (o * do).sum().backward()
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    o64, _ = lightning_reference(*ref, slope.double())
    (o64 * do.double()).sum().backward()
    refl = [t.clone().requires_grad_() for t in (q, k, v)]
    o32, _ = lightning_reference(*refl, slope)
    (o32 * do).sum().backward()
    assert_rel_close("o", o, o32, o64)
    for name, a, b_, c in zip("qkv", ours, refl, ref):
        assert_rel_close(f"d{name}", a.grad, b_.grad, c.grad, factor=GRAD_FACTOR)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("chunk", [16, 32])
def test_chunk_size_not_dividing_length(impl, chunk):
    """The internal chunk size is a parameter below the public API: cover sizes != 64."""
    q, k, v, slope, s0, do, dst = make_inputs(2, 75, 2, 1, 16, 20, torch.float32)
    if impl == "chunked":
        fn = lambda q_, k_, v_, s_: lightning_chunked(q_, k_, v_, slope, s_, None, chunk)  # noqa: E731
    else:
        fn = lambda q_, k_, v_, s_: LightningFunction.apply(q_, k_, v_, slope, s_, None, chunk)  # noqa: E731
    ours = run(fn, q, k, v, s0, do, dst)
    lowp = run(lambda q_, k_, v_, s_: lightning_reference(q_, k_, v_, slope, s_), q, k, v, s0, do, dst)
    ref64 = run(lambda q_, k_, v_, s_: lightning_reference(q_, k_, v_, slope.double(), s_), q, k, v, s0, do, dst,
                torch.float64)
    check_all(f"{impl}/chunk{chunk}", ours, lowp, ref64)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_fp64_matches_recurrence(chunk):
    """In fp64 the chunked algorithm equals the recurrence to rounding (any chunk size)."""
    q, k, v, slope, s0, do, dst = make_inputs(2, 50, 4, 2, 5, 3, torch.float64)
    s0 = s0.double()
    o, fin = lightning_chunked(q, k, v, slope.double(), s0, None, chunk)
    o64, fin64 = lightning_reference(q, k, v, slope.double(), s0)
    torch.testing.assert_close(o, o64, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fin, fin64, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_vs_reference(backend):
    cu = torch.tensor([0, 1, 64, 130, 200], dtype=torch.int32)
    q, k, v, slope, s0, do, dst = make_inputs(1, 200, 4, 2, 20, 36, torch.float32, docs=4)
    compare(backend, q, k, v, slope, s0, do, dst, torch.float32, cu=cu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_equals_separate_calls(backend):
    cu = torch.tensor([0, 1, 64, 130, 200], dtype=torch.int32)
    q, k, v, slope, s0, do, dst = make_inputs(1, 200, 2, 1, 16, 24, torch.float32, docs=4)
    packed = run(lambda q_, k_, v_, s_: lightning_attention(q_, k_, v_, slope, initial_state=s_, output_final_state=True,
                                                            cu_seqlens=cu, backend=backend), q, k, v, s0, do, dst)
    c = cu.tolist()
    pieces = []
    for d in range(4):
        sl = slice(c[d], c[d + 1])
        pieces.append(run(lambda q_, k_, v_, s_: lightning_attention(q_, k_, v_, slope, initial_state=s_,
                                                                     output_final_state=True, backend=backend),
                          q[:, sl], k[:, sl], v[:, sl], s0[d:d + 1], do[:, sl], dst[d:d + 1]))
    seq_cat = [torch.cat([p[i] for p in pieces], dim=1) for i in (0, 2, 3, 4)]
    state_cat = [torch.cat([p[i] for p in pieces], dim=0) for i in (1, 5)]
    for name, a, b_ in zip(["o", "dq", "dk", "dv"], [packed[0], *packed[2:5]], seq_cat):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for name, a, b_ in zip(["final_state", "d_initial_state"], [packed[1], packed[5]], state_cat):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_chaining_two_halves_equals_one_call(backend):
    """The CP contract: final_state of the first half seeds the second; forward and every
    gradient (incl. the one flowing back through the chained state) equal one call."""
    q, k, v, slope, s0, do, dst = make_inputs(2, 130, 4, 2, 20, 36, torch.float32)
    cut = 70

    def chained(q_, k_, v_, s_):
        o1, f1 = lightning_attention(q_[:, :cut], k_[:, :cut], v_[:, :cut], slope, initial_state=s_,
                                     output_final_state=True, backend=backend)
        o2, f2 = lightning_attention(q_[:, cut:], k_[:, cut:], v_[:, cut:], slope, initial_state=f1,
                                     output_final_state=True, backend=backend)
        return torch.cat([o1, o2], dim=1), f2

    whole = run(lambda q_, k_, v_, s_: lightning_attention(q_, k_, v_, slope, initial_state=s_, output_final_state=True,
                                                           backend=backend), q, k, v, s0, do, dst)
    two = run(chained, q, k, v, s0, do, dst)
    lowp = run(lambda q_, k_, v_, s_: lightning_reference(q_, k_, v_, slope, s_), q, k, v, s0, do, dst)
    ref64 = run(lambda q_, k_, v_, s_: lightning_reference(q_, k_, v_, slope.double(), s_), q, k, v, s0, do, dst,
                torch.float64)
    check_all(f"{backend}/chained", two, lowp, ref64)
    for a, b_ in zip(two, whole):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)


def test_backends_agree_on_gqa_groups():
    """GQA with a group of 4 and dk < dv: Triton and torch agree, including summed dk/dv."""
    q, k, v, slope, s0, do, dst = make_inputs(1, 90, 8, 2, 16, 48, torch.float32)
    a = run(lambda q_, k_, v_, s_: lightning_attention(q_, k_, v_, slope, initial_state=s_, output_final_state=True,
                                                       backend="torch"), q, k, v, s0, do, dst)
    b_ = run(lambda q_, k_, v_, s_: lightning_attention(q_, k_, v_, slope, initial_state=s_, output_final_state=True,
                                                        backend="triton"), q, k, v, s0, do, dst)
    for x, y in zip(a, b_):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_slope_gets_no_gradient():
    q, k, v, slope, s0, do, dst = make_inputs(1, 20, 2, 2, 16, 16, torch.float32)
    slope = slope.clone().requires_grad_()
    qq = q.clone().requires_grad_()
    o, _ = lightning_attention(qq, k, v, slope, backend="torch")
    o.sum().backward()
    assert slope.grad is None and qq.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_only_through_final_state(backend):
    """A CP rank may use only the state it passes on: o unused, loss on final_state alone
    (q does not reach the state, so it gets no or a zero gradient)."""
    q, k, v, slope, s0, _, dst = make_inputs(1, 80, 2, 1, 16, 24, torch.float32)
    ours = [t.clone().requires_grad_() for t in (q, k, v, s0)]
    _, fin = lightning_attention(*ours[:3], slope, initial_state=ours[3], output_final_state=True, backend=backend)
    (fin * dst).sum().backward()
    ref = [t.double().requires_grad_() for t in (q, k, v, s0)]
    _, fin64 = lightning_reference(*ref[:3], slope.double(), ref[3])
    (fin64 * dst.double()).sum().backward()
    low = [t.clone().requires_grad_() for t in (q, k, v, s0)]
    _, fin32 = lightning_reference(*low[:3], slope, low[3])
    (fin32 * dst).sum().backward()
    assert_rel_close("final_state", fin, fin32, fin64)
    assert ours[0].grad is None or not ours[0].grad.any()
    for name, a, b_, c in zip(["dk", "dv", "d_initial_state"], ours[1:], low[1:], ref[1:]):
        assert_rel_close(name, a.grad, b_.grad, c.grad, factor=GRAD_FACTOR)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Views of [batch, heads, seq, dim] tensors (strided) give the same result as contiguous."""
    q, k, v, slope, s0, do, dst = make_inputs(2, 40, 2, 1, 16, 24, torch.float32)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    a, fa = lightning_attention(qt, kt, vt, slope, initial_state=s0, output_final_state=True, backend=backend)
    b_, fb = lightning_attention(q, k, v, slope, initial_state=s0, output_final_state=True, backend=backend)
    torch.testing.assert_close(a, b_)
    torch.testing.assert_close(fa, fb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [
    (1, 130, 2, 1, 80, 72, None),                 # dk, dv > 64: several dk/dv tiles, last one masked
    (1, 192, 2, 2, 8, 130, [0, 64, 128, 192]),    # tiny dk (padded to 16), 3 dv tiles, docs == chunks
])
def test_multi_tile_head_dims(backend, shape):
    b, n, h, hkv, dk, dv, cu = shape
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v, slope, s0, do, dst = make_inputs(b, n, h, hkv, dk, dv, torch.float32, docs=None if cu is None else len(cu) - 1)
    compare(backend, q, k, v, slope, s0, do, dst, torch.float32, cu=cu_t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_state_beyond_fp16_range(backend):
    """The fp32 state may exceed fp16's 65504 while every input and output fits in fp16: no
    product may round the state to fp16 (it would become inf)."""
    n, dk, dv = 200, 16, 16
    q = torch.full((1, n, 1, dk), 1e-3, dtype=torch.float16)
    k = torch.full((1, n, 1, dk), 20.0, dtype=torch.float16)
    v = torch.full((1, n, 1, dv), 20.0, dtype=torch.float16)
    slope = torch.zeros(1)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    o, fin = lightning_attention(*xs, slope, output_final_state=True, backend=backend)
    (o.float().sum() * 1e-4 + fin.sum() * 1e-3).backward()  # scaled so the true grads fit fp16
    assert fin.max().item() > 65504
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    o64, fin64 = lightning_reference(*ref, slope.double())
    (o64.sum() * 1e-4 + fin64.sum() * 1e-3).backward()
    torch.testing.assert_close(o.double(), o64, rtol=2e-3, atol=0)
    torch.testing.assert_close(fin.double(), fin64, rtol=1e-5, atol=0)
    for name, x, r in zip("qkv", xs, ref):
        torch.testing.assert_close(x.grad.double(), r.grad, rtol=5e-3, atol=1e-4, msg=lambda m: f"d{name}: {m}")
