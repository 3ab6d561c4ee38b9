"""Model presets: sizes x hybrid patterns, built as megatron-core ``GPTModel`` from ``layer_specs``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from typing import TYPE_CHECKING

import torch

from seqpar.megatron.config import check_pattern

if TYPE_CHECKING:  # megatron-core is imported where a model is built: the presets alone stay light
    from seqpar.megatron.transformer_config import SeqparTransformerConfig


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a GPT-style model; ``pattern`` picks the attention kind per layer (tiled)."""

    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """KV heads (GQA); must divide num_attention_heads."""
    ffn_hidden_size: int
    """MLP width."""
    pattern: str = "A"
    """Letters over A (softmax), S (s2), L (lightning), H (moh), tiled over the layers."""


SIZES = {
    "tiny": ModelPreset(4, 64, 4, 2, 128),
    "125m": ModelPreset(12, 768, 12, 12, 3072),
    "1b": ModelPreset(24, 2048, 16, 8, 5632),
    "7b": ModelPreset(32, 4096, 32, 8, 11008),
}
# Hybrid variants: dense softmax, 3:1 lightning:softmax (MiniMax-01), S2 with dense layers between
# (S2-Attention paper: sparse layers interleaved with dense), MoH everywhere, and all four kinds.
VARIANTS = {"dense": "A", "lightning": "LLLA", "s2": "SA", "moh": "H", "hybrid": "ASLH"}


def preset(name: str) -> ModelPreset:
    """``"<size>"`` or ``"<size>-<variant>"`` (e.g. ``"tiny-hybrid"``, ``"7b-lightning"``)."""
    size, _, variant = name.partition("-")
    if size not in SIZES:
        raise ValueError(f"model preset size {size!r} is unknown; sizes: {sorted(SIZES)}")
    variant = variant or "dense"
    if variant not in VARIANTS:
        raise ValueError(f"model preset variant {variant!r} is unknown; variants: {sorted(VARIANTS)}")
    return replace(SIZES[size], pattern=VARIANTS[variant])


def preset_names() -> list[str]:
    return [f"{s}-{v}" for s in SIZES for v in VARIANTS]


def transformer_config(p: ModelPreset, **overrides: Any) -> SeqparTransformerConfig:
    """A ``SeqparTransformerConfig`` for ``p`` (RMSNorm, SwiGLU, no biases, no dropout);
    ``overrides`` are TransformerConfig/SeqparTransformerConfig fields.

    Initialisation is on the CPU whatever the device (``use_cpu_initialization``, also with CUDA):
    megatron then draws each tensor-parallel weight whole from the CPU generator and keeps this
    rank's slice, so a model is the same at every TP size and on every device (the GPU draws of
    megatron's CUDA path are per TP rank). The modules are created on the CPU; whoever builds
    them moves them to the device (``seqpar.train.runtime.build_model`` does, layer by layer)."""
    from seqpar.megatron.transformer_config import SeqparTransformerConfig

    check_pattern(p.pattern, "model.pattern")
    kw: dict[str, Any] = dict(
        num_layers=p.num_layers, hidden_size=p.hidden_size, num_attention_heads=p.num_attention_heads,
        num_query_groups=p.num_query_groups, ffn_hidden_size=p.ffn_hidden_size, normalization="RMSNorm",
        add_bias_linear=False, attention_dropout=0.0, hidden_dropout=0.0,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,  # SwiGLU MLP (Llama-style)
        use_cpu_initialization=True,
        cuda_graph_scope=[])  # = whole layer; megatron-core 0.16's default "full" warns that it is deprecated
    kw.update(overrides)
    return SeqparTransformerConfig(**kw)


def build_gpt(p: ModelPreset, config: SeqparTransformerConfig, *, vocab_size: int, max_sequence_length: int,
              spec=None, pre_process: bool = True, post_process: bool = True):
    """megatron-core ``GPTModel`` with one spec per layer from ``p.pattern`` (this pipeline stage;
    ``spec`` overrides ``layer_specs_for_stage``). ``pre_process`` / ``post_process``: whether this
    stage holds the embedding / the final norm and output layer (first / last pipeline stage)."""
    from megatron.core.models.gpt import GPTModel

    from seqpar.megatron.specs import layer_specs_for_stage

    return GPTModel(config, spec if spec is not None else layer_specs_for_stage(p.pattern, config),
                    vocab_size=vocab_size, max_sequence_length=max_sequence_length, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False, pre_process=pre_process, post_process=post_process)


__all__ = ["ModelPreset", "SIZES", "VARIANTS", "build_gpt", "preset", "preset_names", "transformer_config"]
