"""Weight and config mapping between seqpar training checkpoints (megatron-core GPTModel keys) and
Hugging Face (``SeqparForCausalLM`` / ``LlamaForCausalLM`` names). Pure functions on full tensors.

Megatron keys (per layer ``decoder.layers.<i>.``) -> HF keys (``model.layers.<i>.``):

==============================================  =================================================
``self_attention.linear_qkv.layer_norm_weight``  ``input_layernorm.weight``
``self_attention.linear_qkv.weight``             ``self_attn.{q,k,v}_proj.weight`` (rows interleaved
                                                 per kv group: ``[q_g (group*d) | k_g (d) | v_g (d)]``)
``self_attention.linear_proj.weight``            ``self_attn.o_proj.weight``
``self_attention.linear_qkvg.weight.{q,k,v,gate}`` ``self_attn.{q,k,v,g}_proj.weight`` (Lightning)
``self_attention.norm_weight``                   ``self_attn.norm_weight`` (Lightning)
``self_attention.router.w_*.weight``             ``self_attn.router.w_*.weight`` (MoH)
``mlp.linear_fc1.layer_norm_weight``             ``post_attention_layernorm.weight``
``mlp.linear_fc1.weight``                        ``mlp.gate_proj`` (first half) / ``mlp.up_proj``
``mlp.linear_fc2.weight``                        ``mlp.down_proj.weight``
==============================================  =================================================

plus ``embedding.word_embeddings.weight`` -> ``model.embed_tokens.weight``,
``decoder.final_layernorm.weight`` -> ``model.norm.weight``, ``output_layer.weight`` -> ``lm_head.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from seqpar.export.reader import ExportError

ROPE_THETA = 10000.0  # megatron-core GPTModel's rotary_base default (seqpar.models.build_gpt keeps it)


@dataclass(frozen=True)
class ModelSpec:
    """Everything the HF side needs to rebuild the training model's function."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    pattern: str  # one letter per layer
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    s2_block_size: int = 16
    s2_local_blocks: int = 2
    s2_vert_stride: int = 4
    moh_num_shared_heads: int = 1
    moh_top_k: int = 1
    softmax_window: Optional[int] = None  # Mistral's sliding window of the softmax (A) layers (any pattern)

    @property
    def s2_head_step(self) -> int:
        """Stride rotation between consecutive kv heads of the training model's S2 layout."""
        from seqpar.megatron.config import s2_layout

        layout = s2_layout(self)
        if hasattr(layout, "with_heads"):  # layouts resolved against the model's query heads
            return layout.with_heads(self.num_heads).head_step(self.num_heads)
        return layout.head_step(self.num_kv_heads)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def pure_softmax(self) -> bool:
        return set(self.pattern) == {"A"}


def spec_from_recipe(config: dict, vocab_size: int) -> ModelSpec:
    """``ModelSpec`` from a checkpoint's resolved recipe (its ``model`` and ``data`` sections)."""
    from dataclasses import replace

    from seqpar.megatron.config import layer_pattern
    from seqpar.models import preset

    model = config.get("model")
    if not isinstance(model, dict) or "preset" not in model:
        raise ExportError("the checkpoint's recipe has no model.preset; export needs the model section the run "
                          "was trained with")
    try:
        p = preset(model["preset"])
    except ValueError as e:
        raise ExportError(f"recipe model.preset={model['preset']!r}: {e}") from e
    shape = {"num_layers": "num_layers", "hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
             "num_kv_heads": "num_query_groups", "ffn_hidden_size": "ffn_hidden_size", "pattern": "pattern"}
    p = replace(p, **{dst: model[src] for src, dst in shape.items() if model.get(src) is not None})
    try:
        pattern = layer_pattern(p.pattern, p.num_layers)
    except ValueError as e:
        raise ExportError(f"recipe model.pattern={p.pattern!r}: {e}") from e
    data = config.get("data", {})
    window = model.get("softmax_window")
    return ModelSpec(
        num_layers=p.num_layers, hidden_size=p.hidden_size, num_heads=p.num_attention_heads,
        num_kv_heads=p.num_query_groups, ffn_hidden_size=p.ffn_hidden_size, pattern=pattern, vocab_size=vocab_size,
        max_position_embeddings=int(data.get("seq_len", 2048)),
        s2_block_size=int(model.get("s2_block_size", 16)), s2_local_blocks=int(model.get("s2_local_blocks", 2)),
        s2_vert_stride=int(model.get("s2_vert_stride", 4)),
        moh_num_shared_heads=int(model.get("moh_num_shared_heads", 1)), moh_top_k=int(model.get("moh_top_k", 1)),
        softmax_window=None if window is None else int(window))


def lightning_slopes_per_layer(spec: ModelSpec) -> list[Optional[list[float]]]:
    """Slopes of each Lightning layer exactly as ``LightningSelfAttention`` computes them."""
    from seqpar.kernels import lightning_slopes

    return [lightning_slopes(spec.num_heads, i, max(2, spec.num_layers)).tolist() if c == "L" else None
            for i, c in enumerate(spec.pattern)]


def hf_config(spec: ModelSpec, *, bos_token_id: Optional[int], eos_token_id: Optional[int],
              pad_token_id: Optional[int], dtype: torch.dtype = torch.float32):
    """``LlamaConfig`` for pure-softmax models (``MistralConfig`` with its ``sliding_window`` when the
    softmax layers have one: the same weights, keys ``i - W < j <= i``), else ``SeqparConfig`` (with
    ``auto_map``; its ``softmax_window`` windows the A layers the same way)."""
    common: dict[str, Any] = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if spec.pure_softmax and spec.softmax_window is not None:
        from transformers import MistralConfig

        cfg = MistralConfig(rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, hidden_act="silu",
                            sliding_window=spec.softmax_window, **common)
        cfg.architectures = ["MistralForCausalLM"]
    elif spec.pure_softmax:
        from transformers import LlamaConfig

        cfg = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                          attention_bias=False, mlp_bias=False, hidden_act="silu", **common)
        cfg.architectures = ["LlamaForCausalLM"]
    else:
        from seqpar.models.hf.configuration_seqpar import SeqparConfig

        cfg = SeqparConfig(layer_pattern=spec.pattern, rope_theta=ROPE_THETA, s2_block_size=spec.s2_block_size,
                           s2_local_blocks=spec.s2_local_blocks, s2_vert_stride=spec.s2_vert_stride,
                           s2_head_step=spec.s2_head_step, moh_num_shared_heads=spec.moh_num_shared_heads,
                           moh_top_k=spec.moh_top_k,
                           lightning_slopes=lightning_slopes_per_layer(spec), lightning_norm_eps=spec.rms_norm_eps,
                           softmax_window=spec.softmax_window, **common)
        cfg.architectures = ["SeqparForCausalLM"]
        cfg.auto_map = {"AutoConfig": "configuration_seqpar.SeqparConfig",
                        "AutoModelForCausalLM": "modeling_seqpar.SeqparForCausalLM"}
    cfg.dtype = dtype
    return cfg


def _take(t: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in t:
        raise ExportError(f"the checkpoint has no tensor {key!r}; it was not written by this model layout "
                          f"(recipe and checkpoint disagree)")
    return t[key]


def _split_qkv(w: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = spec.num_kv_heads, spec.head_dim
    per = spec.num_heads // g
    w = w.view(g, (per + 2) * d, -1)
    q, k, v = torch.split(w, [per * d, d, d], dim=1)
    return q.reshape(g * per * d, -1), k.reshape(g * d, -1), v.reshape(g * d, -1)


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    g, d = spec.num_kv_heads, spec.head_dim
    per = spec.num_heads // g
    hid = q.shape[-1]
    return torch.cat([q.view(g, per * d, hid), k.view(g, d, hid), v.view(g, d, hid)], dim=1).reshape(-1, hid)


def megatron_to_hf(t: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """HF state dict from the full megatron tensors of a checkpoint (see the module table)."""
    out = {"model.embed_tokens.weight": _take(t, "embedding.word_embeddings.weight"),
           "model.norm.weight": _take(t, "decoder.final_layernorm.weight"),
           "lm_head.weight": _take(t, "output_layer.weight")}
    if out["model.embed_tokens.weight"].shape[0] != spec.vocab_size:
        raise ExportError(f"the checkpoint's embedding has {out['model.embed_tokens.weight'].shape[0]} rows but the "
                          f"tokenizer / recipe vocabulary has {spec.vocab_size} entries; vocabulary mismatch")
    for i, kind in enumerate(spec.pattern):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = _take(t, m + "self_attention.linear_qkv.layer_norm_weight")
        out[h + "post_attention_layernorm.weight"] = _take(t, m + "mlp.linear_fc1.layer_norm_weight")
        out[h + "self_attn.o_proj.weight"] = _take(t, m + "self_attention.linear_proj.weight")
        if kind == "L":
            for src, dst in (("q", "q"), ("k", "k"), ("v", "v"), ("gate", "g")):
                out[h + f"self_attn.{dst}_proj.weight"] = _take(t, m + f"self_attention.linear_qkvg.weight.{src}")
            out[h + "self_attn.norm_weight"] = _take(t, m + "self_attention.norm_weight")
        else:
            q, k, v = _split_qkv(_take(t, m + "self_attention.linear_qkv.weight"), spec)
            out[h + "self_attn.q_proj.weight"], out[h + "self_attn.k_proj.weight"] = q, k
            out[h + "self_attn.v_proj.weight"] = v
        if kind == "H":
            for name in ("w_shared", "w_routed", "w_mix"):
                key = m + f"self_attention.router.{name}.weight"
                if key in t:
                    out[h + f"self_attn.router.{name}.weight"] = t[key]
        fc1 = _take(t, m + "mlp.linear_fc1.weight")
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = torch.chunk(fc1, 2, dim=0)
        out[h + "mlp.down_proj.weight"] = _take(t, m + "mlp.linear_fc2.weight")
    for k in t:
        if not _known_megatron_key(k, spec):
            raise ExportError(f"checkpoint tensor {k!r} has no Hugging Face counterpart; this exporter does not "
                              f"know that module (was the model built with another seqpar version?)")
    return {k: v.contiguous() for k, v in out.items()}


def _known_megatron_key(key: str, spec: ModelSpec) -> bool:
    if key in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"):
        return True
    parts = key.split(".")
    if parts[:2] != ["decoder", "layers"] or not parts[2].isdigit() or int(parts[2]) >= spec.num_layers:
        return False
    rest = ".".join(parts[3:])
    kind = spec.pattern[int(parts[2])]
    ok = {"self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight",
          "self_attention.linear_proj.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"}
    if kind == "L":
        ok |= {f"self_attention.linear_qkvg.weight.{n}" for n in ("q", "k", "v", "gate")}
        ok.add("self_attention.norm_weight")
    else:
        ok.add("self_attention.linear_qkv.weight")
    if kind == "H":
        ok |= {f"self_attention.router.{n}.weight" for n in ("w_shared", "w_routed", "w_mix")}
    return rest in ok


def hf_to_megatron(hf: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Inverse of :func:`megatron_to_hf` (megatron keys, full tensors)."""

    def take(k: str) -> torch.Tensor:
        if k not in hf:
            raise ExportError(f"the Hugging Face weights have no {k!r}; not a Llama-architecture checkpoint of "
                              f"this shape")
        return hf[k]

    out = {"embedding.word_embeddings.weight": take("model.embed_tokens.weight"),
           "decoder.final_layernorm.weight": take("model.norm.weight"),
           "output_layer.weight": hf.get("lm_head.weight", hf.get("model.embed_tokens.weight"))}
    for i, kind in enumerate(spec.pattern):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[m + "self_attention.linear_qkv.layer_norm_weight"] = take(h + "input_layernorm.weight")
        out[m + "mlp.linear_fc1.layer_norm_weight"] = take(h + "post_attention_layernorm.weight")
        out[m + "self_attention.linear_proj.weight"] = take(h + "self_attn.o_proj.weight")
        if kind == "L":
            for dst, src in (("q", "q"), ("k", "k"), ("v", "v"), ("gate", "g")):
                out[m + f"self_attention.linear_qkvg.weight.{dst}"] = take(h + f"self_attn.{src}_proj.weight")
            out[m + "self_attention.norm_weight"] = take(h + "self_attn.norm_weight")
        else:
            out[m + "self_attention.linear_qkv.weight"] = _join_qkv(
                take(h + "self_attn.q_proj.weight"), take(h + "self_attn.k_proj.weight"),
                take(h + "self_attn.v_proj.weight"), spec)
        if kind == "H":
            for name in ("w_shared", "w_routed", "w_mix"):
                if h + f"self_attn.router.{name}.weight" in hf:
                    out[m + f"self_attention.router.{name}.weight"] = hf[h + f"self_attn.router.{name}.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")])
        out[m + "mlp.linear_fc2.weight"] = take(h + "mlp.down_proj.weight")
    return {k: v.contiguous() for k, v in out.items()}


__all__ = ["ModelSpec", "ROPE_THETA", "hf_config", "hf_to_megatron", "lightning_slopes_per_layer",
           "megatron_to_hf", "spec_from_recipe"]
