"""The Megatron engine (``train.engine: megatron``): the model stage as megatron-core
``DistributedDataParallel`` chunks (bucketed fp32 gradient reduction over DP x CP, overlapped with
backward), megatron's optimizer (fp32 main weights; the distributed optimizer shards them and the Adam
moments over DP x CP) with its grad-norm clipping and ``OptimizerParamScheduler``, the pipeline
schedule of ``get_forward_backward_func`` (``seqpar.train.step``), activation recompute, and
megatron's distributed checkpoints (``seqpar.train.checkpoint``).

Entry points: :class:`MegatronEngine` (the :class:`seqpar.train.engine.Engine` the loop runs),
``wrap_ddp`` / ``ddp_wrap``, ``build_optimizer``, ``build_engine`` (all of it for the current process
groups) and ``train_step`` (one optimizer step on a ``[b, seq]`` batch, for tests and benchmarks).
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from seqpar.megatron.optimizer import get_optimizer
from seqpar.train import checkpoint, health
from seqpar.train.config import RunConfig
from seqpar.train.engine import Batch, Engine, StepContext, StepResult
from seqpar.train.runtime import (ZIGZAG, CPBalance, build_model, build_scheduler, micro_batches, modelled_imbalance,
                                  param_device)
from seqpar.train.step import forward_backward, optimizer_step


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
    step k (0-based) is the scheduler's at ``num_steps = k + 1`` (the first step does not run at 0).
    Built by ``seqpar.megatron.optimizer.get_optimizer`` (torch AdamW's ``step`` survives a resume)."""
    opt = get_optimizer(optimizer_config(cfg), model)
    return opt, build_scheduler(cfg, opt)



@dataclass
class MegatronEngine(Engine):
    """Everything one rank trains with on megatron-core."""

    name = "megatron"
    skips_steps = True  # the update is vetoed before it is applied (optimizer_step's check)

    model: list[DistributedDataParallel]
    """This rank's pipeline stage (chunks) in megatron-core DDP."""
    optimizer: Any
    """megatron-core optimizer (``DistributedOptimizer``, ``Float16OptimizerWithFloat16Params`` or
    ``FP32Optimizer``)."""
    scheduler: OptimizerParamScheduler
    """LR / weight-decay schedule."""
    micro_batch: int
    """Sequences per micro-batch (data.micro_batch, 0 = whole DP share)."""
    balance: CPBalance = ZIGZAG
    """How each micro-batch's tokens are placed on the CP ranks (parallel.cp_balance, with the model's
    cost model)."""

    @classmethod
    def memory_plan(cls, cfg: RunConfig, dp: int) -> dict[str, Any]:
        from seqpar.train.memory import bytes_entry, bytes_per_param

        cp = cfg.parallel.context_parallel
        distributed = cfg.optim.distributed if cfg.optim.distributed is not None else dp * cp > 1
        return {"engine": "megatron", "zero_stage": None, "zero_ranks": None, "offload": None,
                "distributed_optimizer": distributed,
                "bytes_per_param": bytes_entry(*bytes_per_param(cfg.model.dtype == "bf16", distributed, dp * cp))}

    @classmethod
    def build(cls, cfg: RunConfig, vocab_size: int) -> "MegatronEngine":
        """Model stage + DDP + optimizer + schedule for the current process groups."""
        model = wrap_ddp(cfg, build_model(cfg, vocab_size))
        opt, sched = build_optimizer(cfg, model)
        return cls(model, opt, sched, cfg.data.micro_batch, CPBalance.of(cfg))

    @property
    def modules(self) -> list[torch.nn.Module]:
        # the bare chunks, so that names are the model's (not DDP's "module.")
        return [getattr(c, "module", c) for c in self.model]

    @property
    def device(self) -> torch.device:
        return param_device(self.model)

    def train(self, mode: bool = True) -> None:
        for chunk in self.model:
            chunk.train(mode)

    def train_step(self, batch: Batch, ctx: StepContext) -> StepResult:
        """One optimizer step on this DP rank's ``[b, seq]`` share of the global batch (split into
        micro-batches and CP shares here); ``ctx.accept`` may veto the update after seeing the loss and
        the grad norm (``res.updated`` False)."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = micro_batches(batch, self.micro_batch, self.balance)
        with ctx.forward_backward():
            res = forward_backward(self.model, batches, accuracy=ctx.accuracy)
        res.cp_imbalance = modelled_imbalance(batches, self.balance)
        res.grad_norm, res.lr, res.updated = optimizer_step(self.optimizer, self.scheduler,
                                                            lambda grad_norm: ctx.accept(res.loss, grad_norm))
        return res

    def eval_step(self, batch: Batch) -> StepResult:
        """Forward only through megatron's schedule (1F1B's forward-only path under PP)."""
        return forward_backward(self.model, micro_batches(batch, self.micro_batch, self.balance), forward_only=True)

    def save(self, ckpt_dir: pathlib.Path, step: int, *, rng: Any, config: dict[str, Any],
             tokenizer: Any = None) -> pathlib.Path:
        return checkpoint.save(ckpt_dir, step, self.model, self.optimizer, rng=rng, config=config,
                               tokenizer=tokenizer)

    def load(self, path: pathlib.Path, *, config: dict[str, Any]) -> dict[str, Any]:
        state = checkpoint.load(path, self.model, self.optimizer, config=config)
        self.scheduler.step(state["step"])  # the schedule is a function of the step (build_optimizer)
        return state


def build_engine(cfg: RunConfig, vocab_size: int) -> MegatronEngine:
    """Model stage + DDP + optimizer + schedule for the current process groups."""
    return MegatronEngine.build(cfg, vocab_size)


def train_step(engine: MegatronEngine, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *,
               monitor: Optional[health.HealthMonitor] = None, step: int = 0) -> StepResult:
    """One optimizer step on this DP rank's ``[b, seq]`` share of the global batch (split into
    micro-batches and CP shares here). ``monitor`` (the run's NaN/inf checks): guards the forward /
    backward of 0-based ``step`` and may veto the update after seeing the loss and the grad norm
    (``res.updated`` False)."""
    return engine.train_step(Batch(tokens, labels, mask), StepContext(step, monitor))
