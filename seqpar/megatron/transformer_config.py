"""``SeqparTransformerConfig``: megatron-core's ``TransformerConfig`` with seqpar's attention fields.

The fields, defaults, types and ranges are those of ``seqpar.megatron.config.AttentionModelFields`` and
``AttentionParallelFields`` (``backend`` is called ``seqpar_backend`` here, next to Megatron's own
fields), validated by the same models. This module imports megatron-core; ``seqpar.megatron.config``
(the recipe schema's fields) does not, so validating a recipe never pays for megatron-core's import
(``seqpar.megatron.config.SeqparTransformerConfig`` still names this class, imported on first use).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig
from pydantic import BaseModel

from seqpar.megatron.config import (AttentionModelFields, AttentionParallelFields, check_moh_heads, check_usp_degree,
                                    validate)

_MEGATRON_NAME = {"backend": "seqpar_backend"}  # Megatron has no seqpar knobs; the prefix says whose it is


def _dataclass_fields(*models: type[BaseModel]) -> list[tuple[str, Any, Any]]:
    out = []
    for m in models:
        for name, info in m.model_fields.items():
            default = (dataclasses.field(default_factory=info.default_factory) if info.default_factory is not None
                       else dataclasses.field(default=info.default))
            out.append((_MEGATRON_NAME.get(name, name), info.annotation, default))
    return out


_SeqparFields = dataclasses.make_dataclass("_SeqparFields", _dataclass_fields(AttentionModelFields,
                                                                             AttentionParallelFields),
                                           bases=(TransformerConfig,))


@dataclasses.dataclass
class SeqparTransformerConfig(_SeqparFields):
    """TransformerConfig with the knobs seqpar's attention layers read: the fields of
    ``AttentionModelFields`` and ``AttentionParallelFields`` (``backend`` as ``seqpar_backend``),
    validated by those models; ``cp_schemes`` is completed with the defaults."""

    def __post_init__(self) -> None:
        super().__post_init__()
        kw = {"prefix": "SeqparTransformerConfig.", "rename": _MEGATRON_NAME, "python": True}
        model = validate(AttentionModelFields, {n: getattr(self, n) for n in AttentionModelFields.model_fields}, **kw)
        par = validate(AttentionParallelFields, {n: getattr(self, _MEGATRON_NAME.get(n, n))
                                                 for n in AttentionParallelFields.model_fields}, **kw)
        self.cp_schemes = par.cp_schemes
        check_moh_heads(model.moh_num_shared_heads, model.moh_top_k, self.num_attention_heads)
        if self.window_size is not None:  # TE's knob: seqpar's softmax layers would silently ignore it
            raise ValueError(f"SeqparTransformerConfig.window_size={self.window_size!r} is Transformer Engine's "
                             f"sliding window, not read by seqpar's attention; set softmax_window=W instead "
                             f"(Mistral-style: keys i - W < j <= i)")
        if "usp" in self.cp_schemes.values():
            check_usp_degree(self.usp_ulysses_degree, self.context_parallel_size, self.num_attention_heads)


__all__ = ["SeqparTransformerConfig"]
