"""Mixture-of-Head attention module: a per-token head router plus the skipping MoH kernel.

Heads are experts (MoH, arXiv 2410.11842). Heads ``0 .. num_shared_heads-1`` are shared (always on);
each token picks its ``top_k`` routed heads among the rest. Gates, as in the paper (docs/moh.md) and the
official code, computed from the token's hidden state in ``router_dtype`` (fp32)::

    shared  g_s = softmax(W_s x) * h_s
    routed  g_r = renorm_topk(softmax(W_r x)) * k      (zero outside the top-k, kept ones sum to 1)
    mix     [a1, a2] = softmax(W_h x) * 2;   gates = [g_s * a1, g_r * a2]

Uniform gates therefore equal 1, as in plain multi-head attention. Which (token, head) pairs are
computed, 4 heads = 1 shared + top-2 of 3 routed (x computed, . skipped by the kernel)::

    token  h0 h1 h2 h3
      0     x  x  .  x
      1     x  .  x  x
      2     x  x  x  .

Load-balance loss over the E routed heads: ``L_b = E^2 * mean_i(P_i * f_i)``, P_i the mean routing
probability of head i, f_i the fraction of tokens that selected it. A model adds
``beta * mean over its MoH layers of L_b`` (MoH's own training averages over layers), so each
layer contributes ``beta * L_b / num_layers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from seqpar.kernels import moh_attention

_BACKENDS = ("auto", "triton", "torch")


@dataclass
class MoHRouting:
    """Router output for hidden states ``[batch, seq, hidden]``.

    gates: ``[batch, seq, heads]`` in router dtype; 0 for routed heads a token did not select.
    routed_probs: ``[batch, seq, routed]`` softmax over all routed logits (before top-k).
    topk_index: ``[batch, seq, top_k]`` selected routed heads (0-based among the routed heads).
    balance_loss: scalar ``L_b`` (not multiplied by any coefficient); 0 without routed heads.
    """

    gates: torch.Tensor
    routed_probs: torch.Tensor
    topk_index: torch.Tensor
    balance_loss: torch.Tensor


def routed_counts(topk_index: torch.Tensor, num: int, dtype: torch.dtype,
                  real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tokens that selected each routed head: ``[num]`` in ``dtype`` from ``topk_index [..., top_k]``;
    ``real`` (bool, broadcastable to ``topk_index``) counts only the tokens where it is set.

    A scatter-add in int64, exact in any ``dtype`` (``F.one_hot`` would read the indices' min and max on
    the host on CPU, and ``bincount`` sizes its output from the data on every device: both are host
    syncs)."""
    ones = torch.ones_like(topk_index, dtype=torch.int64)
    src = ones if real is None else ones * real.to(torch.int64)
    return torch.zeros(num, dtype=torch.int64, device=topk_index.device).scatter_add_(
        0, topk_index.reshape(-1), src.reshape(-1)).to(dtype)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def resolve_top_k(num_heads: int, num_shared_heads: int, top_k: Optional[int], active_ratio: Optional[float]) -> int:
    """Validate the head split and return top_k (routed heads per token).

    ``active_ratio`` is the fraction of ALL heads a token uses: ``top_k = round(ratio * heads) - shared``.
    With neither given, 75 % of the heads are active (the paper's MoH-LLaMA3 setting).
    """
    if isinstance(num_shared_heads, bool) or not isinstance(num_shared_heads, int) or not 0 <= num_shared_heads <= num_heads:
        raise ValueError(f"num_shared_heads must be an int in [0, num_heads={num_heads}], got {num_shared_heads!r}")
    routed = num_heads - num_shared_heads
    if top_k is not None and active_ratio is not None:
        raise ValueError("give either top_k or active_ratio, not both")
    if top_k is None:
        ratio = 0.75 if active_ratio is None else active_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"active_ratio must be in (0, 1], got {active_ratio!r}")
        top_k = round(ratio * num_heads) - num_shared_heads
        if top_k < (1 if routed else 0):
            raise ValueError(f"active_ratio {ratio} keeps {round(ratio * num_heads)} of {num_heads} heads, which leaves "
                             f"no routed head next to the {num_shared_heads} shared ones (top_k would be {top_k}); "
                             f"raise active_ratio or lower num_shared_heads")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative int, got {top_k!r}")
    if top_k > routed:
        raise ValueError(f"top_k ({top_k}) > routed heads ({routed} = num_heads {num_heads} - num_shared_heads "
                         f"{num_shared_heads}); lower top_k or num_shared_heads")
    if routed > 0 and top_k == 0:
        raise ValueError(f"top_k must be >= 1 when there are routed heads ({routed}); "
                         f"use num_shared_heads=num_heads for a dense layer")
    return top_k


class MoHRouter(nn.Module):
    """Per-token head router (see the module docstring for the gate formulas).

    Args:
        hidden_size: width of the hidden states it routes.
        num_heads: total heads; the first ``num_shared_heads`` are shared, the rest routed.
        num_shared_heads: heads every token uses.
        top_k: routed heads per token (1 .. num_heads - num_shared_heads).
        router_dtype: dtype of the router math and weights use (float32 or float64); the
            hidden states are upcast to it, whatever the model dtype.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_shared_heads: int, top_k: int, *,
                 router_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        _positive_int("hidden_size", hidden_size)
        _positive_int("num_heads", num_heads)
        resolve_top_k(num_heads, num_shared_heads, top_k, None)
        if router_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"router_dtype must be torch.float32 or torch.float64, got {router_dtype}")
        self.num_heads, self.num_shared_heads, self.top_k = num_heads, num_shared_heads, top_k
        self.num_routed_heads = num_heads - num_shared_heads
        self.router_dtype = router_dtype
        kw = dict(bias=False, dtype=router_dtype)
        self.w_shared = nn.Linear(hidden_size, num_shared_heads, **kw) if num_shared_heads else None
        self.w_routed = nn.Linear(hidden_size, self.num_routed_heads, **kw) if self.num_routed_heads else None
        self.w_mix = nn.Linear(hidden_size, 2, **kw) if num_shared_heads and self.num_routed_heads else None

    def _logits(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        # weights cast too, so the router stays in router_dtype after model.to(bfloat16)
        return F.linear(x, layer.weight.to(self.router_dtype))

    def forward(self, x: torch.Tensor) -> MoHRouting:
        x = x.to(self.router_dtype)
        lead = x.shape[:-1]
        parts = []
        if self.w_mix is not None:
            mix = torch.softmax(self._logits(self.w_mix, x), dim=-1) * 2
            a_shared, a_routed = mix[..., :1], mix[..., 1:]
        else:  # one group only: its gates are used as they are
            a_shared = a_routed = 1.0
        if self.w_shared is not None:
            parts.append(torch.softmax(self._logits(self.w_shared, x), dim=-1) * self.num_shared_heads * a_shared)
        if self.w_routed is not None:
            probs = torch.softmax(self._logits(self.w_routed, x), dim=-1)
            top_p, top_i = probs.topk(self.top_k, dim=-1)
            kept = top_p / top_p.sum(dim=-1, keepdim=True) * self.top_k
            parts.append(torch.zeros_like(probs).scatter(-1, top_i, kept) * a_routed)
            num = self.num_routed_heads
            p_mean = probs.reshape(-1, num).mean(dim=0)
            f_frac = routed_counts(top_i, num, probs.dtype) / (probs.numel() // num)
            balance = num ** 2 * (p_mean * f_frac).mean()
        else:
            probs = x.new_zeros(*lead, 0)
            top_i = torch.zeros(*lead, 0, dtype=torch.long, device=x.device)
            balance = x.new_zeros(())
        return MoHRouting(torch.cat(parts, dim=-1), probs, top_i, balance)


class MoHAttention(nn.Module):
    """Self-attention whose heads are routed per token; unselected (token, head) pairs are skipped.

    ``forward(x [batch, seq, hidden]) -> (out [batch, seq, hidden], aux_loss)`` with
    ``aux_loss = aux_loss_coef * L_b / num_layers`` (a scalar to add to the training loss; summed
    over a model's ``num_layers`` MoH layers it is ``aux_loss_coef`` times their average ``L_b``). The last routing is
    kept in ``self.last_routing`` for inspection. No positional encoding is applied here.

    Args:
        hidden_size: model width.
        num_heads: query heads; ``num_kv_heads`` (default num_heads) must divide it (GQA).
        head_dim: per-head width, default ``hidden_size // num_heads``.
        num_shared_heads: always-on heads (the first ones).
        top_k / active_ratio: routed heads per token, or the fraction of all heads a token uses
            (``top_k = round(active_ratio * num_heads) - num_shared_heads``); default 75 % active.
        aux_loss_coef: beta of the load-balance loss (paper: 0.01), applied to the layer average.
        num_layers: MoH layers in the model (default 1): this layer's share of the average.
        router_dtype: router precision (float32 default, float64 allowed).
        causal: causal self-attention.
        backend: kernel backend, "auto" | "triton" | "torch" (see seqpar.kernels.moh_attention).
        bias: bias in the q/k/v/o projections.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, num_shared_heads: int = 0, top_k: Optional[int] = None,
                 active_ratio: Optional[float] = None, aux_loss_coef: float = 0.01, num_layers: int = 1,
                 router_dtype: torch.dtype = torch.float32, causal: bool = True, backend: str = "auto",
                 bias: bool = False, device=None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        _positive_int("hidden_size", hidden_size)
        _positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size ({hidden_size}) is not divisible by num_heads ({num_heads}); "
                                 f"pass head_dim explicitly")
            head_dim = hidden_size // num_heads
        _positive_int("head_dim", head_dim)
        top_k = resolve_top_k(num_heads, num_shared_heads, top_k, active_ratio)
        if isinstance(aux_loss_coef, bool) or not isinstance(aux_loss_coef, (int, float)) or aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be a float >= 0, got {aux_loss_coef!r}")
        _positive_int("num_layers", num_layers)
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.num_shared_heads, self.top_k = num_shared_heads, top_k
        self.aux_loss_coef, self.causal, self.backend = float(aux_loss_coef), causal, backend
        self.num_layers = num_layers
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, **kw)
        self.router = MoHRouter(hidden_size, num_heads, num_shared_heads, top_k, router_dtype=router_dtype)
        if device is not None:
            self.router.to(device)
        self.last_routing: Optional[MoHRouting] = None

    @property
    def active_fraction(self) -> float:
        """Fraction of (token, head) pairs computed: (shared + top_k) / heads."""
        return (self.num_shared_heads + self.top_k) / self.num_heads

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x must be hidden states [batch, seq, hidden], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        routing = self.router(x)
        self.last_routing = routing
        # fp32 gates are accepted for any q dtype; the kernel multiplies in fp32
        o = moh_attention(q, k, v, routing.gates.to(torch.float32), causal=self.causal, backend=self.backend)
        out = self.o_proj(o.reshape(b, s, self.num_heads * self.head_dim))
        return out, self.aux_loss_coef / self.num_layers * routing.balance_loss
