"""The warnings of megatron-core and torch that every training run would print, filtered once, each
by its exact message (and the module that triggers it where Python can tell), with the call that
causes it. Install with :func:`filter_known_warnings` before megatron-core is imported (the CLI, the
torchrun wrapper and ``seqpar.train.signals`` do); any other warning still shows.
"""

from __future__ import annotations

import warnings


def filter_known_warnings() -> None:
    """Ignore exactly the warnings below (idempotent)."""
    # megatron-core warns at several import sites (megatron.core.models.backends, gpt_layer_specs, optimizer,
    # clip_grads, megatron_fsdp.mixed_precision) that Apex / Transformer Engine are absent: both are
    # optional fused-kernel providers with torch fallbacks
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* (is|are) not installed",
                            category=UserWarning)
    # megatron.core.optimizer.optimizer._zero_grad_group_helper (called by DistributedOptimizer.zero_grad)
    # reads `.grad` of the optimizer's fp32 shards, which megatron builds as views of the fp32 parameters
    # (distrib_optimizer._build_model_and_main_param_groups: model_param.view(-1)[start:end]), i.e. non-leaf
    # tensors; they never get a .grad, so the read is harmless, but torch warns about it
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf Tensor is being "
                            r"accessed", category=UserWarning, module=r"megatron\.core\.optimizer\.optimizer")
    # megatron.core.distributed.param_and_grad_buffer calls torch.distributed.all_gather_into_tensor /
    # reduce_scatter_tensor (the distributed optimizer's bucket collectives), which torch 2.13 deprecates in
    # favour of all_gather_single / reduce_scatter_single (seqpar.cp.comm uses those)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            r"is deprecated", category=FutureWarning)


__all__ = ["filter_known_warnings"]
