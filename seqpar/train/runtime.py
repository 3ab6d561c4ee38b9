"""What every engine shares: the recipe's model (``build_model``: this rank's pipeline stage of the
``GPTModel`` on the engine's device, initialised on the CPU independently of the TP x PP split and of
the device; ``model_config``), the LR / weight-decay schedule (``build_scheduler``: megatron-core's
``OptimizerParamScheduler``, stepped by both engines), a step's micro-batches with their document
boundaries (``micro_batches``: packed THD with ``PackedSeqParams`` per micro-batch) and this CP rank's
share of them (one ``cp.Partition`` per micro-batch, placed by ``parallel.cp_balance``: ``CPBalance``,
``local_batch``; the model's cost model ``cost_model`` and the step's ``modelled_imbalance``), the global batch's
valid-token count (``global_tokens``), the MoH aux losses, the greedy-prediction accuracy
(``TokenAccuracy``), and devices (``param_device``, ``current_device``).

The loop and the engines import this module; it imports neither.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from seqpar import cp
from seqpar.data.batch import Batch
from seqpar.kernels._common import seed_host_ints
from seqpar.megatron.attention import MoHCoreAttention, MoHSelfAttention
from seqpar.megatron.packed import SeqparPackedSeqParams
from seqpar.megatron.specs import layer_specs_for_stage
from seqpar.models import build_gpt, transformer_config
from seqpar.train.config import RunConfig
from seqpar.train.cp_plan import cost_model  # noqa: F401  public here too (CPBalance's objective)


def model_config(cfg: RunConfig):
    """The megatron ``TransformerConfig`` (``SeqparTransformerConfig``) of the recipe: parallel sizes,
    dtype, recompute, per-token loss. One place for every engine knob that lives in the model config."""
    p = _preset(cfg)
    m, par = cfg.model, cfg.parallel
    dtype = torch.bfloat16 if m.dtype == "bf16" else torch.float32
    recompute = {"none": {}, "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
                 "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}}
    return transformer_config(
        p, tensor_model_parallel_size=par.tensor_parallel, context_parallel_size=par.context_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel, cp_schemes=par.cp_schemes,
        usp_ulysses_degree=par.usp_ulysses_degree,
        seqpar_backend=par.backend, s2_block_size=m.s2_block_size, s2_local_blocks=m.s2_local_blocks,
        s2_vert_stride=m.s2_vert_stride, softmax_window=m.softmax_window, moh_num_shared_heads=m.moh_num_shared_heads, moh_top_k=m.moh_top_k,
        moh_aux_loss_coef=m.moh_aux_loss_coef, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype, calculate_per_token_loss=True,
        # gloo has no batched isend/irecv and the batched path synchronises CUDA
        batch_p2p_comm=torch.cuda.is_available(), **recompute[m.recompute])


def _preset(cfg: RunConfig):
    return cfg.model.shape  # the preset with the recipe's shape overrides and pattern


def _seed_of(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


@contextmanager
def _seeded(seed: int, name: str) -> Iterator[None]:
    """The CPU generator seeded from (seed, name), restored afterwards: module initialisation that
    depends only on the module's place in the full model, not on the pipeline / tensor split. Only
    the CPU generator is touched (initialisation draws there on every device, ``build_model``); the
    CUDA generators keep the states ``init_parallel`` seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(_seed_of(seed, name))
        yield


def _to_device(module: torch.nn.Module, device: torch.device) -> None:
    """Every parameter and buffer of ``module`` (``Module.to``) and every tensor its modules keep as a
    plain attribute onto ``device``: megatron's RoPE keeps ``inv_freq`` so, on the CPU under CPU
    initialisation (its own forward would copy it to the GPU at the first micro-batch)."""
    module.to(device)
    for mod in module.modules():
        for name, value in list(vars(mod).items()):
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(mod, name, value.to(device))


def _seeded_layer_class(seed: int, base: type, device: torch.device) -> type:
    """``base`` (the spec's layer class, megatron's TransformerLayer) seeded by its global layer number
    and moved to ``device`` as soon as it is built."""
    if not issubclass(base, TransformerLayer):
        raise TypeError(f"layer spec module {base.__name__} is not a megatron TransformerLayer")

    class SeededTransformerLayer(base):
        """The layer initialised from its *global* layer number: a stage of a pipeline-parallel model
        starts with exactly the layers of the one-stage model. Initialised on the CPU, then moved to
        the target device (the host holds one layer's weights at a time)."""

        def __init__(self, config, submodules, layer_number: int = 1, *args: Any, **kwargs: Any) -> None:
            pg = kwargs.get("pg_collection")
            pp_rank = pg.pp.rank() if pg is not None and getattr(pg, "pp", None) is not None else None
            global_number = layer_number + get_transformer_layer_offset(config, kwargs.get("vp_stage"), pp_rank)
            with _seeded(seed, f"layer{global_number}"):
                super().__init__(config, submodules, layer_number, *args, **kwargs)
            _to_device(self, device)

    return SeededTransformerLayer


def _reinit_output_layer(model: torch.nn.Module, seed: int) -> None:
    """The output layer is built after the stage's layers; on the last stage of a pipeline the CPU
    generator has not drawn the embedding then, so draw it from its own seed (CPU init is megatron's
    master-weight-then-split, identical at any TP size)."""
    out = getattr(model, "output_layer", None)
    if out is None:
        return
    tp = parallel_state.get_tensor_model_parallel_world_size()
    w = out.weight
    with _seeded(seed, "output_layer"):
        _initialize_affine_weight_cpu(w, w.shape[0] * tp, w.shape[1], w.shape[0], 0, model.config.init_method,
                                      params_dtype=model.config.params_dtype,
                                      rank=parallel_state.get_tensor_model_parallel_rank(), world_size=tp,
                                      skip_set_tensor_parallel_attributes=True)


def _check_groups(cfg: RunConfig) -> None:
    """The process groups must be the recipe's layout (a model built for another one is silently wrong)."""
    par = cfg.parallel
    want = (par.tensor_parallel, par.context_parallel, par.pipeline_parallel)
    have = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_context_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size())
    if want != have:
        raise ValueError(f"the process groups have TP x CP x PP = {have} but the recipe asks for {want}; "
                         f"call init_parallel with parallel.tensor_parallel / context_parallel / pipeline_parallel")


def build_model(cfg: RunConfig, vocab_size: int, device: Optional[torch.device | str] = None) -> list[torch.nn.Module]:
    """This rank's pipeline stage of the recipe's ``GPTModel`` as a list of model chunks (one; the
    megatron-core modules, not yet DDP-wrapped), with the recipe's dtype, every parameter, buffer and
    tensor attribute on ``device`` (default: this process's device, ``current_device()``; megatron's
    ``get_model`` moves each chunk to the current CUDA device likewise before DDP). CPU tests pass
    ``"meta"`` to see a GPU run's placement.

    Initialisation is layout- and device-independent: it draws on the CPU generator whatever
    ``device`` is (megatron's ``use_cpu_initialization``: each TP-split weight is drawn whole and
    split, ``_seeded`` per layer / embedding / output layer, Lightning's q/k/v/gate re-split), so with
    the same seed every TP x PP split on any device holds the slices of the same model — the one the
    CPU tests check. Each transformer layer moves to ``device`` as soon as it is built. Build under
    ``with torch.device("meta")`` and pass ``device="meta"`` to skip the draws (shapes only)."""
    _check_groups(cfg)
    device = current_device() if device is None else torch.device(device)
    tcfg = model_config(cfg)
    p = _preset(cfg)
    spec = layer_specs_for_stage(p.pattern, tcfg)
    seeded: dict[type, type] = {}
    for s in spec.layer_specs:
        if s.module not in seeded:
            seeded[s.module] = _seeded_layer_class(cfg.train.seed, s.module, device)
        s.module = seeded[s.module]
    with _seeded(cfg.train.seed, "embedding"):
        model = build_gpt(p, tcfg, vocab_size=vocab_size, max_sequence_length=cfg.data.seq_len, spec=spec,
                          pre_process=parallel_state.is_pipeline_first_stage(),
                          post_process=parallel_state.is_pipeline_last_stage())
    _reinit_output_layer(model, cfg.train.seed)
    _to_device(model, device)
    return [model.to(tcfg.params_dtype)]


def build_scheduler(cfg: RunConfig, opt) -> OptimizerParamScheduler:
    """The recipe's LR / weight-decay schedule on ``opt`` (also used to report LR changes on resume)."""
    o = cfg.optim
    return OptimizerParamScheduler(opt, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
                                   lr_decay_steps=max(cfg.train.steps, o.warmup_steps + 1), lr_decay_style="cosine",
                                   start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=cfg.train.steps,
                                   wd_incr_style="constant")


def current_device() -> torch.device:
    """The current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class CPBalance:
    """How the trainer places each micro-batch's tokens on the CP ranks (``parallel.cp_balance``),
    resolved once per run (:meth:`of`).

    ``balance``: ``"zigzag"`` or ``"cost"`` (a ``cp.BALANCERS`` name); ``cost``: the model's
    :func:`cost_model` when CP > 1 (the cost balancer's objective, and the modelled imbalance either
    way), else None."""

    balance: str = "zigzag"
    cost: Optional[cp.CostModel] = None

    @classmethod
    def of(cls, cfg: RunConfig) -> "CPBalance":
        """The recipe's balance with its cost model (built here, once)."""
        par = cfg.parallel
        return cls(par.cp_balance, cost_model(cfg) if par.context_parallel > 1 else None)

    def partition(self, seq_len: int, **kw: Any) -> cp.Partition:
        """This CP group's partition of ``seq_len`` global tokens (``cu_seqlens`` etc. in ``kw``), host only."""
        if self.balance == "cost" and self.cost is None:
            raise ValueError("cp_balance='cost' needs the model's cost model: CPBalance.of(cfg)")
        group = (parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size())
        return cp.make_partition(seq_len, group, balance=self.balance,
                                 cost=self.cost if self.balance == "cost" else None, **kw)


ZIGZAG = CPBalance()


def local_batch(tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """This CP rank's share of a ``[batch, seq]`` batch whose rows are single sequences, by Megatron's
    zigzag (chunks r and 2P-1-r of 2P of every row; ``get_batch_on_this_cp_rank``'s split, through the
    resolved ``cp.Partition``: ``part.shard``), with the partition under ``"partition"`` (CP > 1).
    ``position_ids`` (default: ``arange(seq)``) are sharded with the tokens."""
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    out = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
    if parallel_state.get_context_parallel_world_size() == 1:
        return out
    part = ZIGZAG.partition(tokens.shape[1])
    rank = parallel_state.get_context_parallel_rank()
    out = {k: part.shard(t, rank) for k, t in out.items()}
    out["partition"] = part
    return out


def modelled_imbalance(batches: Sequence[dict[str, Any]], balance: CPBalance) -> Optional[float]:
    """``max / mean`` over the CP ranks of the modelled attention work (``balance.cost``) of this
    rank's micro-batches of a step (their partitions, host only): 1.0 = balanced. None without CP."""
    if balance.cost is None or not batches or "partition" not in batches[0]:
        return None
    work: list[float] = []
    for mb in batches:
        rows = 1 if "packed_seq_params" in mb else mb["tokens"].shape[0]  # dense: every row the same split
        costs = balance.cost.rank_costs(mb["partition"])
        work = [w + rows * c for w, c in zip(work, costs)] if work else [rows * c for c in costs]
    mean = sum(work) / len(work)
    return max(work) / mean if mean else 1.0


def global_tokens(batches: Sequence[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Valid tokens of the whole global batch, on ``device`` (one all-reduce over DP x CP of this rank's
    micro-batches' ``loss_mask``; every PP stage holds the labels, so no pipeline exchange is needed)."""
    n = torch.stack([b["loss_mask"].float().sum() for b in batches]).sum().to(device)
    dist.all_reduce(n, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return n


def micro_batches(batch: Batch, micro_batch: int, balance: CPBalance = ZIGZAG) -> list[dict[str, Any]]:
    """This DP rank's ``[b, s]`` share of a step as ``b / micro_batch`` micro-batches (rows in order;
    0 = one micro-batch of all rows), each this CP rank's share, as the engines' forward steps take
    them: ``tokens`` / ``labels`` / ``loss_mask`` / ``position_ids`` (and, for packed documents,
    ``packed_seq_params``), and under CP the micro-batch's ``partition`` (``cp.Partition``).

    ``balance`` (the engine's ``CPBalance.of(cfg)``, ``parallel.cp_balance``) places the tokens on the
    CP ranks: one partition per micro-batch, resolved once on the host from the host boundaries, which
    shards every per-token tensor (``part.shard``) and travels to every attention layer with the
    packed params (``seqpar.megatron.packed.SeqparPackedSeqParams``; RoPE reads its token index).

    Document masking: when a row of the step holds more than one document (``batch.starts()``, host
    ints: no sync), every micro-batch is flattened to one packed THD sequence ``[1, T]`` and gets
    megatron-core ``PackedSeqParams`` with the documents' ``cu_seqlens`` (each row starts a document),
    so no document attends to another in any layer kind and RoPE restarts per document. Under CP each
    document is padded at its end to a multiple of 2 x CP (Megatron's padded THD:
    ``cu_seqlens_q_padded``) and every per-token tensor is sharded with the partition; pads carry loss
    mask 0, so they count neither in the loss nor in the token count. Every micro-batch of the step
    gets the same ``T`` (the last document's padding is extended): megatron's pipeline schedule sends
    one activation shape. A step whose rows are single documents runs the dense ``[mb, s]`` layout
    under zigzag (``local_batch``: the same math); the cost balancer always takes the packed layout
    (each row a document), since it places pieces of each row differently.
    """
    b = batch.tokens.shape[0]
    mb = micro_batch or b
    if b % mb:
        raise ValueError(f"data.micro_batch={mb} must divide the {b} sequences of this DP rank")
    parts = [batch.rows(i, i + mb) for i in range(0, b, mb)]
    if balance.balance == "zigzag" and all(len(row) == 1 for row in batch.starts()):
        return [local_batch(p.tokens, p.labels, p.loss_mask, p.position_ids) for p in parts]
    return _packed_micro_batches(parts, balance)


def _packed_micro_batches(parts: list[Batch], balance: CPBalance) -> list[dict[str, Any]]:
    cp_size = parallel_state.get_context_parallel_world_size()
    multiple = 2 * cp_size if cp_size > 1 else 1
    real = [p.cu_seqlens()[0].tolist() for p in parts]  # host tensors from the host boundaries
    lens = [[b - a for a, b in zip(cu[:-1], cu[1:])] for cu in real]
    padded = [[n + (-n) % multiple for n in ls] for ls in lens]
    total = max(sum(ps) for ps in padded)
    out = []
    for part, cu, ls, ps in zip(parts, real, lens, padded):
        ps[-1] += total - sum(ps)  # the same T for every micro-batch of the step
        cu_pad = [0]
        for n in ps:
            cu_pad.append(cu_pad[-1] + n)
        device = part.tokens.device
        # pads are gathered from a zero column appended at index n
        n = part.tokens.numel()
        index = torch.full((total,), n, dtype=torch.int64)
        for a, start, length in zip(cu[:-1], cu_pad[:-1], ls):
            index[start:start + length] = torch.arange(a, a + length)
        index = index.to(device)
        flat = {k: torch.cat([t.reshape(1, -1), t.new_zeros(1, 1)], dim=1).index_select(1, index)
                for k, t in (("tokens", part.tokens), ("labels", part.labels), ("loss_mask", part.loss_mask),
                             ("position_ids", part.position_ids))}
        cu_t = seed_host_ints(torch.tensor(cu, dtype=torch.int32, device=device), cu)
        pad_t = seed_host_ints(torch.tensor(cu_pad, dtype=torch.int32, device=device), cu_pad) \
            if cp_size > 1 else None
        partition = None
        if cp_size > 1:
            partition = balance.partition(total, cu_seqlens=cu_pad, cu_seqlens_unpadded=cu)
            rank = parallel_state.get_context_parallel_rank()
            flat = {k: partition.shard(t, rank) for k, t in flat.items()}
            flat["loss_mask"] = flat["loss_mask"] * partition.valid(rank).to(device)
            flat["partition"] = partition
        longest = max(ps if cp_size > 1 else ls)
        flat["packed_seq_params"] = SeqparPackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t, cu_seqlens_q_padded=pad_t,
            cu_seqlens_kv_padded=pad_t, max_seqlen_q=longest, max_seqlen_kv=longest, partition=partition)
        out.append(flat)
    return out


def forward_micro_batch(model: Any, micro: dict[str, Any]) -> torch.Tensor:
    """One micro-batch of :func:`micro_batches` through ``model`` (a ``GPTModel`` stage or an engine
    wrapping it): per-token losses ``[b, s_local]`` on the last pipeline stage (the activation on the
    others). Packed documents pass their position ids and ``PackedSeqParams``."""
    tokens = micro["tokens"]
    position_ids = micro.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, position_ids, None, labels=micro["labels"],
                 packed_seq_params=micro.get("packed_seq_params"))


def moh_aux_losses(model: torch.nn.Module) -> list[torch.Tensor]:
    """The last aux loss of every MoH module (self-attention router or core query router)."""
    out = []
    for mod in model.modules():
        if isinstance(mod, (MoHSelfAttention, MoHCoreAttention)) and mod.last_aux_loss is not None:
            out.append(mod.last_aux_loss)
    return out


class TokenAccuracy:
    """Counts the loss-masked tokens whose greedy prediction (argmax of the logits) is the label, for
    every engine (train/accuracy; MQAR: the recall accuracy over the answers).

    A forward pre-hook on each model chunk that holds the output layer (the last pipeline stage) keeps
    the ``labels`` the engine passes (``[b, s]``, this CP rank's share), a forward hook on the output
    layer turns the logits (``[s, b, vocab / TP]``) into hits ``[b, s]``; the engine takes them right
    after that micro-batch's forward with its loss mask (:meth:`take`), on the device, no host sync.
    Under TP the vocabulary is split: the global argmax is found with one MAX and one SUM all-reduce of
    ``[s, b]`` over the TP group (a tie across ranks counts once)."""

    def __init__(self, chunks: Sequence[torch.nn.Module]) -> None:
        self._labels: Any = None
        self._hits: Any = None
        for chunk in chunks:
            out = getattr(chunk, "output_layer", None)
            if out is not None:
                chunk.register_forward_pre_hook(self._keep_labels, with_kwargs=True)
                out.register_forward_hook(self._count)

    def _keep_labels(self, module: torch.nn.Module, args: Any, kwargs: dict) -> None:
        self._labels = kwargs.get("labels")

    @torch.no_grad()
    def _count(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._labels is None:
            return
        logits = output[0] if isinstance(output, tuple) else output
        labels = self._labels.transpose(0, 1)  # [s, b] as the logits
        best, arg = logits.float().max(dim=-1)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp == 1:
            hits = (arg == labels).float()
        else:
            group = parallel_state.get_tensor_model_parallel_group()
            top = best.clone()
            torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
            start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
            hits = ((best == top) & (arg + start == labels)).float()
            torch.distributed.all_reduce(hits, group=group)
            hits = hits.clamp(max=1.0)
        self._hits, self._labels = hits.transpose(0, 1), None

    def take(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """Correct greedy predictions among ``loss_mask``'s tokens in the last forward (a 0-dim tensor
        on the mask's device; 0 on a stage without the output layer)."""
        hits, self._hits = self._hits, None
        if hits is None:
            return torch.zeros((), device=loss_mask.device)
        return (hits * loss_mask.float()).sum()


def param_device(model: torch.nn.Module | Sequence[torch.nn.Module]) -> torch.device:
    """The device of the model's parameters (every tensor that reaches a collective lives there)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for p in chunk.parameters():
            return p.device
    raise ValueError("the model has no parameters")
