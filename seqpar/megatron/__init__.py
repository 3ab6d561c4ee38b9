"""seqpar.megatron: megatron-core core-attention classes, self-attention modules, layer specs, and the
explicit CPU compatibility shim (one file, used only when CUDA is absent).

The only place where Megatron's [seq, batch, heads, dim] layout is converted.
"""

from seqpar.megatron.attention import (
    LightningSelfAttention,
    LightningSubmodules,
    MoHCoreAttention,
    MoHHiddenCoreAttention,
    MoHSelfAttention,
    S2CoreAttention,
    SoftmaxCoreAttention,
    moh_balance_loss,
)
from seqpar.megatron.config import KIND_OF_LETTER, SeqparTransformerConfig
from seqpar.megatron.cpu_compat import disable_cpu_compat, enable_cpu_compat
from seqpar.megatron.layout_check import check_layout, cp_scheme_for_layer
from seqpar.megatron.parallel import destroy_parallel, init_parallel
from seqpar.megatron.specs import check_pattern, layer_pattern, layer_specs, layer_specs_for_stage

__all__ = [
    "KIND_OF_LETTER", "LightningSelfAttention", "check_layout", "cp_scheme_for_layer", "LightningSubmodules", "MoHCoreAttention", "MoHHiddenCoreAttention",
    "MoHSelfAttention", "S2CoreAttention", "SeqparTransformerConfig", "SoftmaxCoreAttention", "check_pattern",
    "destroy_parallel", "disable_cpu_compat", "enable_cpu_compat", "init_parallel", "layer_pattern", "layer_specs",
    "layer_specs_for_stage", "moh_balance_loss",
]
