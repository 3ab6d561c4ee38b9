"""flash-attn's accuracy rule, shared by every kernel test.

``ours`` and ``ref_lowp`` are computed from the same inputs in the working dtype; ``ref64`` is
the fp64 reference on those inputs upcast. The check is

    max|ours - ref64| <= factor * max|ref_lowp - ref64| + atol

with factor 2 for outputs and 3 for gradients: our kernel may be at most a small multiple worse
than the plain reference evaluated in the same low precision. ``atol`` only covers the case where
the reference error is exactly zero (e.g. fp32 on tiny inputs); keep it tiny.
"""

from __future__ import annotations

import torch

OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
DEFAULT_ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def assert_rel_close(name: str, ours: torch.Tensor, ref_lowp: torch.Tensor, ref64: torch.Tensor,
                     factor: float = OUT_FACTOR, atol: float | None = None) -> None:
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(ours.detach()).all(), f"{name}: non-finite values"
    if atol is None:
        atol = DEFAULT_ATOL.get(ours.dtype, 1e-6)
    e_ours = max_err(ours, ref64)
    e_ref = max_err(ref_lowp, ref64)
    bound = factor * e_ref + atol
    assert e_ours <= bound, (
        f"{name}: max err {e_ours:.3e} > {factor} x reference-in-{ours.dtype} err {e_ref:.3e} + {atol:.1e}"
    )
