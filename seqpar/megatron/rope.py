"""Rotary embeddings of packed (THD) sequences without host syncs.

megatron-core 0.16 applies RoPE to packed sequences either with Transformer Engine's fused THD
kernel or, without TE (our GPU host, CPU), with ``_apply_rotary_pos_emb_thd``, which reads the
document lengths on the host (``.tolist()``) and each document's offset (``.item()``) for every
query and key of every layer: 2 + 2 x documents device-to-host syncs per layer on a GPU.

:class:`SeqparSelfAttention` (the self-attention of every seqpar softmax / S2 / MoH layer) applies the
same rotation from per-token positions taken from the micro-batch's CP partition (its token index:
``seqpar.megatron.packed.rope_positions``, built on the host once per partition, i.e. once per
micro-batch, and cached on the device; every layer of the step reuses it): the result is
bit-identical to megatron's unfused THD path (the same ``freqs`` rows through the same BSHD rotation)
for Megatron's zigzag split, is right for any balancer's placement (``parallel.cp_balance: cost``),
and makes no host sync per layer.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention

from seqpar.megatron.packed import partition_of, rope_positions


class SeqparSelfAttention(SelfAttention):
    """megatron-core's ``SelfAttention`` whose RoPE on packed (THD) sequences makes no host sync
    (module docstring); every other path is megatron's own."""

    _packed_rope: Optional[tuple] = None

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *,
                inference_params=None) -> Any:
        no_rope = self.config.no_rope_freq[self.layer_number - 1] if self.config.no_rope_freq else False
        if (rotary_pos_emb is not None and not no_rope and packed_seq_params is not None
                and packed_seq_params.qkv_format == "thd" and inference_context is None and inference_params is None):
            freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            self._packed_rope = (freqs, packed_seq_params)
            rotary_pos_emb = None  # applied in get_query_key_value_tensors instead
        try:
            return super().forward(hidden_states, attention_mask, key_value_states=key_value_states,
                                   inference_context=inference_context, rotary_pos_emb=rotary_pos_emb,
                                   rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                                   rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
                                   packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
                                   inference_params=inference_params)
        finally:
            self._packed_rope = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate: bool = False,
                                    split_qkv: bool = True):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                  split_qkv=split_qkv)
        if self._packed_rope is None:
            return out
        (fq, fk), packed_seq_params = self._packed_rope
        from megatron.core.transformer.attention import _yarn_get_concentration_factor_from_config

        cp_group = self.pg_collection.cp
        rank = 0 if cp_group is None else cp_group.rank()
        mscale = _yarn_get_concentration_factor_from_config(self.config)
        # queries and keys are the same tokens (self-attention): one partition, one position table
        part = partition_of(packed_seq_params, out[0].shape[0], cp_group)
        rotated = []
        for x, freqs in ((out[0], fq), (out[1], fk)):
            if freqs is None:
                rotated.append(x)
                continue
            pos = rope_positions(part, rank, freqs.size(0), x.device)
            # x [t, 1, heads, dim] with one rotary row per token: megatron's BSHD rotation
            rotated.append(apply_rotary_pos_emb(x, freqs.index_select(0, pos), config=self.config, cu_seqlens=None,
                                                mscale=mscale, cp_group=cp_group))
        return (*rotated, *out[2:])
