"""S2 (sparse-sharded) block-sparse causal attention: layout, reference, Triton and torch paths."""

from seqpar.kernels.s2.api import s2_attention, s2_stats
from seqpar.kernels.s2.layout import S2Layout

__all__ = ["S2Layout", "s2_attention", "s2_stats"]
