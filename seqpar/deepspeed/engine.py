"""The DeepSpeed engine for the seqpar GPTModel: ``deepspeed.initialize`` on the model that
``seqpar.train`` builds, megatron-core's process groups handed over as ``mpu``, and the training loop
of ``train.engine: deepspeed``.

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

DeepSpeed sums the CP replicas and divides by the DP size; :func:`forward_backward` passes
``DP x (sum of per-token losses on this rank) / (valid tokens of the global batch)`` with
``scale_wrt_gas=False``, so the reduced gradient is exactly the gradient of the token-weighted mean
over the whole global batch (all micro-batches, DP and CP ranks) — the Megatron engine's loss.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from seqpar.deepspeed.config import require_cpu_accelerator


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


def initialize(cfg: Any, model: torch.nn.Module, ds_config: dict[str, Any]):
    """``deepspeed.initialize`` on ``model`` with ``ds_config``, our groups as ``mpu`` and the
    Megatron engine's LR schedule (``build_scheduler``) as the client scheduler. Returns the engine."""
    require_cpu_accelerator()
    import deepspeed

    from seqpar.train.loop import build_scheduler

    class Schedule:
        """megatron's OptimizerParamScheduler (the Megatron engine's, build_scheduler) in the interface
        DeepSpeed steps once per optimizer step; optimizer step k runs at num_steps = k + 1."""

        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.sched = build_scheduler(cfg, optimizer)
            self.sched.step(1)

        def step(self, *_: Any) -> None:
            self.sched.step(1)

        def get_lr(self) -> list[float]:
            return [g["lr"] for g in self.sched.optimizer.param_groups]

        get_last_lr = get_lr

        def state_dict(self) -> dict:
            return self.sched.state_dict()

        def load_state_dict(self, sd: dict) -> None:
            self.sched.load_state_dict(sd)

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
                                           lr_scheduler=Schedule)
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


def forward_backward(engine: Any, micro_batches: list[dict[str, torch.Tensor]]):
    """Forward, backward and ``engine.step()`` for one optimizer step made of ``micro_batches``
    (this rank's, already CP-split; as many as the engine's gradient accumulation steps). Returns
    the step's :class:`seqpar.train.step.StepResult` (identical on every rank)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from seqpar.train.step import StepResult, _global_tokens, moh_aux_losses, param_device

    if len(micro_batches) != engine.gradient_accumulation_steps():
        raise ValueError(f"{len(micro_batches)} micro-batches for {engine.gradient_accumulation_steps()} "
                         f"gradient accumulation steps")
    # every tensor of the step's collectives and stacks lives on the parameters' device (NCCL takes
    # no host tensor; a stack of a device and a host tensor raises)
    device = param_device(engine.module)
    dpcp = ps.get_data_parallel_group(with_context_parallel=True)
    dp = ps.get_data_parallel_world_size()
    counts = _global_tokens(micro_batches, device)  # valid tokens of the global batch, over DP x CP
    total = counts.clamp(min=1.0)
    # the aux loss's gradient does not pass through the main loss: DeepSpeed divides by DP, so scale
    # 1 / micro-batches gives Megatron's mean over micro-batches and DP replicas
    MoEAuxLossAutoScaler.set_loss_scale(torch.full((), 1.0 / len(micro_batches), device=device))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    aux_sum = torch.zeros((), device=device)
    for batch in micro_batches:
        tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"].float()
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        per_token = engine(tokens, position_ids, None, labels=labels)  # [b, s_local]
        local = (per_token.float() * mask).sum()
        engine.backward(local * (dp / total), scale_wrt_gas=False)
        engine.step()  # DeepSpeed steps the optimizer (and the LR) at the accumulation boundary only
        loss_sum += local.detach().double()
        aux = moh_aux_losses(engine.module)
        if aux:
            aux_sum += torch.stack([a.detach().float() for a in aux]).sum()
    vals = torch.stack([loss_sum.float(), aux_sum / len(micro_batches)])
    dist.all_reduce(vals[:1], group=dpcp)
    if dp > 1:  # aux losses are replicated over CP, one per DP replica
        aux_t = vals[1:].clone()
        dist.all_reduce(aux_t, group=ps.get_data_parallel_group())
        vals[1:] = aux_t / dp
    return StepResult(loss=float(vals[0] / total), aux_loss=float(vals[1]), tokens=int(counts))


def _split(batch: tuple[torch.Tensor, ...], micro: int) -> list[dict[str, torch.Tensor]]:
    from seqpar.train.step import local_batch

    tokens, labels, mask = batch
    return [local_batch(tokens[i:i + micro], labels[i:i + micro], mask[i:i + micro])
            for i in range(0, tokens.shape[0], micro)]


def train(cfg: Any, *, resume: bool = False, stop_after: Optional[int] = None) -> list[float]:
    """``train.engine: deepspeed``: the recipe on the DeepSpeed engine. Same contract as
    ``seqpar.train.loop.train`` (returns this run's per-step losses, identical on every rank;
    ``resume`` continues from ``<out_dir>/checkpoints/latest``; ``stop_after`` ends, with a
    checkpoint, after that many steps of this run)."""
    from seqpar.deepspeed import checkpoint
    from seqpar.deepspeed.config import batch_shape, build_ds_config, check_supported
    from seqpar.megatron import init_parallel
    from seqpar.train import health, signals
    from seqpar.train.checkpoint import prepare_out_dir
    from seqpar.train.loop import AttentionTimer, Logger, _batch, _device, _rng_state, _set_rng_state, build_data, build_model

    check_supported(cfg)  # refused combinations fail before any process group is made
    world = dist.get_world_size() if dist.is_initialized() else None
    if world is not None:
        cfg.check_world(world)
    init_parallel(cfg.parallel.tensor_parallel, cfg.parallel.context_parallel, seed=cfg.train.seed,
                  timeout_s=cfg.parallel.distributed_timeout_s)
    dp = ps.get_data_parallel_world_size()
    ds_config = build_ds_config(cfg, dp)
    micro, _ = batch_shape(cfg, dp)
    rank0 = dist.get_rank() == 0
    data, vocab = build_data(cfg)
    device = _device()  # DeepSpeed's device too: init_parallel made LOCAL_RANK's GPU the current one
    model = build_model(cfg, vocab, device)[0]  # one chunk: the DeepSpeed engine runs without pipeline parallelism
    engine = initialize(cfg, model, ds_config)
    out = pathlib.Path(cfg.train.out_dir)
    ckpt_dir = out / "checkpoints"
    start = 0
    prepare_out_dir(out, resume=resume, overwrite=cfg.train.overwrite)  # no silent mixing of two runs
    if resume:
        from seqpar.train.checkpoint import resumable

        # the Megatron engine's rule: `latest` if intact, else (train.on_corrupt_checkpoint=fallback) the
        # newest intact older checkpoint, with a warning naming the corrupt file; verified there, so load()
        # skips its own hash pass
        path = resumable(ckpt_dir, cfg.train.on_corrupt_checkpoint)
        state = checkpoint.load(engine, path, config=cfg.to_dict(), verified=True)  # refuses a model change / finished run
        if state["rng"] is not None:
            _set_rng_state(state["rng"])
        elif rank0:
            print(f"[seqpar.deepspeed] {path} was written with parallel layout {state['layout']}; "
                  f"RNG states not restored (they are per rank)", flush=True)
        start = state["step"]
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    logger = Logger(cfg, out, start, desc="train[deepspeed]", head=f"[seqpar.deepspeed] ZeRO-{cfg.deepspeed.zero_stage},")
    timer = AttentionTimer(model) if cfg.train.time_attention else None
    # non-finite loss / grad norm: stop naming the first bad layer (train.skip_nonfinite_steps > 0 is refused
    # for this engine by seqpar.deepspeed.config.check_supported: DeepSpeed has stepped before we know)
    monitor = health.HealthMonitor.from_config(cfg, model)
    losses = []
    engine.train()
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]
        with monitor.guard(step):
            res = forward_backward(engine, _split(_batch(data, step, cfg, device), micro))
        gnorm = engine.get_global_grad_norm()
        monitor.check(step, res.loss, 0.0 if gnorm is None else float(gnorm))
        losses.append(res.loss)
        res = dataclasses.replace(res, lr=lr, grad_norm=None if gnorm is None else float(gnorm))
        logger.log(step, res, time.perf_counter() - t0, timer, skipped=None)  # no skipped steps here
        stop = signals.stop_requested()  # a SIGTERM/SIGUSR1/SIGINT on any rank: save now, then exit (all ranks)
        last = step + 1 == end or stop
        saved = None
        if last or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
            if logger.writer is not None:  # the scalars up to a checkpoint are on disk before it is `latest`
                logger.writer.flush()
            saved = checkpoint.save(engine, ckpt_dir, step + 1, rng=_rng_state(), config=cfg.to_dict(),
                                    keep_last=cfg.train.keep_last, tokenizer_model=getattr(data, "tokenizer_model", None))
        if stop:
            signals.stopped(step + 1, saved)
            break
    logger.close(start, end, losses, ckpt_dir, out)
    monitor.close()
    engine.destroy()
    ps.destroy_model_parallel()
    signals.raise_if_stopped()  # SystemExit(signals.EXIT_INTERRUPTED) after a signal stopped the loop
    return losses
