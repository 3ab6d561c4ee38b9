"""seqpar attention inside megatron-core 0.16.

Core-attention classes (the ``SelfAttentionSubmodules.core_attention`` slot) for softmax, S2 and
MoH-on-qkv, and two whole self-attention modules: ``LightningSelfAttention`` (TransNormerLLM /
MiniMax-01 form) and ``MoHSelfAttention`` (router on the hidden states, load-balance loss through
megatron-core's ``MoEAuxLossAutoScaler``).

Contract of the core slot (megatron-core 0.16 ``DotProductAttention``): inputs ``[s, b, h, d]``
after RoPE (``[t, h, d]`` for packed THD), GQA not expanded, output ``[s, b, h*d]`` (``[t, h*d]``).
Under CP every layer passes ``cp.attention`` the micro-batch's one ``partition=`` (which global
tokens each rank holds): the trainer's, attached to ``packed_seq_params`` as
``seqpar.megatron.packed.SeqparPackedSeqParams`` (``parallel.cp_balance``: Megatron's zigzag or the
joint cost balancer), else Megatron's zigzag (chunks r and 2P-1-r of 2P per document, or of the
whole row without packed params: ``get_batch_on_this_cp_rank``'s split). The CP group comes from
``pg_collection.cp`` (or parallel_state), the scheme from ``config.cp_schemes[kind]``.

Packed documents (``packed_seq_params``, THD) reach every kind under every scheme: ``cu_seqlens_q``
are the *global* boundaries of the whole packed sequence (documents of any length), or Megatron's
padded layout (``cu_seqlens_q_padded``, documents padded to multiples of 2 x CP, with the real
``cu_seqlens_q``). docs/cp.md, "Packed documents: the trainer contract".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import scatter_to_tensor_model_parallel_region
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from megatron.core.utils import divide

from seqpar import cp
from seqpar.megatron.config import s2_layout
from seqpar.megatron.layout_check import cp_scheme_for_layer
from seqpar.megatron.packed import packed_cu_seqlens, partition_of
from seqpar.megatron.rope import SeqparSelfAttention
from seqpar.kernels import flash_attention, lightning_attention, lightning_slopes, moh_attention, s2_attention
from seqpar.nn import MoHRouter
from seqpar.nn.moh import routed_counts


def _groups(pg_collection: Optional[ProcessGroupCollection]) -> ProcessGroupCollection:
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
    return pg_collection


def _size(group: Any) -> int:
    return 1 if group is None else group.size()


def _to_bshd(x: torch.Tensor) -> torch.Tensor:
    # [s, b, h, d] -> [b, s, h, d]; THD [t, h, d] -> [1, t, h, d]
    return x.unsqueeze(0) if x.dim() == 3 else x.transpose(0, 1)


def _from_bshd(o: torch.Tensor, thd: bool) -> torch.Tensor:
    b, s, h, d = o.shape
    if thd:
        return o.reshape(s, h * d)
    return o.transpose(0, 1).reshape(s, b, h * d)


def _causal_only(layer: str, attn_mask_type: Optional[AttnMaskType]) -> None:
    # seqpar's kernels are causal by construction and have no key-padding input: padding_causal
    # (or any other mask type) is refused rather than run as plain causal
    if attn_mask_type is not None and attn_mask_type != AttnMaskType.causal:
        raise ValueError(
            f"{layer}: attn_mask_type={attn_mask_type.name} is not supported; seqpar attention is causal with no "
            f"padding mask. Build the layer with attn_mask_type=causal and either pack documents "
            f"(packed_seq_params, THD cu_seqlens) or right-pad and drop the pad tokens with the loss mask")


def _no_attention_mask(layer: str, attention_mask: Optional[torch.Tensor]) -> None:
    if attention_mask is not None:
        raise ValueError(
            f"{layer}: got an attention_mask {tuple(attention_mask.shape)}, which seqpar attention would not read "
            f"(the causal mask is applied inside the kernels; there is no key-padding mask). Pass "
            f"attention_mask=None (megatron-core: no attention mask in the data loader); for padded batches pack "
            f"documents with packed_seq_params or mask the pad tokens in the loss")


def _packed(packed_seq_params: Optional[PackedSeqParams]) -> dict[str, Any]:
    """What a layer hands the kernels (``cu_seqlens``, ``cu_seqlens_unpadded``: the global boundaries,
    for the one-rank path) and ``cp.attention`` (the micro-batch's partition, attached by the trainer:
    ``seqpar.megatron.packed``), from megatron's packed params (docs/cp.md: the trainer contract)."""
    out: dict[str, Any] = dict(packed_cu_seqlens(packed_seq_params))
    if packed_seq_params is not None:
        out["psp"] = packed_seq_params
    return out


def _cp_partition(packed: dict, local_len: int, group: Any) -> cp.Partition:
    """The one partition of this micro-batch (the trainer's, else Megatron's zigzag): every layer of
    the step passes the same object to ``cp.attention``."""
    return partition_of(packed.get("psp"), local_len, group)


def _real_tokens(packed: dict, local_len: int, group: Any) -> Optional[torch.Tensor]:
    """bool ``[local_len]``: this rank's slots that hold real tokens (None: all of them), from the
    partition ``cp.attention`` gets (padding is left out of the MoH balance loss)."""
    if not packed:
        return None
    rank = 0 if _size(group) == 1 else group.rank()
    part = _cp_partition(packed, local_len, group)
    if part.padding == 0:
        return None
    from seqpar.cp.partition import cached_index

    return cached_index(("valid", part, rank), packed["cu_seqlens"].device, lambda: part.valid(rank))


def _scheme(kind: str, config: Any, cp_comm_type: Optional[str]) -> str:
    schemes = getattr(config, "cp_schemes", None) or {kind: "allgather"}
    return cp_scheme_for_layer(kind, schemes, cp_comm_type, usp_ulysses_degree=getattr(config, "usp_ulysses_degree", 1),
                               hierarchical_context_parallel_sizes=getattr(config, "hierarchical_context_parallel_sizes",
                                                                           None))


class _SeqparCoreAttention(MegatronModule):
    """Shared constructor of the core-attention classes (megatron-core core_attention contract)."""

    kind = ""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Optional[ProcessGroupCollection] = None,
                 **kwargs: Any) -> None:
        super().__init__(config=config)
        if attention_type != "self":
            raise ValueError(f"{type(self).__name__} supports attention_type='self' only, got {attention_type!r}")
        _causal_only(type(self).__name__, attn_mask_type)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("seqpar attention kernels have no attention dropout; set attention_dropout=0.0")
        self.layer_number = max(1, layer_number)
        self.pg_collection = _groups(pg_collection)
        tp = _size(self.pg_collection.tp)
        self.tp_rank = 0 if self.pg_collection.tp is None else self.pg_collection.tp.rank()
        self.heads = divide(config.num_attention_heads, tp)
        self.kv_heads = divide(config.num_query_groups, tp)
        head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.cp_group = self.pg_collection.cp
        self.scheme = _scheme(self.kind, config, cp_comm_type)
        self.backend = getattr(config, "seqpar_backend", "auto")

    @property
    def cp_size(self) -> int:
        return _size(self.cp_group)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError(f"{type(self).__name__} does not take attention_bias")
        _causal_only(type(self).__name__, attn_mask_type)
        _no_attention_mask(type(self).__name__, attention_mask)
        thd = query.dim() == 3
        q, k, v = _to_bshd(query), _to_bshd(key), _to_bshd(value)
        o = self._attend(q, k, v, _packed(packed_seq_params))
        return _from_bshd(o, thd)

    def _cp(self, q, k, v, packed: dict, **kw) -> torch.Tensor:
        if self.scheme == "usp":
            kw["ulysses_degree"] = self.config.usp_ulysses_degree
        return cp.attention(q, k, v, kind=self.kind, scheme=self.scheme, group=self.cp_group,
                            backend=self.backend, partition=_cp_partition(packed, q.shape[1], self.cp_group), **kw)

    def _attend(self, q, k, v, packed: dict):
        raise NotImplementedError


class SoftmaxCoreAttention(_SeqparCoreAttention):
    """Causal softmax attention: ``flash_attention`` on one rank, ``cp.attention(kind="softmax")``
    under CP. Packed THD passes ``cu_seqlens`` through (every kind, every scheme);
    ``config.softmax_window`` (Mistral's sliding window) reaches the kernel and every CP scheme."""

    kind = "softmax"

    def _attend(self, q, k, v, packed: dict):
        window = self.config.softmax_window
        if self.cp_size == 1:  # Megatron's per-document pads sit after each document's real tokens: causal
            return flash_attention(q, k, v, causal=True, sm_scale=self.softmax_scale, window=window,
                                   cu_seqlens=packed.get("cu_seqlens"), backend=self.backend)
        return self._cp(q, k, v, packed, sm_scale=self.softmax_scale, window=window)


class S2CoreAttention(_SeqparCoreAttention):
    """S2 (sparse-sharded) attention with the layout from ``config.s2_*``. Under TP each rank computes
    exactly its kv heads of the full model's pattern (``kv_head_offset`` / ``total_kv_heads``), so the
    model is the same at any TP size."""

    kind = "s2"

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        # resolved with the model's query heads (DKernel's step), so every TP rank and CP scheme
        # reads the same pattern whatever heads it holds
        self.layout = s2_layout(config, config.num_attention_heads)
        self.kv_head_offset = self.tp_rank * self.kv_heads
        self.total_kv_heads = config.num_query_groups

    def _attend(self, q, k, v, packed: dict):
        if self.cp_size == 1:
            return s2_attention(q, k, v, self.layout, sm_scale=self.softmax_scale, cu_seqlens=packed.get("cu_seqlens"),
                                kv_head_offset=self.kv_head_offset, total_kv_heads=self.total_kv_heads,
                                backend=self.backend)
        # every CP scheme places this TP rank's kv heads in the global pattern; the layout restarts
        # at every document
        # which kv heads each rank computes under ulysses / usp (docs/cp.md)
        kw = ({"head_placement": getattr(self.config, "s2_head_placement", "balanced")}
              if self.scheme in ("ulysses", "usp") else {})
        return self._cp(q, k, v, packed, layout=self.layout, sm_scale=self.softmax_scale,
                        kv_head_offset=self.kv_head_offset, total_kv_heads=self.total_kv_heads, **kw)


def moh_balance_loss(probs: torch.Tensor, topk_index: torch.Tensor, group: Any,
                     real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MoH load-balance loss ``R^2 * mean_i(P_i F_i)`` over the tokens of the whole CP group
    (``probs [b, s, R]`` routed probabilities, ``topk_index [b, s, k]``; docs/moh.md). ``real``: bool
    ``[s]``, the slots that hold real tokens (padding of packed documents is left out), or None.

    The per-head sums travel in one all-reduce through :class:`seqpar.cp.Comm` (recorded in the
    comm ledger as ``all_reduce``, ``2 (P-1)/P * (2R+1) * 4`` bytes for fp32 routers). Each rank's
    autograd sees only its own tokens' contribution (the remote sums enter as constants), so
    summing parameter grads over CP gives exactly the single-rank gradient.
    """
    num = probs.shape[-1]
    if real is None:
        # a device-side fill: no host-to-device copy on the hot path
        tokens = torch.full((1,), probs.numel() // num, dtype=probs.dtype, device=probs.device)
    else:
        w = real.to(probs.dtype)[None, :, None]
        probs = probs * w
        tokens = (w.sum() * probs.shape[0]).reshape(1)
    p_sum = probs.reshape(-1, num).sum(dim=0)
    f_cnt = routed_counts(topk_index, num, probs.dtype, None if real is None else real[None, :, None])
    if _size(group) > 1:
        stats = cp.Comm(group).all_reduce(torch.cat([p_sum.detach(), f_cnt, tokens]))
        p_sum = p_sum + (stats[:num] - p_sum.detach())
        f_cnt, tokens = stats[num:2 * num], stats[2 * num:]
    return num ** 2 * (p_sum / tokens * f_cnt / tokens).mean()


def _moh_layers(num_moh_layers: Any) -> int:
    if isinstance(num_moh_layers, bool) or not isinstance(num_moh_layers, int) or num_moh_layers < 1:
        raise ValueError(f"num_moh_layers must be a positive int (MoH layers of the whole model), "
                         f"got {num_moh_layers!r}")
    return num_moh_layers


class MoHCoreAttention(_SeqparCoreAttention):
    """MoH attention in the core slot. Gates come from ``set_gates`` (``MoHSelfAttention`` routes on
    the hidden states) or, when none are set, from a router on this partition's queries
    (``[.., heads*dim]``); in that case the load-balance loss
    ``moh_aux_loss_coef * L_b / num_moh_layers`` is attached to the output with
    ``MoEAuxLossAutoScaler`` and kept in ``self.last_aux_loss`` (``num_moh_layers``: the model's
    MoH layers, so the model's total is the coefficient times the layer average, docs/moh.md)."""

    kind = "moh"

    def __init__(self, config, *args: Any, router_on_query: bool = True, num_moh_layers: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.aux_loss_coef = config.moh_aux_loss_coef / _moh_layers(num_moh_layers)
        self._gates: Optional[torch.Tensor] = None
        self.last_aux_loss: Optional[torch.Tensor] = None
        self.router = None
        if router_on_query:
            if _size(self.pg_collection.tp) > 1:
                raise ValueError("MoH with the query router needs tensor_model_parallel_size=1")
            self.router = MoHRouter(self.heads * config.kv_channels, self.heads, config.moh_num_shared_heads,
                                    config.moh_top_k)

    def set_gates(self, gates: torch.Tensor) -> None:
        """Gates ``[batch, seq, heads]`` for the next forward (consumed once)."""
        self._gates = gates

    def _attend(self, q, k, v, packed: dict):
        aux = None
        if self._gates is not None:
            gates, self._gates = self._gates, None
        elif self.router is not None:
            routing = self.router(q.reshape(*q.shape[:2], -1))
            gates = routing.gates
            aux = self.aux_loss_coef * moh_balance_loss(routing.routed_probs, routing.topk_index, self.cp_group,
                                                        _real_tokens(packed, q.shape[1], self.cp_group))
            self.last_aux_loss = aux.detach()
        else:
            raise ValueError("MoHCoreAttention built with router_on_query=False needs set_gates() before forward")
        gates = gates.to(torch.float32)
        if self.cp_size == 1:  # gates travel with their tokens; documents never see each other
            o = moh_attention(q, k, v, gates, causal=True, sm_scale=self.softmax_scale,
                              cu_seqlens=packed.get("cu_seqlens"), backend=self.backend)
        else:
            o = self._cp(q, k, v, packed, gates=gates, sm_scale=self.softmax_scale)
        return o if aux is None else MoEAuxLossAutoScaler.apply(o, aux)


class MoHHiddenCoreAttention(MoHCoreAttention):
    """MoH core attention whose gates are set by ``MoHSelfAttention`` (no query router)."""

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, router_on_query=False, **kwargs)


class MoHSelfAttention(SeqparSelfAttention):
    """Megatron ``SelfAttention`` (with seqpar's packed-sequence RoPE, no host sync per layer:
    ``seqpar.megatron.rope``) whose heads are routed per token by a router on the hidden states
    (MoH). The load-balance loss (over the tokens of the whole CP group) reaches the training loss
    through ``MoEAuxLossAutoScaler``, as megatron-core MoE's aux loss does; its value is kept in
    ``self.last_aux_loss``. Under TP the router (replicated, on the replicated hidden states) picks
    among all heads exactly as at TP=1; each rank takes its heads' gates with megatron's
    ``scatter_to_tensor_model_parallel_region`` (backward all-gathers the gate gradient, so every
    rank's router copy gets the full, identical gradient).

    Each layer adds ``moh_aux_loss_coef * L_b / num_moh_layers``: over the model that is the
    coefficient times the *average* of ``L_b`` over its MoH layers, as MoH's own training does, so
    the paper's ``beta = 0.01`` means the same here at any depth (``layer_specs`` passes
    ``num_moh_layers``, the count of ``H`` layers in the whole model, every pipeline stage)."""

    def __init__(self, config, submodules: SelfAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, num_moh_layers: int = 1) -> None:
        super().__init__(config, submodules, layer_number, attn_mask_type=attn_mask_type,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if not isinstance(self.core_attention, MoHCoreAttention):
            raise ValueError("MoHSelfAttention needs core_attention=MoHHiddenCoreAttention")
        self.router = MoHRouter(config.hidden_size, config.num_attention_heads, config.moh_num_shared_heads,
                                config.moh_top_k)
        self.aux_loss_coef = config.moh_aux_loss_coef / _moh_layers(num_moh_layers)
        self.last_aux_loss: Optional[torch.Tensor] = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        packed = _packed(kwargs.get("packed_seq_params"))
        # checked before the router's collective so that every rank fails the same way
        _no_attention_mask(type(self).__name__, args[0] if args else kwargs.get("attention_mask"))
        routing = self.router(hidden_states.transpose(0, 1))  # [b, s, heads]
        group = self.core_attention.cp_group
        aux = self.aux_loss_coef * moh_balance_loss(routing.routed_probs, routing.topk_index, group,
                                                    _real_tokens(packed, hidden_states.shape[0], group))
        self.last_aux_loss = aux.detach()
        gates = routing.gates
        if self.world_size > 1:  # this rank's heads (contiguous, as linear_qkv splits them)
            gates = scatter_to_tensor_model_parallel_region(gates, group=self.pg_collection.tp)
        self.core_attention.set_gates(gates)
        out, bias = super().forward(hidden_states, *args, **kwargs)
        return MoEAuxLossAutoScaler.apply(out, aux), bias


def _split_rows_factory(sh: ShardedTensor, sizes: list[int], names: tuple[str, ...],
                        prepend_axis_num: int) -> ShardedTensorFactory:
    """A TP-sharded (dim 0) tensor whose local rows are ``len(sizes)`` stacked parts, saved as one
    TP-sharded global tensor per part (``<key>.<name>``) and concatenated back on load."""
    axis = prepend_axis_num
    tp_rank = sh.global_offset[axis] // sh.local_shape[0]
    tp_size = sh.axis_fragmentations[axis]
    offsets = [(i, sh.global_offset[i], sh.axis_fragmentations[i]) for i in range(axis)]  # e.g. stacked layers

    @torch.no_grad()
    def build(key: str, t: torch.Tensor, replica_id: Any, flattened_range: Optional[slice]) -> list[ShardedTensor]:
        if flattened_range is not None:
            raise ValueError("flattened (distributed-optimizer) shards of linear_qkvg are not supported")
        return [ShardedTensor.from_rank_offsets(f"{key}.{n}", part, *offsets, (axis, tp_rank, tp_size),
                                               replica_id=replica_id, prepend_axis_num=prepend_axis_num)
                for n, part in zip(names, torch.split(t, sizes, dim=0))]

    def merge(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=0)

    return ShardedTensorFactory(sh.key, sh.data, build, merge, sh.replica_id)


@dataclass
class LightningSubmodules:
    """Builders of ``LightningSelfAttention``: a column-parallel q/k/v/gate projection and a
    row-parallel output projection (megatron's tensor_parallel layers)."""

    linear_qkvg: Any
    linear_proj: Any


class LightningSelfAttention(MegatronModule):
    """Lightning attention layer in the TransNormerLLM / MiniMax-01 form (no RoPE):

    ``q, k, v = SiLU(x W_q), SiLU(x W_k), SiLU(x W_v)``; ``o = lightning(q, k, v, slopes_layer)``;
    ``o = RMSNorm_head(o) * sigmoid(x W_g)``; ``out = o W_o``. Slopes come from
    ``lightning_slopes(heads, layer_idx, num_layers)`` (MiniMax per-layer scaling; the rank's heads
    under TP). The RMSNorm is per head so the layer is the same at any TP size. Under CP the scheme
    is ``config.cp_schemes["lightning"]`` (allgather = LASP-2) on the micro-batch's partition; packed THD
    passes ``cu_seqlens`` on one rank.
    """

    def __init__(self, config, submodules: LightningSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None) -> None:
        super().__init__(config=config)
        _causal_only(type(self).__name__, attn_mask_type)
        self.pg_collection = _groups(pg_collection)
        tp = _size(self.pg_collection.tp)
        tp_rank = 0 if self.pg_collection.tp is None else self.pg_collection.tp.rank()
        self.layer_number = layer_number
        self.head_dim = config.kv_channels
        self.heads = divide(config.num_attention_heads, tp)
        self.kv_heads = divide(config.num_query_groups, tp)
        self.cp_group = self.pg_collection.cp
        self.scheme = _scheme("lightning", config, cp_comm_type)
        self.backend = getattr(config, "seqpar_backend", "auto")
        width = self.head_dim * (2 * config.num_attention_heads + 2 * config.num_query_groups)
        # megatron's CPU initialisation draws the full [width, hidden] matrix on every rank and hands
        # rank r its r-th contiguous row chunk; this layer reads its rows as [q_r | k_r | v_r | gate_r]
        # (a slice of each section), so it keeps the full matrix and re-splits it per section, as
        # megatron's stride=2 does for SwiGLU's [gate; up] (sections here have unequal sizes)
        resplit = tp > 1 and config.use_cpu_initialization and config.perform_initialization
        extra = {"keep_master_weight_for_test": True} if resplit else {}
        self.linear_qkvg = submodules.linear_qkvg(
            config.hidden_size, width, config=config, init_method=config.init_method, gather_output=False,
            bias=config.add_bias_linear, skip_bias_add=False, is_expert=False, tp_group=self.pg_collection.tp,
            **extra)
        if resplit:
            self._resplit_qkvg(tp, tp_rank)
        self.linear_proj = submodules.linear_proj(
            config.num_attention_heads * self.head_dim, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_group=self.pg_collection.tp)
        # per-head RMSNorm with a weight per output channel, split over TP like the heads
        self.norm_weight = torch.nn.Parameter(torch.ones(self.heads * self.head_dim, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.norm_weight, True, 0, 1)
        slopes = lightning_slopes(config.num_attention_heads, layer_number - 1, config.num_layers)
        self.register_buffer("slopes", slopes[tp_rank * self.heads:(tp_rank + 1) * self.heads].clone(),
                             persistent=False)
        self.eps = config.layernorm_epsilon

    def _sections(self, tp: int = 1) -> list[int]:
        """Row counts of the q, k, v, gate sections of ``linear_qkvg`` (this rank's when tp=1)."""
        d = self.head_dim
        return [tp * self.heads * d, tp * self.kv_heads * d, tp * self.kv_heads * d, tp * self.heads * d]

    @torch.no_grad()
    def _resplit_qkvg(self, tp: int, tp_rank: int) -> None:
        # this rank's slice of every section of the full (TP=1) matrix: the TP=1 model at any TP size
        master = self.linear_qkvg.__dict__.pop("master_weight")
        parts = torch.split(master, self._sections(tp), dim=0)
        self.linear_qkvg.weight.copy_(torch.cat([p.chunk(tp, dim=0)[tp_rank] for p in parts], dim=0))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """Checkpoint entries that load at any TP size:

        - ``norm_weight`` is split over TP along dim 0 like the heads (Megatron's default would mark
          a module's own parameter replicated);
        - each rank's ``linear_qkvg`` rows are ``[q_r | k_r | v_r | gate_r]``, so rank chunks of
          the stacked tensor are not a TP-invariant layout; it is written as four global tensors
          (``<key>.q/.k/.v/.gate``), each TP-sharded (as Megatron does for SwiGLU's fc1).
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        sd.update(make_sharded_tensors_for_checkpoint(
            {"norm_weight": self.norm_weight}, prefix, {"norm_weight": 0}, sharded_offsets,
            tp_group=self.pg_collection.tp, dp_cp_group=metadata["dp_cp_group"]))
        d = self.head_dim
        sizes = [self.heads * d, self.kv_heads * d, self.kv_heads * d, self.heads * d]
        for name in ("weight", "bias"):
            key = f"{prefix}linear_qkvg.{name}"
            if key in sd:
                sd[key] = _split_rows_factory(sd[key], sizes, ("q", "k", "v", "gate"), len(sharded_offsets))
        return sd

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                *args: Any, packed_seq_params: Optional[PackedSeqParams] = None, **kwargs: Any):
        _no_attention_mask(type(self).__name__, attention_mask)
        s, b, _ = hidden_states.shape
        mixed, _ = self.linear_qkvg(hidden_states)
        d, h, g = self.head_dim, self.heads, self.kv_heads
        q, k, v, gate = torch.split(mixed, [h * d, g * d, g * d, h * d], dim=-1)
        packed = _packed(packed_seq_params)
        q = F.silu(q).view(s, b, h, d).transpose(0, 1)
        k = F.silu(k).view(s, b, g, d).transpose(0, 1)
        v = F.silu(v).view(s, b, g, d).transpose(0, 1)
        slope = self.slopes  # on the model's device (moved with it; a per-call copy would be a host-to-device copy)
        if _size(self.cp_group) == 1:
            o, _ = lightning_attention(q, k, v, slope, backend=self.backend, cu_seqlens=packed.get("cu_seqlens"),
                                       cu_seqlens_unpadded=packed.get("cu_seqlens_unpadded"))
        else:
            kw = {"ulysses_degree": self.config.usp_ulysses_degree} if self.scheme == "usp" else {}
            o, _ = cp.attention(q, k, v, kind="lightning", scheme=self.scheme, group=self.cp_group, slope=slope,
                                backend=self.backend, partition=_cp_partition(packed, s, self.cp_group), **kw)
        of = o.float()
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float().view(h, d)
        o = of.to(hidden_states.dtype).transpose(0, 1).reshape(s, b, h * d)
        o = o * torch.sigmoid(gate)
        return self.linear_proj(o)
