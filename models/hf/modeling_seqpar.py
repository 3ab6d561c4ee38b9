"""``SeqparForCausalLM``: a seqpar decoder (softmax, S2, Lightning and MoH layers) for Hugging Face.

Plain torch; when ``seqpar.kernels`` is importable and the tensors are on CUDA (or
``config.kernel_backend == "seqpar"``) full-sequence passes without padding call its kernels.
Same weights and the same function as the training model (megatron-core GPTModel with seqpar layer
specs): per layer ``x += attn(rmsnorm(x)); x += mlp(rmsnorm(x))``, SwiGLU MLP, final RMSNorm,
untied LM head.

Attention kinds (``config.layer_pattern``, one letter per layer):

- ``A`` softmax: causal GQA attention with RoPE; with ``config.softmax_window`` W Mistral's sliding
  window (query ``i`` sees keys ``i - W < j <= i``) in every path: the kernel, plain torch, and
  generation with a cache (a ``DynamicSlidingWindowLayer`` keeping the last ``W - 1`` tokens).
- ``S`` S2: softmax over the blocks of the S2 layout only (see ``SeqparConfig``); RoPE.
- ``L`` Lightning: ``q, k, v = silu(x W)``; ``S_t = exp(-slope) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``;
  ``o = rmsnorm_head(o) * w * sigmoid(x W_g)``; no RoPE, no softmax.
- ``H`` MoH: softmax attention whose heads are gated per token by a router on the layer input
  (shared heads always on, top-k routed heads).

Caches (transformers ``Cache`` API; pass any ``DynamicCache``, or let ``generate`` make one): softmax
and MoH layers keep K/V (``DynamicLayer``; a windowed softmax layer only its last ``W - 1`` tokens,
``DynamicSlidingWindowLayer``); a Lightning layer keeps only its recurrent state
``[batch, heads, dk, dv]`` (``LightningStateLayer``: memory constant in the generated length); an S2
layer keeps, per kv head, only the tokens whose block that head can still read — the local window
plus the head's stride columns (``S2BlockCacheLayer``). These layers take the place of the
cache's empty layer on first use.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_seqpar import SeqparConfig

try:  # optional: seqpar's Triton kernels (and their torch fallbacks)
    from seqpar import kernels as _seqpar_kernels
except Exception:  # noqa: BLE001 - any import problem means: use plain torch
    _seqpar_kernels = None


def _use_kernels(config: SeqparConfig, x: torch.Tensor) -> bool:
    if config.kernel_backend == "torch" or _seqpar_kernels is None:
        return False
    return config.kernel_backend == "seqpar" or x.is_cuda


# --------------------------------------------------------------------------------------------- caches


class LightningStateLayer(CacheLayerMixin):
    """Cache of a Lightning layer: the fp32 recurrent state ``[batch, heads, dk, dv]`` and the number
    of tokens seen. Nothing grows with the sequence."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: Optional[torch.Tensor] = None
        self.seen = 0

    def lazy_initialization(self, key_states, value_states) -> None:  # noqa: D102 - state set by set_state
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a Lightning layer's cache holds a recurrent state; use get_state / set_state")

    def get_state(self) -> Optional[torch.Tensor]:
        return self.state

    def set_state(self, state: torch.Tensor, new_tokens: int) -> None:
        self.state = state
        self.seen += new_tokens
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.numel() * self.state.element_size()

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def offload(self):
        if self.state is not None:
            self.state = self.state.to("cpu", non_blocking=True)

    def prefetch(self):
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(0, beam_idx.to(self.state.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state[indices, ...]

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a Lightning layer's recurrent state cannot be cropped")


class S2BlockCacheLayer(CacheLayerMixin):
    """Cache of an S2 layer: per kv head ``g``, keys / values ``[batch, n_g, dim]`` and absolute
    positions ``[batch, n_g]`` (-1 = padding) of the tokens that head can still read.

    A query in block ``i`` reads, for head ``g``, blocks ``j > i - local_blocks`` and the stride
    columns ``(j + g * step) % vert_stride == 0``. Queries only move forward, so when new tokens
    arrive (earliest block ``i``) every token of head ``g`` in a block ``j <= i - local_blocks`` that
    is not a stride column of ``g`` is dropped: it is never read again. A head keeps about
    ``seq / vert_stride + local_blocks * block_size`` tokens instead of ``seq``.
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.pos: list[torch.Tensor] = []
        self.seen = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("an S2 layer's cache is per kv head; use S2BlockCacheLayer.append")

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, keep_fn) -> tuple[list, list, list]:
        """Add ``k``/``v`` ``[batch, new, kv_heads, dim]`` at positions ``pos`` ``[batch, new]``
        (-1 = padding), first dropping what no query from ``pos`` on can read (``keep_fn(g,
        kv_block, min_q_block) -> bool mask``). Returns the per-head key, value and position lists."""
        valid = pos >= 0
        if self.k and bool(valid.any()):
            min_qb = int(pos[valid].min()) // keep_fn.block_size
            for g in range(len(self.k)):
                p = self.pos[g]
                keep = ((p >= 0) & keep_fn(g, torch.div(p.clamp(min=0), keep_fn.block_size, rounding_mode="floor"),
                                           min_qb)).any(0)
                if not bool(keep.all()):
                    self.k[g], self.v[g], self.pos[g] = self.k[g][:, keep], self.v[g][:, keep], p[:, keep]
        for g in range(k.shape[2]):
            if len(self.k) <= g:
                self.k.append(k[:, :, g])
                self.v.append(v[:, :, g])
                self.pos.append(pos)
            else:
                self.k[g] = torch.cat([self.k[g], k[:, :, g]], dim=1)
                self.v[g] = torch.cat([self.v[g], v[:, :, g]], dim=1)
                self.pos[g] = torch.cat([self.pos[g], pos], dim=1)
        self.seen += k.shape[1]
        self.is_initialized = True
        return self.k, self.v, self.pos

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes of cached keys and values (positions not counted)."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def reset(self) -> None:
        self.k, self.v, self.pos, self.seen = [], [], [], 0

    def offload(self):
        pass

    def prefetch(self):
        pass

    def _apply(self, fn) -> None:
        self.k = [fn(t) for t in self.k]
        self.v = [fn(t) for t in self.v]
        self.pos = [fn(t) for t in self.pos]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("an S2 block cache drops tokens as it goes and cannot be cropped")


def _layer_cache(cache: Cache, idx: int, cls: type, **kwargs) -> CacheLayerMixin:
    """Layer ``idx`` of ``cache`` as a ``cls(**kwargs)`` (an empty stock layer is replaced on first use)."""
    layers = cache.layers
    while len(layers) <= idx:  # DynamicCache() without a config grows its layer list lazily
        layers.append(DynamicLayer())
    layer = layers[idx]
    if not isinstance(layer, cls):
        if layer.get_seq_length() != 0:
            raise ValueError(f"cache layer {idx} is a {type(layer).__name__} with content; layer {idx} needs a "
                             f"{cls.__name__}: pass a fresh DynamicCache (or none)")
        layer = layers[idx] = cls(**kwargs)
    return layer


def cache_nbytes(cache: Cache) -> int:
    """Bytes of every tensor the cache holds for the model (K/V, S2 blocks, Lightning states)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def _past_length(cache: Optional[Cache]) -> int:
    if cache is None:
        return 0
    return max((layer.get_seq_length() for layer in cache.layers if isinstance(layer, CacheLayerMixin)), default=0)


# -------------------------------------------------------------------------------------------- modules


class SeqparRMSNorm(nn.Module):
    """RMSNorm over the last dim (computed in fp32): ``x * rsqrt(mean(x^2) + eps) * weight``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rotary(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Non-interleaved RoPE (Llama / megatron-core) of ``x`` ``[batch, seq, heads, dim]`` at
    ``position_ids`` ``[batch, seq]``; angles in fp32."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [b, s, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    cos, sin = emb.cos(), emb.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rot * sin).to(x.dtype)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                     scale: float, chunk: int = 512) -> torch.Tensor:
    """Softmax attention in fp32. q ``[b, sq, h, d]``, k/v ``[b, sk, hkv, d]`` (GQA, not expanded),
    ``visible`` bool broadcastable to ``[b, hkv, 1, sq, sk]``. A query that sees no key gets 0.
    Queries go ``chunk`` rows at a time: extra memory O(chunk * sk), not O(sq * sk)."""
    b, sq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.float().view(b, sq, hkv, h // hkv, d).permute(0, 2, 3, 1, 4)  # [b, hkv, group, sq, d]
    kf = k.float().permute(0, 2, 1, 3)[:, :, None]  # [b, hkv, 1, sk, d]
    vf = v.float().permute(0, 2, 1, 3)[:, :, None]
    outs = []
    for r in range(0, sq, chunk):
        vis = visible[..., r:r + chunk, :] if visible.shape[-2] != 1 else visible
        s = (qg[..., r:r + chunk, :] @ kf.transpose(-1, -2)) * scale
        s = s.masked_fill(~vis, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        den = e.sum(-1, keepdim=True)
        outs.append((e / torch.where(den > 0, den, torch.ones_like(den))) @ vf)  # [b, hkv, group, c, d]
    o = torch.cat(outs, dim=-2) if outs else qg.new_zeros(b, hkv, h // hkv, 0, d)
    return o.permute(0, 3, 1, 2, 4).reshape(b, sq, h, d).to(q.dtype)


class S2Visibility:
    """The S2 layout of ``SeqparConfig`` (DKernel's strided pattern, per kv head)."""

    def __init__(self, config: SeqparConfig) -> None:
        self.block_size = config.s2_block_size
        self.local = config.s2_local_blocks
        self.stride = config.s2_vert_stride
        self.step = config.s2_head_step

    def strided(self, g: int, kb: torch.Tensor) -> torch.Tensor:
        return (kb + g * self.step) % self.stride == 0

    def blocks(self, g: int, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        """bool: kv head ``g`` reads key block ``kb`` from query block ``qb`` (broadcasting)."""
        return (kb <= qb) & (((qb - kb) < self.local) | self.strided(g, kb))

    def __call__(self, g: int, kb: torch.Tensor, min_qb: int) -> torch.Tensor:
        """Keep rule of the block cache: ``kb`` is still read by a query in a block >= ``min_qb``."""
        return (kb > min_qb - self.local) | self.strided(g, kb)


def _seqpar_layout(config: SeqparConfig):
    """``seqpar.kernels.S2Layout`` with the exported layout's explicit head step."""
    kw = dict(block_size=config.s2_block_size, local_blocks=config.s2_local_blocks, vert_stride=config.s2_vert_stride)
    layout = _seqpar_kernels.S2Layout(**kw)
    if "head_sliding_step" in getattr(_seqpar_kernels.S2Layout, "__dataclass_fields__", {}):
        return _seqpar_kernels.S2Layout(head_sliding_step=config.s2_head_step, **kw)
    if layout.head_step(config.num_key_value_heads) != config.s2_head_step:
        raise ValueError(f"this seqpar.kernels S2Layout cannot express s2_head_step={config.s2_head_step}; "
                         f"use kernel_backend='torch'")
    return layout


class SeqparAttention(nn.Module):
    """Softmax (A), S2 (S) and MoH (H) layers: q/k/v/o projections, RoPE, GQA."""

    def __init__(self, config: SeqparConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.kind = config.layer_pattern[layer_idx]
        h, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.heads, self.kv_heads, self.head_dim = h, hkv, d
        self.scale = d ** -0.5
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)
        if self.kind == "H":
            self.router = SeqparMoHRouter(config)
        if self.kind == "S":
            self.s2 = S2Visibility(config)
        self.window = config.softmax_window if self.kind == "A" else None

    def _kv_update(self, cache: Cache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` ``[b, s, hkv, d]`` to this layer's cache; returns the keys and values to
        attend to (``[b, hkv, n, d]``). Under a window the layer is a ``DynamicSlidingWindowLayer``
        that keeps the last ``W - 1`` tokens (transformers' slice needs ``W >= 2``: a window of 1
        keeps one token more, masked)."""
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if self.window is None:
            return cache.update(k, v, self.layer_idx)
        return _layer_cache(cache, self.layer_idx, DynamicSlidingWindowLayer,
                            sliding_window=max(self.window, 2)).update(k, v)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor,
                cache: Optional[Cache], past: int) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim)
        q = rotary(q, position_ids, self.config.rope_theta)
        k = rotary(k, position_ids, self.config.rope_theta)
        gates = self.router(x) if self.kind == "H" else None
        new_valid = valid[:, -s:]
        if past == 0 and bool(new_valid.all()) and _use_kernels(self.config, x):
            o = self._kernel(q, k, v, gates)  # the MoH kernel applies the gates (and skips gate-0 heads)
            if cache is not None:
                self._store(cache, k, v, position_ids, new_valid)
        else:
            if self.kind == "S":
                o = self._s2(cache, q, k, v, position_ids, new_valid)
            else:
                if cache is not None:  # keys: the cached ones (a window's last W - 1 at most) + the new
                    kc, vc = self._kv_update(cache, k, v)
                    k, v = kc.transpose(1, 2), vc.transpose(1, 2)
                sk = k.shape[1]
                qi = torch.arange(sk - s, sk, device=x.device)
                kj = torch.arange(sk, device=x.device)
                causal = kj[None, :] <= qi[:, None]
                if self.window is not None:
                    causal = causal & (kj[None, :] > qi[:, None] - self.window)
                vis = causal[None] & valid[:, None, -sk:]  # [b, sq, sk]
                o = masked_attention(q, k, v, vis[:, None, None], self.scale)
            if gates is not None:
                o = (o.float() * gates[..., None]).to(q.dtype)
        return self.o_proj(o.reshape(b, s, -1))

    def _kernel(self, q, k, v, gates):
        kn = _seqpar_kernels
        if self.kind == "A":
            return kn.flash_attention(q, k, v, causal=True, sm_scale=self.scale, window=self.window)
        if self.kind == "S":
            return kn.s2_attention(q, k, v, _seqpar_layout(self.config), sm_scale=self.scale)
        return kn.moh_attention(q, k, v, gates.float(), causal=True, sm_scale=self.scale)

    def _store(self, cache, k, v, position_ids, new_valid):
        if self.kind == "S":
            pos = torch.where(new_valid, position_ids, torch.full_like(position_ids, -1))
            _layer_cache(cache, self.layer_idx, S2BlockCacheLayer).append(k, v, pos, self.s2)
        else:
            self._kv_update(cache, k, v)

    def _s2(self, cache, q, k, v, position_ids, new_valid):
        """S2 over the cached tokens of each kv head plus the new ones (visibility from positions)."""
        pos = torch.where(new_valid, position_ids, torch.full_like(position_ids, -1))
        if cache is not None:
            ks, vs, ps = _layer_cache(cache, self.layer_idx, S2BlockCacheLayer).append(k, v, pos, self.s2)
        else:
            ks = [k[:, :, g] for g in range(self.kv_heads)]
            vs = [v[:, :, g] for g in range(self.kv_heads)]
            ps = [pos] * self.kv_heads
        group = self.heads // self.kv_heads
        bs = self.s2.block_size
        qb = torch.div(position_ids, bs, rounding_mode="floor")[:, :, None]  # [b, sq, 1]
        outs = []
        for g in range(self.kv_heads):
            kp = ps[g][:, None, :]  # [b, 1, n]
            kb = torch.div(kp.clamp(min=0), bs, rounding_mode="floor")
            vis = (kp >= 0) & (kp <= position_ids[:, :, None]) & self.s2.blocks(g, qb, kb)  # [b, sq, n]
            qg = q[:, :, g * group:(g + 1) * group]
            outs.append(masked_attention(qg, ks[g][:, :, None], vs[g][:, :, None], vis[:, None, None], self.scale))
        return torch.cat(outs, dim=2)


class SeqparMoHRouter(nn.Module):
    """MoH router on the layer input, in fp32: shared gates ``softmax(W_s x) * n_shared``, routed
    gates ``renorm_topk(softmax(W_r x)) * top_k``, mixed by ``softmax(W_mix x) * 2``. Gates
    ``[batch, seq, heads]``, 0 for unselected routed heads."""

    def __init__(self, config: SeqparConfig) -> None:
        super().__init__()
        h, shared = config.num_attention_heads, config.moh_num_shared_heads
        self.shared, self.routed, self.top_k = shared, h - shared, config.moh_top_k
        self.w_shared = nn.Linear(config.hidden_size, shared, bias=False) if shared else None
        self.w_routed = nn.Linear(config.hidden_size, self.routed, bias=False) if self.routed else None
        self.w_mix = nn.Linear(config.hidden_size, 2, bias=False) if shared and self.routed else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        lin = lambda layer: F.linear(x, layer.weight.float())  # noqa: E731
        a_shared = a_routed = 1.0
        if self.w_mix is not None:
            mix = torch.softmax(lin(self.w_mix), dim=-1) * 2
            a_shared, a_routed = mix[..., :1], mix[..., 1:]
        parts = []
        if self.w_shared is not None:
            parts.append(torch.softmax(lin(self.w_shared), dim=-1) * self.shared * a_shared)
        if self.w_routed is not None:
            probs = torch.softmax(lin(self.w_routed), dim=-1)
            top_p, top_i = probs.topk(self.top_k, dim=-1)
            kept = top_p / top_p.sum(dim=-1, keepdim=True) * self.top_k
            parts.append(torch.zeros_like(probs).scatter(-1, top_i, kept) * a_routed)
        return torch.cat(parts, dim=-1)


def lightning_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
                      state: Optional[torch.Tensor], chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning attention in fp32, chunk by chunk. q ``[b, s, h, dk]``, k ``[b, s, hkv, dk]``,
    v ``[b, s, hkv, dv]``, slope ``[h]``, state ``[b, h, dk, dv]`` or None (zeros).
    ``S_t = exp(-slope) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``. Returns (o like q, final state)."""
    b, s, h, dk = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    rep = h // hkv
    qf = q.float().transpose(1, 2)  # [b, h, s, dk]
    kf = k.float().transpose(1, 2).repeat_interleave(rep, dim=1)
    vf = v.float().transpose(1, 2).repeat_interleave(rep, dim=1)
    lam = slope.float().to(q.device)[None, :, None]  # [1, h, 1]
    S = torch.zeros(b, h, dk, dv, device=q.device) if state is None else state.float()
    outs = []
    for c0 in range(0, s, chunk):
        qc, kc, vc = qf[:, :, c0:c0 + chunk], kf[:, :, c0:c0 + chunk], vf[:, :, c0:c0 + chunk]
        n = qc.shape[2]
        t = torch.arange(n, device=q.device, dtype=torch.float32)
        diff = t[:, None] - t[None, :]
        decay = torch.where(diff >= 0, torch.exp(-lam[..., None] * diff.clamp(min=0)), torch.zeros(()))  # [1,h,n,n]
        o = ((qc @ kc.transpose(-1, -2)) * decay) @ vc
        o = o + torch.exp(-lam * (t + 1))[..., None] * (qc @ S)
        w = torch.exp(-lam * (n - 1 - t))[..., None]  # [1, h, n, 1]
        S = torch.exp(-lam * n)[..., None] * S + (kc * w).transpose(-1, -2) @ vc
        outs.append(o)
    o = torch.cat(outs, dim=2) if outs else qf.new_zeros(b, h, 0, dv)
    return o.transpose(1, 2).to(q.dtype), S


class SeqparLightningAttention(nn.Module):
    """Lightning layer (TransNormerLLM / MiniMax-01 form, no RoPE)."""

    def __init__(self, config: SeqparConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        h, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.heads, self.kv_heads, self.head_dim = h, hkv, d
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, hkv * d, bias=False)
        self.g_proj = nn.Linear(config.hidden_size, h * d, bias=False)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(h * d))
        self.eps = config.lightning_norm_eps

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor,
                cache: Optional[Cache], past: int) -> torch.Tensor:
        b, s, _ = x.shape
        h, g, d = self.heads, self.kv_heads, self.head_dim
        q = F.silu(self.q_proj(x)).view(b, s, h, d)
        k = F.silu(self.k_proj(x)).view(b, s, g, d)
        v = F.silu(self.v_proj(x)).view(b, s, g, d)
        new_valid = valid[:, -s:]
        k = k * new_valid[:, :, None, None].to(k.dtype)  # padding adds nothing to the state
        slope = torch.tensor(self.config.lightning_slopes[self.layer_idx], dtype=torch.float32, device=x.device)
        layer = _layer_cache(cache, self.layer_idx, LightningStateLayer) if cache is not None else None
        state = layer.get_state() if layer is not None else None
        if bool(new_valid.all()) and _use_kernels(self.config, x):
            o, final = _seqpar_kernels.lightning_attention(q, k, v, slope, initial_state=state,
                                                           output_final_state=True)
        else:
            o, final = lightning_chunked(q, k, v, slope, state)
        if layer is not None:
            layer.set_state(final, s)
        of = o.float()
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float().view(h, d)
        o = of.to(x.dtype).reshape(b, s, h * d) * torch.sigmoid(self.g_proj(x))
        return self.o_proj(o)


class SeqparMLP(nn.Module):
    def __init__(self, config: SeqparConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SeqparDecoderLayer(nn.Module):
    def __init__(self, config: SeqparConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = SeqparRMSNorm(config.hidden_size, config.rms_norm_eps)
        attn = SeqparLightningAttention if config.layer_pattern[layer_idx] == "L" else SeqparAttention
        self.self_attn = attn(config, layer_idx)
        self.post_attention_layernorm = SeqparRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SeqparMLP(config)

    def forward(self, x, position_ids, valid, cache, past):
        x = x + self.self_attn(self.input_layernorm(x), position_ids, valid, cache, past)
        return x + self.mlp(self.post_attention_layernorm(x))


class SeqparPreTrainedModel(PreTrainedModel):
    config_class = SeqparConfig
    base_model_prefix = "model"
    _no_split_modules = ["SeqparDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _is_stateful = True  # Lightning states and S2 block caches cannot be rolled back (no assisted decoding)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, SeqparRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, SeqparLightningAttention):
            nn.init.ones_(module.norm_weight)


class SeqparModel(SeqparPreTrainedModel):
    def __init__(self, config: SeqparConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SeqparDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = SeqparRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values: Optional[Cache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                **kwargs) -> BaseModelOutputWithPast:
        """``input_ids`` ``[batch, seq]``; ``attention_mask`` ``[batch, past + seq]`` (1 = token, 0 =
        padding) or None; ``position_ids`` ``[batch, seq]`` (default: past length + arange)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        cache = past_key_values if use_cache else None
        past = _past_length(cache)
        if position_ids is None:
            position_ids = (torch.arange(s, device=x.device) + past)[None].expand(b, -1)
        position_ids = position_ids.expand(b, -1)
        if attention_mask is None:
            valid = torch.ones(b, past + s, dtype=torch.bool, device=x.device)
        else:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be a 2-D [batch, past + seq] padding mask, got "
                                 f"{tuple(attention_mask.shape)}")
            valid = attention_mask.to(torch.bool)
            if valid.shape[1] < s:
                raise ValueError(f"attention_mask covers {valid.shape[1]} tokens, fewer than the {s} inputs")
        for layer in self.layers:
            x = layer(x, position_ids, valid, cache, past)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), past_key_values=cache)


class SeqparForCausalLM(SeqparPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config: SeqparConfig) -> None:
        super().__init__(config)
        self.model = SeqparModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values: Optional[Cache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """Logits ``[batch, seq, vocab]`` (fp32 math in attention); ``labels`` give the shifted LM loss."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


__all__ = ["SeqparForCausalLM", "SeqparModel", "SeqparPreTrainedModel", "LightningStateLayer", "S2BlockCacheLayer",
           "cache_nbytes"]
