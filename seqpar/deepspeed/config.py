"""The DeepSpeed config (ds_config) of a recipe, merged with an optional user JSON and validated.

:func:`build_ds_config` is the one place that maps recipe fields to ds_config keys (``RECIPE_KEYS``):

=====================================  ========================================================
ds_config key                          recipe field
=====================================  ========================================================
``train_batch_size``                   ``data.global_batch``
``train_micro_batch_size_per_gpu``     ``data.micro_batch`` (0: ``global_batch / DP``)
``gradient_accumulation_steps``        ``global_batch / (micro_batch x DP)``
``gradient_clipping``                  ``optim.grad_clip`` (0 = off, as in DeepSpeed)
``bf16.enabled`` / ``fp16.enabled``    ``model.dtype`` (fp16 is not a seqpar dtype)
``zero_optimization.stage``            ``deepspeed.zero_stage``
``zero_optimization.offload_optimizer.device``  ``deepspeed.offload_optimizer``
``zero_optimization.reduce_scatter``   ``true`` under ZeRO-3 (the gradient averaging the engine's loss
                                       scale undoes: ``seqpar.deepspeed.engine.grad_divisor``)
``optimizer.type`` / ``.params.*``     AdamW with ``optim.lr``, ``optim.beta1/beta2``, ``optim.weight_decay``
=====================================  ========================================================

The LR schedule is not a ds_config entry: the engine gets the recipe's own schedule
(``seqpar.train.runtime.build_scheduler``, megatron-core's OptimizerParamScheduler: linear warmup, cosine to
``optim.min_lr``) as a client LR scheduler, with megatron's no-decay groups (biases, 1-D parameters), so
both engines step exactly the same learning rates; a ``scheduler`` in the user JSON is an error.
``"torch_adam": true`` makes DeepSpeed step ``torch.optim.AdamW`` (FusedAdam / DeepSpeedCPUAdam
would JIT-compile C++/CUDA ops, which a ``DS_BUILD_OPS=0`` install on a CPU machine cannot run).

DP below is our data-parallel size (world / (TP x CP)): DeepSpeed's batch arithmetic uses
``mpu.get_data_parallel_world_size()``, which is that size (see ``seqpar.deepspeed.engine``).
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
from typing import Any, Optional

from seqpar.errors import ConfigError

# AdamW epsilon of both engines (megatron-core's default adam_eps, torch's default).
ADAM_EPS = 1e-8

# A step count DeepSpeed never reaches: its own console prints stay off (tensorboard has the numbers).
_QUIET_STEPS = 2**31 - 1

# ds_config key (dotted) -> the recipe field it comes from, for the error of a conflicting user JSON
RECIPE_KEYS = {
    "train_batch_size": "data.global_batch",
    "train_micro_batch_size_per_gpu": "data.micro_batch",
    "gradient_accumulation_steps": "data.global_batch / (data.micro_batch x DP)",
    "gradient_clipping": "optim.grad_clip",
    "bf16.enabled": "model.dtype",
    "fp16.enabled": "model.dtype",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "zero_force_ds_cpu_optimizer": "deepspeed.offload_optimizer (torch AdamW on the host)",
    "zero_optimization.reduce_scatter": ("deepspeed.zero_stage=3 (the engine's loss scale undoes the averaging of "
                                         "ZeRO-3's reduce-scatter; seqpar.deepspeed.engine.grad_divisor)"),
    "optimizer.type": "optim (AdamW)",
    "optimizer.params.lr": "optim.lr",
    "optimizer.params.betas": "optim.beta1, optim.beta2",
    "optimizer.params.eps": "AdamW eps (seqpar.deepspeed.config.ADAM_EPS)",
    "optimizer.params.weight_decay": "optim.weight_decay",
    "optimizer.params.torch_adam": "torch AdamW (seqpar.deepspeed.config)",
    "steps_per_print": "train.log_every (tensorboard)",
}


def require_cpu_accelerator() -> None:
    """On a host without CUDA, DeepSpeed must use its CPU accelerator (``DS_ACCELERATOR=cpu``), which it
    picks when deepspeed is first imported: set it if unset, refuse another value with the fix."""
    import torch

    if torch.cuda.is_available():
        return
    acc = os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if acc != "cpu":
        raise ConfigError(f"DS_ACCELERATOR={acc!r} on a host without CUDA; set DS_ACCELERATOR=cpu "
                          f"(launchers/deepspeed.sh does)")


def batch_shape(cfg: Any, dp: int) -> tuple[int, int]:
    """``(micro_batch, gradient_accumulation_steps)`` per DP rank for ``data.global_batch``."""
    per_rank = cfg.data.global_batch // dp
    micro = cfg.data.micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(f"data.global_batch={cfg.data.global_batch} must be a multiple of data.micro_batch x DP "
                          f"= {micro} x {dp}")
    return micro, per_rank // micro


def recipe_ds_config(cfg: Any, dp: int) -> dict[str, Any]:
    """The ds_config that the recipe alone defines (no user JSON)."""
    micro, gas = batch_shape(cfg, dp)
    o, ds = cfg.optim, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        # ZeRO-3 averages the gradients over DP x CP on this path only (with reduce_scatter false it
        # averages over DP, except for a bucket above reduce_bucket_size): one divisor the loss can undo
        zero["reduce_scatter"] = True
    built: dict[str, Any] = {
        "train_batch_size": cfg.data.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": float(o.grad_clip),
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW",
                      "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": ADAM_EPS,
                                 "weight_decay": o.weight_decay, "torch_adam": True}},
        "steps_per_print": _QUIET_STEPS,
    }
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
        built["zero_force_ds_cpu_optimizer"] = False  # torch AdamW steps the host copy (no C++ op build)
    return built


def _merge(ours: dict, theirs: dict, src: str, path: str = "") -> dict:
    out = dict(ours)
    for key, val in theirs.items():
        dotted = f"{path}{key}"
        if key in ours and isinstance(ours[key], dict) and isinstance(val, dict):
            out[key] = _merge(ours[key], val, src, dotted + ".")
        elif key in ours and ours[key] != val:
            raise ConfigError(f"{src} sets {dotted}={json.dumps(val)} but the recipe's {RECIPE_KEYS.get(dotted, dotted)} "
                              f"gives {dotted}={json.dumps(ours[key])}; set it in one place only (remove it from "
                              f"{src} or change the recipe)")
        else:
            out[key] = val
    return out


def load_user_config(path: str) -> dict[str, Any]:
    """Read a user ds_config JSON (a mapping). Errors name the file."""
    p = pathlib.Path(path)
    try:
        tree = json.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"deepspeed.config={path!r} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config={path!r} is not valid JSON: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"deepspeed.config={path!r} must hold a JSON object (a ds_config), got {type(tree).__name__}")
    if "scheduler" in tree:
        raise ConfigError(f"deepspeed.config={path!r} sets 'scheduler', but the LR schedule comes from the recipe "
                          f"(optim.lr, optim.min_lr, optim.warmup_steps, train.steps); remove 'scheduler'")
    return tree


def validate_ds_config(ds_config: dict[str, Any], dp: int, src: str) -> None:
    """Run DeepSpeed's own config parser on ``ds_config`` (no process group needed) and re-raise its
    complaint as a ConfigError naming ``src``. Batch sizes are checked for a DP size of ``dp``."""
    require_cpu_accelerator()
    from deepspeed.runtime.config import DeepSpeedConfig

    view = copy.deepcopy(ds_config)
    # without a process group DeepSpeedConfig assumes a world of 1: check the batch arithmetic per DP rank
    if isinstance(view.get("train_batch_size"), int) and view["train_batch_size"] % dp == 0:
        view["train_batch_size"] //= dp
    class _PerRank:  # the batch arithmetic above is per DP rank, with or without a process group
        @staticmethod
        def get_data_parallel_world_size() -> int:
            return 1

    try:
        DeepSpeedConfig(view, mpu=_PerRank())
    except Exception as e:  # DeepSpeed raises pydantic ValidationErrors, AssertionErrors, ValueErrors
        msg = " ".join(str(e).split())
        raise ConfigError(f"DeepSpeed rejects the ds_config built from {src}: "
                          f"{type(e).__name__}: {msg[:800]}") from None


def check_supported(cfg: Any) -> None:
    """Combinations the DeepSpeed engine refuses (each with the reason and the fix).

    ``parallel.pipeline_parallel > 1``: the engine wraps one model chunk (megatron-core's pipeline
    schedules need the Megatron engine; DeepSpeed's own ``PipelineModule`` is a different model).
    ``train.skip_nonfinite_steps > 0``: the update cannot be vetoed after the fact.
    """
    if cfg.parallel.pipeline_parallel > 1:
        raise ConfigError(f"parallel.pipeline_parallel={cfg.parallel.pipeline_parallel} is not supported with "
                          f"train.engine='deepspeed' (the DeepSpeed engine runs the model as one stage); set "
                          f"parallel.pipeline_parallel=1 or train.engine='megatron'")
    if cfg.train.skip_nonfinite_steps:
        raise ConfigError(f"train.skip_nonfinite_steps={cfg.train.skip_nonfinite_steps} is not supported with "
                          f"train.engine='deepspeed' (DeepSpeed applies the update inside engine.step(), before the "
                          f"loss is known to be finite); set it to 0 (stop at the first non-finite step)")


def check_engine(cfg: Any, dp: Optional[int] = None) -> None:
    """``DeepSpeedEngine.check`` (``seqpar.train.engine.ENGINE_CHECKS``): the refused combinations; with
    ``dp`` (the world is known) also the whole ds_config, validated by DeepSpeed."""
    if dp is None:
        check_supported(cfg)
    else:
        build_ds_config(cfg, dp)


def build_ds_config(cfg: Any, dp: int) -> dict[str, Any]:
    """The ds_config for a recipe at data-parallel size ``dp``: :func:`recipe_ds_config` with the user's
    ``deepspeed.config`` JSON merged in (new keys are added; a key both set to different values is a
    ConfigError naming the user's key and the recipe field), validated by DeepSpeed's parser."""
    check_supported(cfg)
    built = recipe_ds_config(cfg, dp)
    src = "the recipe"
    if cfg.deepspeed.config:
        user = f"deepspeed.config={cfg.deepspeed.config!r}"
        built = _merge(built, load_user_config(cfg.deepspeed.config), user)
        src = f"the recipe and {user}"
    validate_ds_config(built, dp, src)
    return built
