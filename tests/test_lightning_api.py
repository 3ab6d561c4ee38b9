"""Lightning attention: slopes, decode step, long-sequence stability and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from seqpar.kernels import lightning_attention, lightning_decode_step, lightning_slopes

BACKENDS = ["torch", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _on_device():
    # On a CUDA machine the Triton path runs for real; on CPU it is interpreted (tests/conftest.py).
    with torch.device(DEVICE):
        yield




# ---------------------------------------------------------------- slopes
def test_slopes_power_of_two():
    s = lightning_slopes(8)
    assert s.dtype == torch.float32 and s.shape == (8,)
    torch.testing.assert_close(s, torch.tensor([2.0 ** (-(i + 1)) for i in range(8)]))


def test_slopes_not_power_of_two_follow_alibi_interleaving():
    # ALiBi for 6 heads: the 4-head slopes, then every other one of the 8-head slopes (first 2)
    four = [2.0 ** (-8 * (i + 1) / 4) for i in range(4)]
    eight = [2.0 ** (-8 * (i + 1) / 8) for i in range(8)]
    torch.testing.assert_close(lightning_slopes(6), torch.tensor(four + eight[0::2][:2]))
    assert lightning_slopes(12).shape == (12,) and bool((lightning_slopes(12) > 0).all())


def test_slopes_per_layer_scaling():
    base = lightning_slopes(4)
    torch.testing.assert_close(lightning_slopes(4, 0, 5), base * (1 + 1e-5))
    torch.testing.assert_close(lightning_slopes(4, 2, 5), base * (1 - 2 / 4 + 1e-5))
    torch.testing.assert_close(lightning_slopes(4, 4, 5), base * 1e-5)
    # one layer: layer 0's factor at every depth (the limit of 0 / (num_layers - 1)), was a ValueError
    torch.testing.assert_close(lightning_slopes(4, 0, 1), base * (1 + 1e-5))
    assert torch.equal(lightning_slopes(4, 0, 1), lightning_slopes(4, 0, 7))


@pytest.mark.parametrize("args, match", [
    ((0,), "num_heads"), ((2.5,), "num_heads"), ((4, 1, None), "together"),
    ((4, 5, 5), "layer_idx"), ((4, -1, 5), "layer_idx"), ((4, 0, 0), "num_layers"), ((4, 1, 1), "layer_idx"),
])
def test_slopes_bad_args(args, match):
    with pytest.raises(ValueError, match=match):
        lightning_slopes(*args)


# ---------------------------------------------------------------- decode step
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_equals_full_op(backend, dtype):
    b, n, h, hkv, dk, dv = 2, 21, 4, 2, 16, 24
    q = torch.randn(b, n, h, dk).to(dtype)
    k = torch.randn(b, n, hkv, dk).to(dtype)
    v = torch.randn(b, n, hkv, dv).to(dtype)
    slope = torch.tensor([0.0, 0.01, 0.3, 1.0])
    s0 = torch.randn(b, h, dk, dv)
    o, fin = lightning_attention(q, k, v, slope, initial_state=s0, output_final_state=True, backend=backend)
    state = s0
    rtol, atol = (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 5e-2)
    for t in range(n):
        ot, state = lightning_decode_step(q[:, t], k[:, t], v[:, t], slope, state)
        assert ot.dtype == dtype and state.dtype == torch.float32
        torch.testing.assert_close(ot.float(), o[:, t].float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(state, fin, rtol=1e-4, atol=1e-4)


def test_decode_step_bad_input():
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    slope, state = torch.ones(4), torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="q must be a 3-D"):
        lightning_decode_step(q[:, None], k, v, slope, state)
    with pytest.raises(ValueError, match="state must have shape"):
        lightning_decode_step(q, k, v, slope, torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match="slope"):
        lightning_decode_step(q, k, v, -slope, state)
    with pytest.raises(ValueError, match="num_kv_heads"):
        lightning_decode_step(q, torch.randn(2, 3, 8), torch.randn(2, 3, 8), slope, state)
    with pytest.raises(ValueError, match="share one of"):
        lightning_decode_step(q.half(), k, v, slope, state)


# ---------------------------------------------------------------- stability
@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_stable_and_backends_agree(backend):
    """seq 4096 with strong (1) and tiny decay: finite forward and gradients, and the Triton path
    matches the torch chunked path (two heads keep the interpreter quick)."""
    n = 4096
    q = torch.randn(1, n, 2, 16) * 0.3
    k = torch.randn(1, n, 1, 16) * 0.3
    v = torch.randn(1, n, 1, 16)
    slope = torch.tensor([1.0, 1e-4])
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    o, fin = lightning_attention(*xs, slope, output_final_state=True, backend=backend)
    (o.sum() + fin.sum()).backward()
    for name, t in [("o", o), ("final", fin)] + [(f"d{c}", x.grad) for c, x in zip("qkv", xs)]:
        assert torch.isfinite(t).all(), name
    if backend == "triton":
        ys = [t.clone().requires_grad_() for t in (q, k, v)]
        o2, fin2 = lightning_attention(*ys, slope, output_final_state=True, backend="torch")
        (o2.sum() + fin2.sum()).backward()
        torch.testing.assert_close(o, o2, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(fin, fin2, rtol=1e-4, atol=1e-3)
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-2)


def test_64k_tokens_slope_one_finite():
    """Log-space decays: 64K tokens with slopes 1 and 30 (λ^n underflows in linear space) stay
    finite and the state is exactly the last tokens' contribution (gradients: the 4096 test)."""
    n = 65536
    q, k, v = (torch.randn(1, n, 2, 16) for _ in range(3))
    slope = torch.tensor([1.0, 30.0])
    o, fin = lightning_attention(q, k, v, slope, output_final_state=True, backend="torch")
    assert torch.isfinite(o).all() and torch.isfinite(fin).all()
    for h in range(2):
        tail = sum(math.exp(-slope[h].item() * (n - 1 - t)) * torch.outer(k[0, t, h].double(), v[0, t, h].double())
                   for t in range(n - 40, n))
        torch.testing.assert_close(fin[0, h].double(), tail, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- validation
def _ok():
    return (torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 8), torch.ones(4))


@pytest.mark.parametrize("mutate, match", [
    (lambda a: {**a, "q": a["q"][0]}, "q must have 4 dims"),
    (lambda a: {**a, "k": torch.randn(1, 8, 3, 16), "v": torch.randn(1, 8, 3, 8)}, "num_kv_heads"),
    (lambda a: {**a, "k": torch.randn(1, 8, 2, 12)}, "head dims"),
    (lambda a: {**a, "v": torch.randn(1, 7, 2, 8)}, "same seq length"),
    (lambda a: {**a, "k": torch.randn(1, 9, 2, 16), "v": torch.randn(1, 9, 2, 8)}, "q and k/v must have the same seq"),
    (lambda a: {**a, "slope": torch.ones(2)}, r"slope must have shape \[num_heads\]"),
    (lambda a: {**a, "slope": -torch.ones(4)}, "slope must be finite and >= 0"),
    (lambda a: {**a, "slope": torch.ones(4, dtype=torch.int64)}, "slope must be a floating-point"),
    (lambda a: {**a, "slope": [1.0] * 4}, "slope must be a torch.Tensor"),
    (lambda a: {**a, "initial_state": torch.zeros(1, 4, 16, 16)}, "initial_state must have shape"),
    (lambda a: {**a, "initial_state": torch.zeros(1, 4, 16, 8, dtype=torch.float64)}, "initial_state must be float32"),
    (lambda a: {**a, "cu_seqlens": torch.tensor([0, 3, 8])}, "cu_seqlens must be int32"),
    (lambda a: {**a, "cu_seqlens": torch.tensor([0, 3, 7], dtype=torch.int32)}, "sequence length"),
    (lambda a: {**a, "q": torch.randn(2, 8, 4, 16), "k": torch.randn(2, 8, 2, 16), "v": torch.randn(2, 8, 2, 8),
                "cu_seqlens": torch.tensor([0, 3, 8], dtype=torch.int32)}, "batch == 1"),
    (lambda a: {**a, "cu_seqlens": torch.tensor([0, 3, 8], dtype=torch.int32),
                "initial_state": torch.zeros(1, 4, 16, 8)}, r"initial_state must have shape \[2, 4, 16, 8\]"),
    (lambda a: {**a, "backend": "cuda"}, "backend"),
    (lambda a: {**a, "output_final_state": 1}, "output_final_state"),
])
def test_bad_input_raises_value_error(mutate, match):
    q, k, v, slope = _ok()
    args = mutate({"q": q, "k": k, "v": v, "slope": slope})
    kw = {key: args.pop(key) for key in list(args) if key not in ("q", "k", "v", "slope")}
    with pytest.raises(ValueError, match=match):
        lightning_attention(args["q"], args["k"], args["v"], args["slope"], **kw)
