"""Per-head decay rates for Lightning attention (TransNormerLLM / MiniMax-01)."""

from __future__ import annotations

import math
from typing import Optional

import torch


def _alibi_slopes(n: int) -> list[float]:
    # ALiBi (Press et al.): geometric 2^(-8(i+1)/n) for a power of two; otherwise the slopes of the
    # nearest lower power of two followed by every other slope of the next power of two.
    if n & (n - 1) == 0:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    p = 2 ** math.floor(math.log2(n))
    return _alibi_slopes(p) + _alibi_slopes(2 * p)[0::2][: n - p]


def lightning_slopes(num_heads: int, layer_idx: Optional[int] = None,
                     num_layers: Optional[int] = None) -> torch.Tensor:
    """Decay slopes ``[num_heads]`` fp32 for :func:`lightning_attention` (``λ_h = exp(-slope[h])``).

    ALiBi geometric slopes ``2^(-8(h+1)/H)`` (ALiBi's interleaving rule when ``H`` is not a power
    of two). With ``layer_idx`` and ``num_layers`` both given they are scaled as in MiniMax-01 by
    ``1 - layer_idx / (num_layers - 1) + 1e-5``: strong decay in the first layer, almost none in
    the last. A one-layer model (``num_layers=1``, ``layer_idx=0``) takes the formula's limit:
    layer 0 has ``layer_idx / (num_layers - 1) = 0`` at every depth, so its factor is
    ``1 + 1e-5`` (the first layer's decay), not the 0/0 of the literal formula.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if (layer_idx is None) != (num_layers is None):
        raise ValueError("layer_idx and num_layers must be given together (or both left None)")
    slopes = torch.tensor(_alibi_slopes(num_heads), dtype=torch.float32)
    if layer_idx is None:
        return slopes
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int for the per-layer scaling, got {num_layers!r}")
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be an int in [0, num_layers={num_layers}), got {layer_idx!r}")
    depth = 0.0 if num_layers == 1 else layer_idx / (num_layers - 1)  # one layer: the limit, see above
    return slopes * (1.0 - depth + 1e-5)
