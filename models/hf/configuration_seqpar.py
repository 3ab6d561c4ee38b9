"""Configuration of a seqpar model exported to Hugging Face (``SeqparConfig``, model_type "seqpar").

Written by ``python -m seqpar.export.hf`` from a training checkpoint; loaded with
``AutoConfig.from_pretrained(folder, trust_remote_code=True)``. One letter per layer in
``layer_pattern``: A softmax, S S2 (sparse-sharded block attention), L Lightning (linear attention
with per-head decay), H MoH (mixture-of-head softmax attention).
"""

from __future__ import annotations

from transformers import PreTrainedConfig

KIND_OF_LETTER = {"A": "softmax", "S": "s2", "L": "lightning", "H": "moh"}


class SeqparConfig(PreTrainedConfig):
    r"""Shape and attention kinds of a seqpar decoder (Llama-style blocks: RMSNorm, SwiGLU MLP, RoPE
    on the softmax / S2 / MoH layers, no biases, untied embeddings by default).

    Fields beyond the usual Llama ones:

    - ``layer_pattern``: one letter per layer over ``A S L H`` (length ``num_hidden_layers``).
    - ``s2_block_size`` / ``s2_local_blocks`` / ``s2_vert_stride`` / ``s2_head_step``: the S2 layout.
      Block (i, j) is read by kv head g iff ``j <= i`` and (``i - j < local_blocks`` or
      ``(j + g * head_step) % vert_stride == 0``), blocks of ``s2_block_size`` absolute positions;
      then token-level causality. The exporter writes the training layout's resolved step.
    - ``moh_num_shared_heads`` / ``moh_top_k``: MoH heads always on / routed heads per token.
    - ``lightning_slopes``: per layer, the decay slope of each query head (``None`` for other kinds);
      the decay is ``exp(-slope)`` per token.
    - ``lightning_norm_eps``: epsilon of the Lightning output's per-head RMSNorm.
    - ``softmax_window``: Mistral-style sliding window of the softmax (A) layers, or ``None`` (full
      causal): query ``i`` sees keys ``i - softmax_window < j <= i`` (token indices; S2, MoH and
      Lightning layers are not windowed). Their generation cache keeps only the last
      ``softmax_window - 1`` tokens. (Named apart from transformers' ``sliding_window``, which would
      make ``DynamicCache(config=)`` window every layer.)
    - ``kernel_backend``: "auto" (seqpar's Triton kernels when importable and on CUDA, else plain
      torch), "torch" (always plain torch), "seqpar" (always ``seqpar.kernels``, any device).
    """

    model_type = "seqpar"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    layer_pattern: str = "A"
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    s2_block_size: int = 16
    s2_local_blocks: int = 2
    s2_vert_stride: int = 4
    s2_head_step: int = 1
    moh_num_shared_heads: int = 1
    moh_top_k: int = 1
    lightning_slopes: list | None = None
    lightning_norm_eps: float = 1e-5
    kernel_backend: str = "auto"
    softmax_window: int | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if len(self.layer_pattern) == 1:
            self.layer_pattern = self.layer_pattern * self.num_hidden_layers
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """ValueError naming the field for an inconsistent configuration."""
        if len(self.layer_pattern) != self.num_hidden_layers:
            raise ValueError(f"layer_pattern {self.layer_pattern!r} has {len(self.layer_pattern)} letters; "
                             f"num_hidden_layers is {self.num_hidden_layers}")
        bad = sorted(set(self.layer_pattern) - set(KIND_OF_LETTER))
        if bad:
            raise ValueError(f"layer_pattern has unknown letter(s) {bad}; use A, S, L, H")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                             f"({self.num_attention_heads})")
        if "L" in self.layer_pattern:
            slopes = self.lightning_slopes
            if slopes is None or len(slopes) != self.num_hidden_layers:
                raise ValueError("lightning_slopes must list one entry per layer (a list of num_attention_heads "
                                 "slopes for each L layer)")
            for i, c in enumerate(self.layer_pattern):
                if c == "L" and (slopes[i] is None or len(slopes[i]) != self.num_attention_heads):
                    raise ValueError(f"lightning_slopes[{i}] must have num_attention_heads="
                                     f"{self.num_attention_heads} values for Lightning layer {i}")
        if "H" in self.layer_pattern and not (
                0 <= self.moh_num_shared_heads < self.num_attention_heads
                and 1 <= self.moh_top_k <= self.num_attention_heads - self.moh_num_shared_heads):
            raise ValueError("moh_num_shared_heads must be in [0, heads) and moh_top_k in [1, heads - shared]")
        w = self.softmax_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"softmax_window must be an int >= 1 (keys i - softmax_window < j <= i) or None, "
                             f"got {w!r}")
        if self.kernel_backend not in ("auto", "torch", "seqpar"):
            raise ValueError(f"kernel_backend must be 'auto', 'torch' or 'seqpar', got {self.kernel_backend!r}")


__all__ = ["SeqparConfig"]
