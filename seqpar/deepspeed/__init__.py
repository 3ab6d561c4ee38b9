"""seqpar.deepspeed: the DeepSpeed engine (ZeRO 0-3, CPU offload) for the same megatron-core GPTModel.

- :func:`build_ds_config` — the ds_config of a recipe (+ a user JSON, conflicts are errors).
- :class:`DeepSpeedEngine` — the engine of ``train.engine: deepspeed``, run by the one training loop
  (``seqpar.train.loop.train``; the loop finds it by name through ``seqpar.train.engine.ENGINES``).
- :class:`MegatronMPU` — megatron-core's groups in the ``mpu`` form DeepSpeed reads.
- :func:`consolidated_fp32_state_dict` — one fp32 state dict from a (ZeRO-sharded) checkpoint.

Importing this package does not import deepspeed; its functions do.
"""

from seqpar.deepspeed.config import build_ds_config, recipe_ds_config

__all__ = ["build_ds_config", "recipe_ds_config", "DeepSpeedEngine", "MegatronMPU", "consolidated_fp32_state_dict"]


def __getattr__(name: str):
    if name in ("DeepSpeedEngine", "MegatronMPU"):
        from seqpar.deepspeed import engine
        return getattr(engine, name)
    if name == "consolidated_fp32_state_dict":
        from seqpar.deepspeed import checkpoint
        return checkpoint.consolidated_fp32_state_dict
    raise AttributeError(name)
