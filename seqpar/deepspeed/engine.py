"""The DeepSpeed engine for the seqpar GPTModel (``train.engine: deepspeed``): ``deepspeed.initialize``
on the model that ``seqpar.train.runtime`` builds, megatron-core's process groups handed over as
``mpu``, one optimizer step (:func:`forward_backward`) and DeepSpeed's checkpoints
(``seqpar.deepspeed.checkpoint``), as :class:`DeepSpeedEngine`, the :class:`seqpar.train.engine.Engine`
that the one training loop (``seqpar.train.loop``) runs. A peer of ``seqpar.train.megatron_engine``: it
imports neither that engine nor the loop.

Process groups (TP x CP x DP from megatron-core's ``parallel_state``) as DeepSpeed sees them through
:class:`MegatronMPU`:

- DeepSpeed's *data-parallel* group is our DP group: the batch arithmetic
  (``train_batch_size = micro x accumulation x DP``) and the DP rank of the data loader.
- The *model-parallel* group is TP (x PP): gradient norms sum the TP shards once, as Megatron does.
- CP is DeepSpeed's *sequence-parallel* group (the slot DeepSpeed-Ulysses uses), so ZeRO's
  partition-and-reduce group is DeepSpeed's *sequence-data-parallel* group = our DP x CP. That is
  exactly the group in which Megatron reduces (and its distributed optimizer shards) gradients:
  every CP rank holds the same parameters and a gradient from its own share of the tokens, so the
  full gradient is the sum over DP x CP. ZeRO never shards or reduces over TP.
  Sharding over DP alone (the other possible reading) would need a second full-size all-reduce over
  CP on top of ZeRO's reduce-scatter and keep CP identical copies of each shard; over DP x CP one
  reduce-scatter does both and the sharded state is divided by DP x CP, as in Megatron's distributed
  optimizer (its ``dp_cp`` group) and DeepSpeed-Ulysses (its sequence-data-parallel group).
  tests/test_deepspeed_engine.py::test_dp2_cp2_four_ranks asserts the groups (CP=2 x DP=2: ZeRO over
  all 4 ranks; TP=2 x CP=2: the 2 CP ranks of each TP rank).

DeepSpeed sums the gradients over DP x CP and divides the sum by :func:`grad_divisor` (DP under
ZeRO 0-2, DP x CP under ZeRO-3); :func:`forward_backward` passes
``grad_divisor x (sum of per-token losses on this rank) / (valid tokens of the global batch)`` with
``scale_wrt_gas=False``, so the reduced gradient is exactly the gradient of the token-weighted mean
over the whole global batch (all micro-batches, DP and CP ranks) — the Megatron engine's loss.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from seqpar.deepspeed.config import batch_shape, build_ds_config, check_engine, require_cpu_accelerator
from seqpar.train.engine import Batch, Engine, StepContext, StepResult
from seqpar.train.runtime import (CPBalance, build_model, build_scheduler, current_device, forward_micro_batch,
                                  global_tokens, micro_batches, modelled_imbalance, moh_aux_losses, param_device)


class MegatronMPU:
    """megatron-core's ``parallel_state`` in the ``mpu`` interface ``deepspeed.initialize(mpu=)``
    reads (Megatron-DeepSpeed's contract, with CP in the sequence-parallel slots; see the module
    docstring). It has no ``initialize_sequence_parallel`` attribute, which DeepSpeed would take for
    its own Ulysses-only mpu."""

    # data parallel: ours (without CP)
    get_data_parallel_group = staticmethod(lambda: ps.get_data_parallel_group())
    get_data_parallel_world_size = staticmethod(lambda: ps.get_data_parallel_world_size())
    get_data_parallel_rank = staticmethod(lambda: ps.get_data_parallel_rank())

    @staticmethod
    def get_data_parallel_group_ranks() -> list[int]:
        return dist.get_process_group_ranks(ps.get_data_parallel_group())

    # model parallel: TP x PP (CP ranks replicate the parameters, so they are not model parallel)
    get_model_parallel_group = staticmethod(lambda: ps.get_model_parallel_group())
    get_model_parallel_world_size = staticmethod(lambda: dist.get_world_size(ps.get_model_parallel_group()))
    get_model_parallel_rank = staticmethod(lambda: dist.get_rank(ps.get_model_parallel_group()))
    get_tensor_model_parallel_group = staticmethod(lambda: ps.get_tensor_model_parallel_group())
    get_tensor_model_parallel_world_size = staticmethod(lambda: ps.get_tensor_model_parallel_world_size())
    get_tensor_model_parallel_rank = staticmethod(lambda: ps.get_tensor_model_parallel_rank())
    get_tensor_model_parallel_src_rank = staticmethod(lambda: ps.get_tensor_model_parallel_src_rank())
    get_pipeline_model_parallel_world_size = staticmethod(lambda: ps.get_pipeline_model_parallel_world_size())
    get_pipeline_model_parallel_rank = staticmethod(lambda: ps.get_pipeline_model_parallel_rank())

    # sequence parallel = our CP; sequence-data parallel = DP x CP (ZeRO's group)
    get_sequence_parallel_group = staticmethod(lambda: ps.get_context_parallel_group())
    get_sequence_parallel_world_size = staticmethod(lambda: ps.get_context_parallel_world_size())
    get_sequence_parallel_rank = staticmethod(lambda: ps.get_context_parallel_rank())
    get_sequence_data_parallel_group = staticmethod(lambda: ps.get_data_parallel_group(with_context_parallel=True))
    get_sequence_data_parallel_world_size = staticmethod(
        lambda: ps.get_data_parallel_world_size(with_context_parallel=True))
    get_sequence_data_parallel_rank = staticmethod(lambda: ps.get_data_parallel_rank(with_context_parallel=True))


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Megatron-core's rule (``get_param_groups``): biases and 1-D parameters are not decayed. The
    shape is the parameter's full one (``ds_shape`` for a ZeRO-3 partitioned parameter)."""
    return len(getattr(param, "ds_shape", param.shape)) == 1 or name.endswith(".bias")


class Schedule:
    """The recipe ``cfg``'s LR / weight-decay schedule on ``optimizer``: megatron's
    OptimizerParamScheduler (the Megatron engine's, build_scheduler) in the client-scheduler interface
    DeepSpeed steps once per optimizer step; optimizer step k runs at num_steps = k + 1. As on the
    Megatron engine, the schedule is this recipe's function of the step: a checkpoint restores the
    step count only (:meth:`load_state_dict`), and ``train`` sets the resumed step's LR with
    :meth:`at_step` after the whole load."""

    def __init__(self, cfg: Any, optimizer: torch.optim.Optimizer) -> None:

        self.sched = build_scheduler(cfg, optimizer)
        self.at_step(0)

    def at_step(self, step: int) -> None:
        """Put the LR and weight decay of optimizer step ``step`` on the optimizer's param groups."""
        self.sched.num_steps = step
        self.sched.step(1)

    def step(self, *_: Any) -> None:
        self.sched.step(1)

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.sched.optimizer.param_groups]

    get_last_lr = get_lr

    def state_dict(self) -> dict:
        return self.sched.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        # DeepSpeed's load_checkpoint calls this. megatron's OptimizerParamScheduler.load_state_dict
        # would *add* the saved num_steps to the count (1 after __init__: every step after a resume
        # one step ahead) and take max_lr / min_lr / warmup / decay steps from the checkpoint instead
        # of the resuming recipe (the Megatron engine follows the recipe: check_resume's contract).
        self.at_step(int(sd["num_steps"]) - 1)


def initialize(cfg: Any, model: torch.nn.Module, ds_config: dict[str, Any]):
    """``deepspeed.initialize`` on ``model`` with ``ds_config``, our groups as ``mpu`` and the
    Megatron engine's LR schedule (:class:`Schedule`) as the client scheduler. Returns the engine."""
    require_cpu_accelerator()
    import deepspeed

    if "LOCAL_RANK" not in os.environ:
        # DeepSpeed asserts on it; launchers (deepspeed, torchrun) set it. A process group started
        # without one (a file:// rendezvous, tests) is single-host: the local rank is the global rank.
        os.environ["LOCAL_RANK"] = str(dist.get_rank())
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    mpu = MegatronMPU()
    if ds_config["zero_optimization"]["stage"] == 3:
        # Partition the parameters over DP x CP (the group the ZeRO-3 optimizer reduce-scatters over)
        # before initialize: left to itself, initialize would partition them over
        # mpu.get_data_parallel_group() (DP only) while the optimizer shards over the
        # sequence-data-parallel group, and the two disagree whenever CP > 1.
        deepspeed.zero.Init(module=model, data_parallel_group=MegatronMPU.get_sequence_data_parallel_group(),
                            config_dict_or_path=ds_config, mpu=mpu)
    # megatron's parameter groups: biases and 1-D parameters (norms) get no weight decay (wd_mult 0 for
    # the schedule, which sets weight_decay = wd x wd_mult each step). The rule reads the full shape:
    # after deepspeed.zero.Init (ZeRO-3) every parameter is an empty placeholder of shape [0] with its
    # real shape in ds_shape, so p.shape would put every matrix in the no-decay group.
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_wd = [p for n, p in named if _no_weight_decay(n, p)]
    wd = [p for n, p in named if not _no_weight_decay(n, p)]
    groups = [g for g in ({"params": wd, "wd_mult": 1.0, "lr_mult": 1.0},
                          {"params": no_wd, "wd_mult": 0.0, "lr_mult": 1.0, "weight_decay": 0.0}) if g["params"]]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config, mpu=mpu,
                                           lr_scheduler=functools.partial(Schedule, cfg))
    if ds_config["zero_optimization"]["stage"] == 3:
        from seqpar.nn import MoHRouter

        # ZeRO-3 re-gathers a module's parameters for backward through hooks on the module's tensor
        # outputs; the MoH router returns a MoHRouting dataclass, which those hooks do not see. Its
        # parameters are registered with the module that calls it (whose output is a tensor).
        for mod in engine.module.modules():
            for child in mod.children():
                if isinstance(child, MoHRouter):
                    for p in child.parameters():
                        deepspeed.zero.register_external_parameter(mod, p)
    return engine


def grad_divisor(engine: Any) -> int:
    """What DeepSpeed divides the sum of the DP x CP ranks' gradients by, so that the loss can be
    scaled to undo it exactly.

    ZeRO 0-2 average over DP: their reductions divide by ``world(DP x CP) / sequence_parallel_size``.
    ZeRO-3 averages over its whole partition group DP x CP: its gradient reduce-scatter
    (``DeepSpeedZeroOptimizer_Stage3.__avg_scatter_grads`` -> ``reduce_scatter_coalesced``, the path of
    ``zero_optimization.reduce_scatter: true``, which the recipe's ds_config pins for ZeRO-3) pre-divides
    by the group's size and ignores the sequence-parallel size (DeepSpeed 0.19). With the DP divisor a
    ZeRO-3 gradient came out CP times too small: invisible to AdamW's update (scale-invariant up to
    ``eps``) until the global norm crosses ``optim.grad_clip`` — the clip then fires at CP x the
    threshold — so the losses drifted from the Megatron engine's (6e-4 at CP=2 by step 4) and the
    logged ``train/grad_norm`` was 1/CP of the true norm."""
    if engine.zero_optimization_stage() == 3:
        return ps.get_data_parallel_world_size(with_context_parallel=True)
    return ps.get_data_parallel_world_size()


def forward_backward(engine: Any, micro_batches: list[dict[str, torch.Tensor]], accuracy: Any = None):
    """Forward, backward and ``engine.step()`` for one optimizer step made of ``micro_batches``
    (this rank's, already CP-split; as many as the engine's gradient accumulation steps). Returns
    the step's :class:`seqpar.train.engine.StepResult` (identical on every rank); ``accuracy`` (a
    ``seqpar.train.runtime.TokenAccuracy`` on the model) adds the step's greedy accuracy."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    if len(micro_batches) != engine.gradient_accumulation_steps():
        raise ValueError(f"{len(micro_batches)} micro-batches for {engine.gradient_accumulation_steps()} "
                         f"gradient accumulation steps")
    # every tensor of the step's collectives and stacks lives on the parameters' device (NCCL takes
    # no host tensor; a stack of a device and a host tensor raises)
    device = param_device(engine.module)
    dpcp = ps.get_data_parallel_group(with_context_parallel=True)
    dp = ps.get_data_parallel_world_size()
    div = grad_divisor(engine)
    counts = global_tokens(micro_batches, device)  # valid tokens of the global batch, over DP x CP
    total = counts.clamp(min=1.0)
    # the aux loss's gradient does not pass through the main loss: DeepSpeed divides by `div`, so scale
    # (div / DP) / micro-batches gives Megatron's mean over micro-batches and DP replicas
    MoEAuxLossAutoScaler.set_loss_scale(torch.full((), div / dp / len(micro_batches), device=device))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    aux_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    for batch in micro_batches:
        mask = batch["loss_mask"].float()
        per_token = forward_micro_batch(engine, batch)  # [b, s_local]
        if accuracy is not None:
            correct = correct + accuracy.take(batch["loss_mask"])
        local = (per_token.float() * mask).sum()
        engine.backward(local * (div / total), scale_wrt_gas=False)
        engine.step()  # DeepSpeed steps the optimizer (and the LR) at the accumulation boundary only
        loss_sum += local.detach().double()
        aux = moh_aux_losses(engine.module)
        if aux:
            aux_sum += torch.stack([a.detach().float() for a in aux]).sum()
    # the loss and the correct predictions: sums over DP x CP; the aux loss's mean over micro-batches
    vals = torch.stack([loss_sum.float(), correct, aux_sum / len(micro_batches)])
    dist.all_reduce(vals[:2], group=dpcp)
    if dp > 1:  # aux losses are replicated over CP, one per DP replica
        aux_t = vals[2:].clone()
        dist.all_reduce(aux_t, group=ps.get_data_parallel_group())
        vals[2:] = aux_t / dp
    return StepResult(loss=float(vals[0] / total), aux_loss=float(vals[2]), tokens=int(counts),
                      accuracy=float(vals[1] / total) if accuracy is not None else None)


class DeepSpeedEngine(Engine):
    """One rank's DeepSpeed engine (ZeRO 0-3, optional CPU offload) for the recipe, run by the one loop."""

    name = "deepspeed"
    log_prefix = "[seqpar.deepspeed]"
    progress_desc = "train[deepspeed]"
    skips_steps = False  # refused by check_supported: DeepSpeed has stepped before the loss is known

    def __init__(self, cfg: Any, model: torch.nn.Module, engine: Any, micro: int) -> None:
        self.cfg, self.model, self.engine, self.micro = cfg, model, engine, micro
        self.balance = CPBalance.of(cfg)  # parallel.cp_balance with the model's cost model, built once

    @classmethod
    def check(cls, cfg: Any, dp: Optional[int] = None) -> None:
        """Refused combinations (pipeline parallelism, skipping non-finite steps); with ``dp`` also the
        whole ds_config (the recipe's merged with the user's JSON, validated by DeepSpeed)."""
        check_engine(cfg, dp)

    @classmethod
    def memory_plan(cls, cfg: Any, dp: int) -> dict[str, Any]:
        """The ZeRO stage and offloads of the ds_config that would run (recipe + ``deepspeed.config``)."""
        from seqpar.train.memory import bytes_entry, zero_bytes_per_param

        n = dp * cfg.parallel.context_parallel
        zero = build_ds_config(cfg, dp)["zero_optimization"]
        where = {k: zero.get(f"offload_{k}", {}).get("device", "none") for k in ("optimizer", "param")}
        per = zero_bytes_per_param(zero["stage"], cfg.model.dtype == "bf16", n,
                                   offload_optimizer=where["optimizer"] != "none", offload_param=where["param"] != "none")
        return {"engine": "deepspeed", "zero_stage": zero["stage"], "zero_ranks": n, "offload": where,
                "distributed_optimizer": None, "bytes_per_param": bytes_entry(*per)}

    @classmethod
    def build(cls, cfg: Any, vocab_size: int) -> "DeepSpeedEngine":
        """The recipe's model (one chunk: the DeepSpeed engine runs without pipeline parallelism) in
        ``deepspeed.initialize`` with the ds_config for the current DP size."""
        dp = ps.get_data_parallel_world_size()
        ds_config = build_ds_config(cfg, dp)
        micro, _ = batch_shape(cfg, dp)
        # DeepSpeed's device: init_parallel made LOCAL_RANK's GPU the current one
        model = build_model(cfg, vocab_size, current_device())[0]
        return cls(cfg, model, initialize(cfg, model, ds_config), micro)

    @property
    def summary_head(self) -> str:
        return f"{self.log_prefix} ZeRO-{self.cfg.deepspeed.zero_stage},"

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    @property
    def device(self) -> torch.device:
        return current_device()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def train_step(self, batch: Batch, ctx: StepContext) -> StepResult:
        """Forward, backward and DeepSpeed's step (which applies the update at the accumulation
        boundary); ``ctx.accept`` sees the loss and grad norm afterwards and can only stop the run."""
        lr = self.engine.get_lr()[0]
        batches = micro_batches(batch, self.micro, self.balance)
        with ctx.forward_backward():
            res = forward_backward(self.engine, batches, ctx.accuracy)
        gnorm = self.engine.get_global_grad_norm()
        ctx.accept(res.loss, 0.0 if gnorm is None else float(gnorm))
        return dataclasses.replace(res, lr=lr, grad_norm=None if gnorm is None else float(gnorm),
                                   cp_imbalance=modelled_imbalance(batches, self.balance))

    def eval_step(self, batch: Batch) -> StepResult:
        """Forward only of the micro-batches through the DeepSpeed engine (ZeRO-3 gathers the
        parameters as in training); the token-weighted loss over DP x CP."""
        micro = micro_batches(batch, self.micro, self.balance)
        device = param_device(self.engine.module)
        counts = global_tokens(micro, device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for mb in micro:
            loss_sum += (forward_micro_batch(self.engine, mb).float() * mb["loss_mask"].float()).sum().double()
        dist.all_reduce(loss_sum, group=ps.get_data_parallel_group(with_context_parallel=True))
        return StepResult(loss=float(loss_sum / counts.clamp(min=1.0)), aux_loss=0.0, tokens=int(counts))

    def save(self, ckpt_dir: pathlib.Path, step: int, *, rng: Any, config: dict[str, Any],
             tokenizer: Any = None) -> pathlib.Path:
        from seqpar.deepspeed import checkpoint

        return checkpoint.save(self.engine, ckpt_dir, step, rng=rng, config=config,
                               keep_last=self.cfg.train.keep_last, tokenizer=tokenizer)

    def load(self, path: pathlib.Path, *, config: dict[str, Any]) -> dict[str, Any]:
        from seqpar.deepspeed import checkpoint

        # verified by the loop (seqpar.train.checkpoint.resumable) just before, so load() skips its own
        # hash pass; refuses a model change / finished run
        state = checkpoint.load(self.engine, path, config=config, verified=True)
        # ZeRO 1-3 restore the optimizer's param groups (the checkpoint's LR / weight decay) after the
        # schedule: this recipe's values of the resumed step, as the Megatron engine's scheduler.step(step)
        self.engine.lr_scheduler.at_step(state["step"])
        return state

    def close(self) -> None:
        self.engine.destroy()
