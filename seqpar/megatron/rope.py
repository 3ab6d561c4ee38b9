"""Rotary embeddings of packed (THD) sequences without host syncs.

megatron-core 0.16 applies RoPE to packed sequences either with Transformer Engine's fused THD
kernel or, without TE (our GPU host, CPU), with ``_apply_rotary_pos_emb_thd``, which reads the
document lengths on the host (``.tolist()``) and each document's offset (``.item()``) for every
query and key of every layer: 2 + 2 x documents device-to-host syncs per layer on a GPU.

:class:`SeqparSelfAttention` (the self-attention of every seqpar softmax / S2 / MoH layer) applies the
same rotation from per-token positions computed on the device from ``cu_seqlens``, once per
``cu_seqlens`` tensor (every layer of a step passes the same one): the result is bit-identical to
megatron's unfused THD path (the same ``freqs`` rows through the same BSHD rotation), for every CP
rank of Megatron's zigzag split, and makes no host sync per layer.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention

from seqpar.kernels._common import host_ints, per_tensor_cache


def thd_positions(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int, table_len: int) -> torch.Tensor:
    """int64 ``[tokens on this rank]``: the row of the rotary table each packed token uses, as
    megatron-core's ``_apply_rotary_pos_emb_thd`` picks it (``cu_seqlens`` are the global
    boundaries; this rank holds ``len / cp_size`` tokens of each document, Megatron's zigzag halves
    under CP). A table of exactly ``cu_seqlens[-1]`` rows is indexed by global offset (megatron's
    "exact mapping" case), any other from each document's start.

    Computed on the device and cached on the tensor (one host read of ``cu_seqlens`` per tensor)."""
    key = (cp_size, cp_rank, table_len)
    cache = per_tensor_cache(cu_seqlens, "_seqpar_rope_positions")
    pos = cache.get(key)
    if pos is None:
        offs = host_ints(cu_seqlens)
        exact = table_len == offs[-1]
        cu = cu_seqlens.to(torch.int64)
        local_len = (cu[1:] - cu[:-1]) // cp_size
        local_cu = torch.zeros_like(cu)
        local_cu[1:] = torch.cumsum(local_len, 0)
        n_local = sum((b - a) // cp_size for a, b in zip(offs[:-1], offs[1:]))
        tok = torch.arange(n_local, device=cu.device)
        doc = torch.searchsorted(local_cu[1:], tok, right=True)
        j = tok - local_cu[doc]
        start = cu[doc] if exact else torch.zeros_like(j)
        if cp_size == 1:
            pos = start + j
        else:
            seg = local_len[doc] // 2
            full = cp_size * local_len[doc]
            pos = start + torch.where(j < seg, cp_rank * seg + j, full - (cp_rank + 1) * seg + (j - seg))
        cache[key] = pos
    return pos


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
            cu_q = packed_seq_params.cu_seqlens_q_padded
            cu_q = packed_seq_params.cu_seqlens_q if cu_q is None else cu_q
            cu_k = packed_seq_params.cu_seqlens_kv_padded
            cu_k = packed_seq_params.cu_seqlens_kv if cu_k is None else cu_k
            self._packed_rope = (freqs, cu_q, cu_k)
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
        (fq, fk), cu_q, cu_k = self._packed_rope
        from megatron.core.transformer.attention import _yarn_get_concentration_factor_from_config

        cp_group = self.pg_collection.cp
        size, rank = (1, 0) if cp_group is None else (cp_group.size(), cp_group.rank())
        mscale = _yarn_get_concentration_factor_from_config(self.config)
        rotated = []
        for x, freqs, cu in ((out[0], fq, cu_q), (out[1], fk, cu_k)):
            if freqs is None:
                rotated.append(x)
                continue
            pos = thd_positions(cu, size, rank, freqs.size(0))
            # x [t, 1, heads, dim] with one rotary row per token: megatron's BSHD rotation
            rotated.append(apply_rotary_pos_emb(x, freqs.index_select(0, pos), config=self.config, cu_seqlens=None,
                                                mscale=mscale, cp_group=cp_group))
        return (*rotated, *out[2:])
