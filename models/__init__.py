"""seqpar.models: model presets (tiny / 125m / 1b / 7b-like) with hybrid layer patterns such as
``"LLLA"``, built as megatron-core ``GPTModel`` through ``seqpar.megatron.layer_specs``."""

from seqpar.models.presets import SIZES, VARIANTS, ModelPreset, build_gpt, preset, preset_names, transformer_config

__all__ = ["SIZES", "VARIANTS", "ModelPreset", "build_gpt", "preset", "preset_names", "transformer_config"]
