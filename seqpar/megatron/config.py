"""``SeqparTransformerConfig``: megatron-core's TransformerConfig plus the seqpar attention fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron.core.transformer.transformer_config import TransformerConfig

from seqpar.cp import SUPPORTED

KIND_OF_LETTER = {"A": "softmax", "S": "s2", "L": "lightning", "H": "moh"}
DEFAULT_SCHEMES = {"softmax": "allgather", "s2": "allgather", "lightning": "allgather", "moh": "allgather"}


@dataclass
class SeqparTransformerConfig(TransformerConfig):
    """TransformerConfig with the knobs seqpar's attention layers read (all validated here)."""

    cp_schemes: dict = field(default_factory=lambda: dict(DEFAULT_SCHEMES))
    """CP scheme per attention kind ("softmax"/"s2"/"lightning"/"moh" -> "allgather"/"ring"/"ulysses");
    used when context_parallel_size > 1."""
    usp_ulysses_degree: int = 1
    """Ulysses degree of the "usp" scheme (divides the CP size; ring over CP / degree groups)."""
    seqpar_backend: str = "auto"
    """Kernel backend for every seqpar op: "auto" | "triton" | "torch"."""
    s2_block_size: int = 16
    """S2 block size in tokens (DKernel's block_size)."""
    s2_local_blocks: int = 2
    """S2 local window in blocks."""
    s2_vert_stride: int = 4
    """S2 vertical stride in blocks (each kv head reads every vert_stride-th block column)."""
    moh_num_shared_heads: int = 1
    """MoH heads every token uses."""
    moh_top_k: int = 1
    """MoH routed heads per token."""
    moh_aux_loss_coef: float = 0.01
    """MoH load-balance loss coefficient (added to the loss through MoEAuxLossAutoScaler)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = set(self.cp_schemes) - set(DEFAULT_SCHEMES)
        if unknown:
            raise ValueError(f"cp_schemes has unknown kind(s) {sorted(unknown)}; kinds: {sorted(DEFAULT_SCHEMES)}")
        self.cp_schemes = {**DEFAULT_SCHEMES, **self.cp_schemes}
        for kind, scheme in self.cp_schemes.items():
            if (kind, scheme) not in SUPPORTED:
                ok = sorted(s for k, s in SUPPORTED if k == kind)
                raise ValueError(f"cp_schemes[{kind!r}]={scheme!r} is not supported; use one of {ok}")
        if "usp" in self.cp_schemes.values():
            if self.usp_ulysses_degree < 1 or self.context_parallel_size % self.usp_ulysses_degree:
                raise ValueError(f"usp_ulysses_degree={self.usp_ulysses_degree} must divide context_parallel_size="
                                 f"{self.context_parallel_size}")
        if self.seqpar_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"seqpar_backend must be 'auto', 'triton' or 'torch', got {self.seqpar_backend!r}")
        for name in ("s2_block_size", "s2_local_blocks", "s2_vert_stride", "moh_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.moh_num_shared_heads < self.num_attention_heads:
            raise ValueError(f"moh_num_shared_heads must be in [0, num_attention_heads={self.num_attention_heads})")
        if self.moh_num_shared_heads + self.moh_top_k > self.num_attention_heads:
            raise ValueError("moh_num_shared_heads + moh_top_k must be <= num_attention_heads; lower moh_top_k")
