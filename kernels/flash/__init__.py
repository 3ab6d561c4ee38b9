"""Dense flash attention (causal or full, GQA, varlen, offsets, differentiable lse)."""

from seqpar.kernels.flash.api import flash_attention

__all__ = ["flash_attention"]
