"""``layer_specs``: a hybrid pattern string to megatron-core ``TransformerBlockSubmodules``.

Pattern letters: ``A`` softmax, ``S`` s2, ``L`` lightning, ``H`` moh. The pattern is tiled over the
layers (``"LLLA"`` with 8 layers = LLLALLLA). Everything but the attention is megatron-core's
local GPT layer (RMSNorm, column/row-parallel MLP, bias-dropout-add).
"""

from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from seqpar.megatron.attention import (
    LightningSelfAttention,
    LightningSubmodules,
    MoHHiddenCoreAttention,
    MoHSelfAttention,
    S2CoreAttention,
    SoftmaxCoreAttention,
)
from seqpar.megatron.config import check_pattern, layer_pattern  # noqa: F401  public here too (seqpar.megatron)
from seqpar.megatron.rope import SeqparSelfAttention


def _layer_spec(letter: str, normalization: str, num_moh_layers: int = 1) -> ModuleSpec:
    base = get_gpt_layer_local_spec(normalization=normalization)
    sub = base.submodules
    if letter == "L":
        attn = ModuleSpec(module=LightningSelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                          submodules=LightningSubmodules(linear_qkvg=ColumnParallelLinear,
                                                         linear_proj=RowParallelLinear))
    else:
        core = {"A": SoftmaxCoreAttention, "S": S2CoreAttention, "H": MoHHiddenCoreAttention}[letter]
        params = {"attn_mask_type": AttnMaskType.causal}
        if letter == "H":  # the aux loss is averaged over the model's MoH layers (MoHSelfAttention)
            params["num_moh_layers"] = num_moh_layers
        # A / S / H: megatron's SelfAttention with packed-sequence RoPE that makes no host sync (rope.py)
        attn = ModuleSpec(module=MoHSelfAttention if letter == "H" else SeqparSelfAttention, params=params,
                          submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear, core_attention=core,
                                                             linear_proj=RowParallelLinear,
                                                             q_layernorm=IdentityOp, k_layernorm=IdentityOp))
    sub.self_attention = attn
    return base


def layer_specs(pattern: str, num_layers: int, *, offset: int = 0, count: Optional[int] = None,
                normalization: str = "RMSNorm") -> TransformerBlockSubmodules:
    """One ModuleSpec per layer of this pipeline stage.

    Args:
        pattern: letters over {A, S, L, H}, tiled over ``num_layers`` (the whole model).
        num_layers: total layers of the model.
        offset: index of this stage's first layer (megatron's ``get_transformer_layer_offset``).
        count: layers on this stage (default: all from ``offset``).
        normalization: "RMSNorm" or "LayerNorm" (megatron local spec).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    count = num_layers - offset if count is None else count
    if offset < 0 or count < 1 or offset + count > num_layers:
        raise ValueError(f"offset={offset}, count={count} must select layers inside [0, {num_layers})")
    full = layer_pattern(pattern, num_layers)
    letters = full[offset:offset + count]
    specs = [_layer_spec(c, normalization, full.count("H")) for c in letters]
    final_norm = get_gpt_layer_local_spec(normalization=normalization).submodules.input_layernorm
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)


def layer_specs_for_stage(pattern: str, config, vp_stage: Optional[int] = None,
                          pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """``layer_specs`` for the pipeline stage megatron-core will build (offset/count from parallel_state)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
    count = get_num_layers_to_build(config, vp_stage, pp_rank)
    return layer_specs(pattern, config.num_layers, offset=offset, count=count,
                       normalization=config.normalization)
