"""megatron-core's optimizer as seqpar builds it: ``get_megatron_optimizer`` plus one fix for the
torch-AdamW fallback, on every device.

Without Transformer Engine or Apex (NVIDIA Apex is not on PyPI; a GPU host without TE is as common as
a CPU one), ``megatron.core.optimizer`` falls back to ``torch.optim.AdamW`` (its
``USING_PYTORCH_OPTIMIZER``; ``distrib_optimizer.HAVE_APEX_OR_TE`` is False). torch's AdamW keeps a
``step`` tensor in every parameter's state, which the fused Adams keep in the param groups.

The megatron-core 0.16 call that breaks: ``DistributedOptimizer._set_main_param_and_optimizer_states``
copies *every* key of the parameter's optimizer state from the tensors it is handed. Both loaders of
the ``fully_reshardable`` distributed-optimizer checkpoint format hand it tensors without ``step``
(they skip that key; megatron restores it from the param groups in ``load_state_dict`` just
before): ``load_parameter_state_from_fs_model_space`` (the format's path with CUDA, see
``seqpar.train.checkpoint``) and ``load_parameter_state_from_fully_reshardable`` (the memory-efficient
path, used on CPU). So resuming a distributed-optimizer checkpoint raises ``KeyError: 'step'`` on a
GPU as on a CPU. :func:`get_optimizer` gives every ``DistributedOptimizer`` it builds over torch's
Adam / AdamW an instance-level ``_set_main_param_and_optimizer_states`` that leaves ``step`` as
restored. It is not a CPU workaround (``seqpar.megatron.cpu_compat`` patches CPU limitations only):
it applies whatever the device, and only to optimizers built here, never to megatron's class.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer


def _uses_torch_adam(opt: DistributedOptimizer) -> bool:
    """Whether megatron stepped ``opt`` with torch's Adam / AdamW (per-parameter ``step`` state)."""
    return isinstance(opt.optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _set_states_keeping_step(self: DistributedOptimizer, model_param: torch.nn.Parameter,
                             tensors: dict[str, torch.Tensor]) -> None:
    """megatron's ``_set_main_param_and_optimizer_states`` with the state's own ``step`` added where
    ``tensors`` lacks it (module docstring)."""
    if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state.get(main_param, {}).get("step")
        if step is not None:
            tensors = {**tensors, "step": step}
    DistributedOptimizer._set_main_param_and_optimizer_states(self, model_param, tensors)


def keep_adamw_step(opt: Any) -> Any:
    """Give each ``DistributedOptimizer`` in ``opt`` (a megatron optimizer, chained or not) that steps
    torch's Adam / AdamW the ``step``-keeping state setter (module docstring). Others are left alone.
    Returns ``opt``."""
    for sub in getattr(opt, "chained_optimizers", [opt]):
        if isinstance(sub, DistributedOptimizer) and _uses_torch_adam(sub):
            sub._set_main_param_and_optimizer_states = types.MethodType(_set_states_keeping_step, sub)
    return opt


def get_optimizer(config: OptimizerConfig, model_chunks: list[torch.nn.Module], **kwargs: Any) -> Any:
    """``megatron.core.optimizer.get_megatron_optimizer(config, model_chunks, **kwargs)`` with
    :func:`keep_adamw_step` applied (the one way seqpar builds a megatron optimizer)."""
    return keep_adamw_step(get_megatron_optimizer(config, model_chunks, **kwargs))


__all__ = ["get_optimizer", "keep_adamw_step"]
