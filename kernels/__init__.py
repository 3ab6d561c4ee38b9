"""seqpar.kernels: per-rank attention ops (no torch.distributed here).

Tensors are ``[batch, seq, heads, dim]``; varlen is ``batch == 1`` plus int32 ``cu_seqlens``.
Each op has four layers (docs/design.md): a plain-torch ``reference.py`` that defines the math,
Triton launchers, an autograd Function, and the public entry exported here.

Names resolve lazily so that importing one op does not import (or compile) the others.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "S2Layout": "seqpar.kernels.s2",
    "s2_attention": "seqpar.kernels.s2",
    "flash_attention": "seqpar.kernels.flash",
    "lightning_attention": "seqpar.kernels.lightning",
    "lightning_slopes": "seqpar.kernels.lightning",
    "lightning_decode_step": "seqpar.kernels.lightning",
    "moh_attention": "seqpar.kernels.moh",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'seqpar.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
