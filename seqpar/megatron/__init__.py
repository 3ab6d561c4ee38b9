"""seqpar.megatron: megatron-core core-attention classes, self-attention modules, layer specs, and the
explicit CPU compatibility shim (one file, used only when CUDA is absent).

The only place where Megatron's [seq, batch, heads, dim] layout is converted.

Importing this package does not import megatron-core (~6 s of CPU, the bulk of a light command such
as ``python -m seqpar.train RECIPE --check``): every public name below is imported from its module on
first use, so ``from seqpar.megatron import layer_specs`` works as before and pays for megatron-core
only there. ``seqpar.megatron.config`` and ``seqpar.megatron.layout_check`` (the recipe schema's
fields and the layout checks) never import it; ``tests/test_package.py`` keeps them light.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_SOURCES = {
    **dict.fromkeys(["LightningSelfAttention", "LightningSubmodules", "MoHCoreAttention", "MoHHiddenCoreAttention",
                     "MoHSelfAttention", "S2CoreAttention", "SoftmaxCoreAttention", "moh_balance_loss"], "attention"),
    **dict.fromkeys(["KIND_OF_LETTER", "check_pattern", "layer_pattern"], "config"),
    "SeqparTransformerConfig": "transformer_config",
    **dict.fromkeys(["disable_cpu_compat", "enable_cpu_compat"], "cpu_compat"),
    **dict.fromkeys(["check_layout", "cp_scheme_for_layer"], "layout_check"),
    **dict.fromkeys(["destroy_parallel", "init_parallel"], "parallel"),
    **dict.fromkeys(["layer_specs", "layer_specs_for_stage"], "specs"),
}


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))


__all__ = sorted(_SOURCES)
