"""Shared comparison for the S2 and flash attention tests (not a test module).

``check_attention`` runs an op and the dense fp64 reference on the same inputs, backpropagates
one loss that uses both ``o`` and ``lse`` (so the lse gradient path is exercised), and applies
flash-attn's rule (tests/tolerance.py) to o, lse, dq, dk, dv.
"""

from __future__ import annotations

from typing import Callable

import torch

from seqpar.kernels.s2.reference import attention_reference
from tolerance import GRAD_FACTOR, OUT_FACTOR, assert_rel_close

# Triton runs compiled on a CUDA host and through the interpreter on CPU (conftest sets it)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_qkv(b: int, sq: int, sk: int, h: int, hkv: int, d: int, dtype: torch.dtype, device=DEVICE):
    q = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    k = torch.randn(b, sk, hkv, d, dtype=dtype, device=device)
    v = torch.randn(b, sk, hkv, d, dtype=dtype, device=device)
    return q, k, v


def _run(fn: Callable, q, k, v, do, dlse):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o, lse = fn(q, k, v)
    # rows with lse = -inf (no visible key) get no lse gradient; where() keeps their grads at 0
    lse_term = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    loss = (o.to(do.dtype) * do).sum() + (lse_term.to(dlse.dtype) * dlse).sum()
    loss.backward()
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


def check_attention(fn: Callable, q, k, v, *, lse_grad: bool = True, **ref_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(q, k, v) -> (o, lse)``; ``ref_kwargs`` go to ``attention_reference``. Returns ours (o, lse)."""
    do = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    dlse = torch.randn(lse_shape, dtype=torch.float64, device=q.device) if lse_grad else \
        torch.zeros(lse_shape, dtype=torch.float64, device=q.device)
    ours = _run(fn, q, k, v, do.to(q.dtype), dlse.float())
    ref = lambda a, b, c: attention_reference(a, b, c, **ref_kwargs)  # noqa: E731
    lowp = _run(ref, q, k, v, do.to(q.dtype), dlse.float())
    r64 = _run(ref, q.double(), k.double(), v.double(), do, dlse)
    o, lse = ours[0], ours[1]
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    # rows without keys: exactly o = 0 and lse = -inf, in the same places as the reference
    empty = torch.isneginf(r64[1])
    assert torch.equal(torch.isneginf(lse), empty), "lse = -inf rows differ from the reference"
    assert (o.transpose(1, 2)[empty] == 0).all(), "rows without keys must give o = 0"
    fin = ~empty
    assert_rel_close("o", o, lowp[0], r64[0], OUT_FACTOR)
    assert_rel_close("lse", lse[fin], lowp[1][fin], r64[1][fin], OUT_FACTOR)
    for name, i in (("dq", 2), ("dk", 3), ("dv", 4)):
        assert ours[i].dtype == q.dtype
        assert_rel_close(name, ours[i], lowp[i], r64[i], GRAD_FACTOR)
    return o, lse
