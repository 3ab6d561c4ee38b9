"""Lightning Attention-2: causal linear attention with per-head decay, states and varlen."""

from .api import lightning_attention
from .decode import lightning_decode_step
from .slopes import lightning_slopes

__all__ = ["lightning_attention", "lightning_decode_step", "lightning_slopes"]
