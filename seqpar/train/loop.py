"""The training loop on megatron-core's engine: the model as DistributedDataParallel chunks (bucketed
fp32 gradient reduction over DP x CP, overlapped with backward), megatron's optimizer (fp32 main
weights; the distributed optimizer shards them and the Adam moments over DP x CP) with its grad-norm
clipping and ``OptimizerParamScheduler``, the pipeline schedule of ``get_forward_backward_func``,
activation recompute, tensorboard scalars, a tqdm bar on rank 0, atomic checkpoints and exact resume.

Entry points (other engines and hooks use them): ``build_data``, ``build_model`` (this rank's
pipeline stage, bare modules), ``wrap_ddp``, ``build_optimizer``, ``build_engine`` (all of it) and
``train_step`` (one optimizer step); ``train`` is the loop.
"""

from __future__ import annotations

import pathlib
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import random as tp_random
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from seqpar.megatron import init_parallel
from seqpar.megatron.specs import layer_specs_for_stage
from seqpar.models import build_gpt, transformer_config
from seqpar.train import checkpoint, health, signals
from seqpar.train.config import RunConfig
from seqpar.train.step import StepResult, forward_backward, micro_batches, optimizer_step, param_device


def build_data(cfg: RunConfig):
    """Dataset and vocabulary size (the tokenizer is trained once by rank 0, then loaded by all)."""
    from seqpar.data import MQARDataset, PackedTextDataset, corpus_summary, get_tokenizer, load_documents, load_text

    d = cfg.data
    if d.dataset == "mqar":
        return MQARDataset(d.vocab_size, d.seq_len, d.mqar_pairs, d.mqar_queries, seed=cfg.train.seed), d.vocab_size
    text = load_text(d.text_files, d.max_bytes)
    cache = d.cache_dir or None
    if dist.get_rank() == 0:
        get_tokenizer(d.vocab_size, text, cache)
    dist.barrier()
    sp = get_tokenizer(d.vocab_size, text, cache)
    docs = load_documents(d.text_files, d.max_bytes)  # each document followed by EOS
    ds = PackedTextDataset.from_documents(sp, docs, d.seq_len, seed=cfg.train.seed)
    if dist.get_rank() == 0:  # what max_bytes lets in, never cut silently
        print(f"[seqpar.train] {corpus_summary(d.text_files, d.max_bytes, docs, ds.ids.numel(), d.seq_len)}",
              flush=True)
    ds.tokenizer_model = sp.serialized_model_proto()  # saved in every checkpoint (export needs it)
    return ds, sp.vocab_size()


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
        s2_vert_stride=m.s2_vert_stride, moh_num_shared_heads=m.moh_num_shared_heads, moh_top_k=m.moh_top_k,
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
    depends only on the module's place in the full model, not on the pipeline / tensor split."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_of(seed, name))
        yield


def _seeded_layer_class(seed: int, base: type) -> type:
    """``base`` (the spec's layer class, megatron's TransformerLayer) seeded by its global layer number."""
    if not issubclass(base, TransformerLayer):
        raise TypeError(f"layer spec module {base.__name__} is not a megatron TransformerLayer")

    class SeededTransformerLayer(base):
        """The layer initialised from its *global* layer number: a stage of a pipeline-parallel model
        starts with exactly the layers of the one-stage model."""

        def __init__(self, config, submodules, layer_number: int = 1, *args: Any, **kwargs: Any) -> None:
            pg = kwargs.get("pg_collection")
            pp_rank = pg.pp.rank() if pg is not None and getattr(pg, "pp", None) is not None else None
            global_number = layer_number + get_transformer_layer_offset(config, kwargs.get("vp_stage"), pp_rank)
            with _seeded(seed, f"layer{global_number}"):
                super().__init__(config, submodules, layer_number, *args, **kwargs)

    return SeededTransformerLayer


def _reinit_output_layer(model: torch.nn.Module, seed: int) -> None:
    """The output layer is built after the stage's layers; on the last stage of a pipeline the CPU
    generator has not drawn the embedding then, so draw it from its own seed (CPU init is megatron's
    master-weight-then-split, identical at any TP size)."""
    out = getattr(model, "output_layer", None)
    if out is None or not model.config.use_cpu_initialization:
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


def build_model(cfg: RunConfig, vocab_size: int) -> list[torch.nn.Module]:
    """This rank's pipeline stage of the recipe's ``GPTModel`` as a list of model chunks (one; the
    megatron-core modules, not yet DDP-wrapped), with the recipe's dtype. Initialisation is
    layout-independent: with the same seed every TP x PP split holds the slices of the same model."""
    _check_groups(cfg)
    tcfg = model_config(cfg)
    p = _preset(cfg)
    spec = layer_specs_for_stage(p.pattern, tcfg)
    seeded: dict[type, type] = {}
    for s in spec.layer_specs:
        if s.module not in seeded:
            seeded[s.module] = _seeded_layer_class(cfg.train.seed, s.module)
        s.module = seeded[s.module]
    with _seeded(cfg.train.seed, "embedding"):
        model = build_gpt(p, tcfg, vocab_size=vocab_size, max_sequence_length=cfg.data.seq_len, spec=spec,
                          pre_process=parallel_state.is_pipeline_first_stage(),
                          post_process=parallel_state.is_pipeline_last_stage())
    _reinit_output_layer(model, cfg.train.seed)
    return [model.to(tcfg.params_dtype)]


def ddp_config(cfg: RunConfig) -> DistributedDataParallelConfig:
    """megatron-core DDP: fp32 gradient buffers reduced over DP x CP in buckets (overlapped with
    backward where parallel.overlap_grad_reduce), reduce-scatter for the distributed optimizer."""
    return DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
                                         use_distributed_optimizer=use_distributed_optimizer(cfg),
                                         check_for_nan_in_grad=False, bucket_size=None)


def use_distributed_optimizer(cfg: RunConfig) -> bool:
    """optim.distributed, or (null) on when the DP x CP group has more than one rank."""
    if cfg.optim.distributed is not None:
        return cfg.optim.distributed
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1
    raise ValueError("optim.distributed=null needs the process groups (DP x CP size)")


def wrap_ddp(cfg: RunConfig, chunks: list[torch.nn.Module]) -> list[DistributedDataParallel]:
    """The chunks in megatron-core DDP with the recipe's ``ddp_config``."""
    return ddp_wrap(chunks, ddp_config(cfg))


def ddp_wrap(chunks: list[torch.nn.Module], config: DistributedDataParallelConfig) -> list[DistributedDataParallel]:
    """Wrap model chunks in megatron-core DDP and point their model config at DDP's no_sync and
    ``finalize_model_grads`` (what megatron's schedules call after the last micro-batch)."""
    ddp = [DistributedDataParallel(c.config, config, c, disable_bucketing=i > 0) for i, c in enumerate(chunks)]
    tcfg = chunks[0].config
    tcfg.no_sync_func = ddp[0].no_sync if len(ddp) == 1 else [d.no_sync for d in ddp]
    tcfg.finalize_model_grads_func = finalize_model_grads
    return ddp


def optimizer_config(cfg: RunConfig) -> OptimizerConfig:
    """megatron ``OptimizerConfig`` of the recipe: AdamW (decoupled decay; megatron's parameter groups
    give biases and 1-D parameters such as norms no decay), fp32 main weights for bf16 models."""
    o = cfg.optim
    bf16 = cfg.model.dtype == "bf16"
    return OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                           adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=1e-8, clip_grad=o.grad_clip,
                           bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                           use_distributed_optimizer=use_distributed_optimizer(cfg))


def build_optimizer(cfg: RunConfig, model: list[DistributedDataParallel]):
    """megatron's optimizer over the DDP chunks and its ``OptimizerParamScheduler``: linear warmup to
    optim.lr over optim.warmup_steps, then cosine to optim.min_lr at train.steps; the LR of optimizer
    step k (0-based) is the scheduler's at ``num_steps = k + 1`` (the first step does not run at 0)."""
    opt = get_megatron_optimizer(optimizer_config(cfg), model)
    return opt, build_scheduler(cfg, opt)


def build_scheduler(cfg: RunConfig, opt) -> OptimizerParamScheduler:
    """The recipe's LR / weight-decay schedule on ``opt`` (also used to report LR changes on resume)."""
    o = cfg.optim
    return OptimizerParamScheduler(opt, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
                                   lr_decay_steps=max(cfg.train.steps, o.warmup_steps + 1), lr_decay_style="cosine",
                                   start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=cfg.train.steps,
                                   wd_incr_style="constant")


@dataclass
class Engine:
    """Everything one rank trains with."""

    model: list[DistributedDataParallel]
    """This rank's pipeline stage (chunks) in megatron-core DDP."""
    optimizer: Any
    """megatron-core optimizer (``DistributedOptimizer``, ``Float16OptimizerWithFloat16Params`` or
    ``FP32Optimizer``)."""
    scheduler: OptimizerParamScheduler
    """LR / weight-decay schedule."""
    micro_batch: int
    """Sequences per micro-batch (data.micro_batch, 0 = whole DP share)."""


def build_engine(cfg: RunConfig, vocab_size: int) -> Engine:
    """Model stage + DDP + optimizer + schedule for the current process groups."""
    model = wrap_ddp(cfg, build_model(cfg, vocab_size))
    opt, sched = build_optimizer(cfg, model)
    return Engine(model, opt, sched, cfg.data.micro_batch)


def train_step(engine: Engine, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *,
               monitor: Optional[health.HealthMonitor] = None, step: int = 0) -> StepResult:
    """One optimizer step on this DP rank's ``[b, seq]`` share of the global batch (split into
    micro-batches and CP shares here). ``monitor`` (the run's NaN/inf checks): guards the forward /
    backward of 0-based ``step`` and may veto the update after seeing the loss and the grad norm
    (``res.updated`` False)."""
    for chunk in engine.model:
        chunk.zero_grad_buffer()
    engine.optimizer.zero_grad()
    batches = micro_batches(tokens, labels, mask, engine.micro_batch)
    if monitor is None:
        res = forward_backward(engine.model, batches)
        check = None
    else:
        with monitor.guard(step):
            res = forward_backward(engine.model, batches)
        check = lambda grad_norm: monitor.check(step, res.loss, grad_norm)  # noqa: E731
    res.grad_norm, res.lr, res.updated = optimizer_step(engine.optimizer, engine.scheduler, check)
    return res


class AttentionTimer:
    """Forward wall time per attention kind (hooks on the seqpar attention modules; on CUDA each
    measurement synchronises, so it is off unless train.time_attention is set)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from seqpar.megatron.attention import (LightningSelfAttention, MoHCoreAttention, S2CoreAttention,
                                               SoftmaxCoreAttention)

        kinds = {SoftmaxCoreAttention: "softmax", S2CoreAttention: "s2", MoHCoreAttention: "moh",
                 LightningSelfAttention: "lightning"}
        self.totals: dict[str, float] = {}
        self._start: dict[int, float] = {}
        for mod in model.modules():
            kind = next((k for cls, k in kinds.items() if isinstance(mod, cls)), None)
            if kind is not None:
                mod.register_forward_pre_hook(self._pre)
                mod.register_forward_hook(lambda m, i, o, kind=kind: self._post(m, kind))

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _pre(self, mod: torch.nn.Module, inputs: Any) -> None:
        self._sync()
        self._start[id(mod)] = time.perf_counter()

    def _post(self, mod: torch.nn.Module, kind: str) -> None:
        self._sync()
        self.totals[kind] = self.totals.get(kind, 0.0) + time.perf_counter() - self._start.pop(id(mod))

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def _rng_state() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(), "tracker": tp_random.get_cuda_rng_tracker().get_states(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["cpu"])
    tp_random.get_cuda_rng_tracker().set_states(s["tracker"])
    if s.get("cuda") is not None:
        torch.cuda.set_rng_state(s["cuda"])


def _tensorboard_cmd() -> str:
    """``tensorboard`` next to this interpreter (the venv's) when it is there, else the bare name."""
    exe = pathlib.Path(sys.executable).parent / "tensorboard"
    return str(exe) if exe.exists() else "tensorboard"


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _batch(data: Any, step: int, cfg: RunConfig, device: torch.device) -> tuple[torch.Tensor, ...]:
    """This DP rank's ``[global_batch / DP, seq]`` share of step ``step`` (tokens, labels, loss mask)."""
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    return tuple(t.to(device) for t in data.batch(step, cfg.data.global_batch, dp_rank, dp))


class Logger:
    """tensorboard scalars, the tqdm bar and the end-of-run summary, on global rank 0 (every rank
    holds the step's scalars). Shared by both engines (``desc``: the bar's label, ``head``: the
    summary's first words)."""

    def __init__(self, cfg: RunConfig, out: pathlib.Path, start: int, *, desc: str = "train",
                 head: str = "[seqpar.train]") -> None:
        self.cfg, self.writer, self.bar, self.head = cfg, None, None, head
        if dist.get_rank() == 0:
            from torch.utils.tensorboard import SummaryWriter
            # scalars of step s are logged at s + 1, so the checkpoint's own last point (start) is kept
            self.writer = SummaryWriter(str(out / "tb"), purge_step=start + 1)
            if cfg.train.progress:
                from tqdm import tqdm
                self.bar = tqdm(total=cfg.train.steps, initial=start, desc=desc, dynamic_ncols=True)

    def log(self, step: int, res: StepResult, dt: float, timer: Optional["AttentionTimer"],
            skipped: Optional[int] = 0) -> None:
        """Scalars of ``step`` every ``train.log_every`` steps; a ``None`` (``res.grad_norm`` when the
        engine reports none, ``skipped`` where steps are never skipped) is not logged."""
        if self.writer is not None and (step + 1) % self.cfg.train.log_every == 0:
            for k, v in {"loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm, "aux_loss": res.aux_loss,
                         "tokens_per_s": res.tokens / dt, "skipped_steps": skipped}.items():
                if v is not None:
                    self.writer.add_scalar(f"train/{k}", v, step + 1)
            for kind, sec in (timer.pop() if timer else {}).items():
                self.writer.add_scalar(f"attention_fwd_ms/{kind}", 1e3 * sec, step + 1)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{res.loss:.3f}", aux=f"{res.aux_loss:.3g}", lr=f"{res.lr:.2e}")

    def close(self, start: int, end: int, losses: list[float], ckpt_dir: pathlib.Path, out: pathlib.Path) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is None:
            return
        self.writer.close()
        w = max(1, min(10, len(losses) // 4))  # mean of the first / last few steps: the trend, not noise
        trend = (f"loss {sum(losses[:w]) / w:.4f} (first {w} steps) -> {sum(losses[-w:]) / w:.4f} (last {w})"
                 if losses else "no steps run")
        print(f"{self.head} steps {start}->{end}, {trend}\n"
              f"  checkpoint:  {checkpoint.latest(ckpt_dir)}\n"
              f"  export (HF): {sys.executable} -m seqpar.export.hf {out} {out / 'hf'}\n"
              f"  tensorboard: {_tensorboard_cmd()} --logdir {out / 'tb'}", flush=True)


def _resume(engine: Engine, ckpt_dir: pathlib.Path, cfg: RunConfig) -> int:
    """Load the newest intact checkpoint under ``ckpt_dir`` (manifest-verified, recipe compared) into
    the engine; returns its step."""
    path = checkpoint.resumable(ckpt_dir, cfg.train.on_corrupt_checkpoint)
    state = checkpoint.load(path, engine.model, engine.optimizer, config=cfg.to_dict())
    if state["rng"] is not None:
        _set_rng_state(state["rng"])
    elif dist.get_rank() == 0:
        print(f"[seqpar.train] {path} was written with parallel layout {state['layout']}; "
              f"RNG states not restored (they are per rank)", flush=True)
    engine.scheduler.step(state["step"])  # the schedule is a function of the step (build_optimizer)
    return state["step"]


def train(cfg: RunConfig, *, resume: bool = False, stop_after: Optional[int] = None) -> list[float]:
    """Run the recipe; returns the per-step losses of this run (identical on every rank).

    ``resume`` continues from ``<out_dir>/checkpoints/latest``. ``stop_after`` ends (with a
    checkpoint) after that many steps of this run, e.g. to test resume.
    """
    if cfg.train.engine == "deepspeed":  # h13-deepspeed: engine switch
        from seqpar.deepspeed import train as train_deepspeed
        return train_deepspeed(cfg, resume=resume, stop_after=stop_after)
    world = dist.get_world_size() if dist.is_initialized() else None
    if world is not None:
        cfg.check_world(world)
    par = cfg.parallel
    init_parallel(par.tensor_parallel, par.context_parallel, par.pipeline_parallel, seed=cfg.train.seed,
                  timeout_s=par.distributed_timeout_s)
    try:
        losses = _train(cfg, resume, stop_after)
    finally:
        parallel_state.destroy_model_parallel()
    signals.raise_if_stopped()  # SystemExit(signals.EXIT_INTERRUPTED) after a signal stopped the loop
    return losses


def _train(cfg: RunConfig, resume: bool, stop_after: Optional[int]) -> list[float]:
    data, vocab = build_data(cfg)
    engine = build_engine(cfg, vocab)
    out = pathlib.Path(cfg.train.out_dir)
    ckpt_dir = out / "checkpoints"
    checkpoint.prepare_out_dir(out, resume=resume, overwrite=cfg.train.overwrite)  # h16: no silent mixing of runs
    start = _resume(engine, ckpt_dir, cfg) if resume else 0
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    logger = Logger(cfg, out, start)
    device = param_device(engine.model)
    timer = AttentionTimer(engine.model[0]) if cfg.train.time_attention else None
    # h16: NaN/inf stop or skip; on the bare chunks so that names are the model's (not DDP's "module.")
    monitor = health.HealthMonitor.from_config(cfg, [getattr(c, "module", c) for c in engine.model])
    losses = []
    for chunk in engine.model:
        chunk.train()
    for step in range(start, end):
        t0 = time.perf_counter()
        res = train_step(engine, *_batch(data, step, cfg, device), monitor=monitor, step=step)
        losses.append(res.loss)
        logger.log(step, res, time.perf_counter() - t0, timer, monitor.skipped)
        stop = signals.stop_requested()  # a SIGTERM/SIGUSR1/SIGINT on any rank: save now, then exit (all ranks)
        last = step + 1 == end or stop
        saved = None
        if last or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
            if logger.writer is not None:  # h16: the scalars up to a checkpoint are on disk before it is `latest`
                logger.writer.flush()
            saved = checkpoint.save(ckpt_dir, step + 1, engine.model, engine.optimizer, rng=_rng_state(),
                                    config=cfg.to_dict(), tokenizer_model=getattr(data, "tokenizer_model", None))
        if stop:
            signals.stopped(step + 1, saved)
            break
    logger.close(start, end, losses, ckpt_dir, out)
    return losses
