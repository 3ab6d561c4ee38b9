"""One training step's math on megatron-core's engine (``seqpar.train.megatron_engine``): Megatron's
zigzag CP split into micro-batches, the micro-batch forward/backward through
``get_forward_backward_func`` (1F1B under PP), the token-weighted loss over DP x CP, the MoH aux loss,
the step statistics reduced over every pipeline stage, and megatron's optimizer step.

Token weighting (exact for any DP x CP x PP x micro-batch split): the loss function returns the
*sum* of the token losses of its micro-batch and its valid-token count; the model config sets
``calculate_per_token_loss``, so megatron's DDP sums gradients over DP x CP (no 1/DP) and
``finalize_model_grads`` divides them by the valid tokens of the whole global batch. The gradient is
then that of ``sum(token losses) / valid tokens`` of the global batch, whatever the split.

Every tensor that reaches a collective here is created on the parameters' device.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from seqpar.train.engine import StepResult
from seqpar.train.runtime import forward_micro_batch, global_tokens, moh_aux_losses, param_device


def _loss_func(loss_mask: torch.Tensor, stats: dict[str, torch.Tensor], accuracy: Any, output: torch.Tensor):
    """megatron's 3-tuple loss contract: (sum of token losses, valid tokens, reporting dict). Called right
    after this micro-batch's forward, so ``accuracy`` (a TokenAccuracy or None) holds its hits."""
    mask = loss_mask.float()
    loss_sum = (output.float() * mask).sum()
    tokens = mask.sum()
    stats["loss_sum"] = stats["loss_sum"] + loss_sum.detach()
    if accuracy is not None:
        stats["correct"] = stats["correct"] + accuracy.take(loss_mask)
    return loss_sum, tokens.to(torch.int), {"loss_sum": loss_sum.detach()}


def _forward_step(stats: dict[str, torch.Tensor], accuracy: Any, data_iterator: Iterator, model: torch.nn.Module):
    """megatron ``forward_step_func``: one micro-batch through this stage."""
    batch = next(data_iterator)
    # first stage: tokens in; other stages: the received activation (set_input_tensor) is used instead
    out = forward_micro_batch(model, batch)  # last stage: per-token losses [b, s_local]
    aux = moh_aux_losses(model)
    if aux:
        stats["aux_sum"] = stats["aux_sum"] + torch.stack(aux).sum().detach()
    return out, partial(_loss_func, batch["loss_mask"], stats, accuracy)


def forward_backward(model: torch.nn.Module | list[torch.nn.Module], batches: list[dict[str, torch.Tensor]] | dict,
                     *, forward_only: bool = False, accuracy: Any = None) -> StepResult:
    """Forward + backward of this rank's micro-batches (each already CP-split) through megatron's
    schedule for the current PP layout. With DDP-wrapped chunks the gradients end reduced over DP x CP
    in the DDP buffers (``param.main_grad``) and divided by the global valid tokens; a bare module
    keeps this rank's gradient of ``sum(token losses) / global valid tokens`` in ``param.grad``.
    Returns the step's scalars (no optimizer step: grad_norm and lr stay 0; ``accuracy``, a
    ``seqpar.train.runtime.TokenAccuracy`` on the chunks, adds the step's greedy accuracy). The training loop runs it
    inside ``cp.step_checks()`` (``seqpar.train.engine.StepContext``): wrap a call of your own in it too,
    or every CP attention layer checks its inputs with a handshake and a host read."""
    chunks = model if isinstance(model, list) else [model]
    batches = [batches] if isinstance(batches, dict) else batches
    device = param_device(chunks)
    config = chunks[0].config
    dp = parallel_state.get_data_parallel_world_size()
    total = global_tokens(batches, device)
    # MoH aux losses enter the backward through MoEAuxLossAutoScaler with this scale: the gradient of
    # mean over (DP replicas, micro-batches) of the aux loss, after finalize_model_grads divides every
    # gradient by the global token count (CP ranks hold the same CP-global aux loss; their gradient
    # contributions are disjoint and sum to the exact one)
    MoEAuxLossAutoScaler.set_loss_scale(total / (dp * len(batches)))
    stats = {"loss_sum": torch.zeros((), device=device), "aux_sum": torch.zeros((), device=device),
             "correct": torch.zeros((), device=device)}
    first = batches[0]["tokens"]
    fwd_bwd = get_forward_backward_func()
    fwd_bwd(forward_step_func=partial(_forward_step, stats, accuracy), data_iterator=iter(batches), model=chunks,
            num_microbatches=len(batches),
            seq_length=first.shape[1] * parallel_state.get_context_parallel_world_size(),
            micro_batch_size=first.shape[0], forward_only=forward_only)
    if config.finalize_model_grads_func is None and not forward_only:
        # a bare module (no DDP): divide by the global token count as finalize_model_grads would
        for chunk in chunks:
            for p in chunk.parameters():
                if p.grad is not None:
                    p.grad.div_(total.clamp(min=1.0))
    return _reduce_stats(stats, total, len(batches), accuracy is not None)


def _reduce_stats(stats: dict[str, torch.Tensor], total: torch.Tensor, num_micro: int,
                  with_accuracy: bool = False) -> StepResult:
    """Loss, aux loss and correct predictions of the global batch on every rank: one all-reduce over
    DP x CP, one over PP (the loss and the predictions live on the last stage, each stage holds the aux
    terms of its own MoH layers)."""
    dpcp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dp = parallel_state.get_data_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    vec = torch.stack([stats["loss_sum"], stats["aux_sum"] / (cp * dp * num_micro), stats["correct"]])
    dist.all_reduce(vec, group=dpcp)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(vec, group=parallel_state.get_pipeline_model_parallel_group())
    vals = torch.cat([vec, total.reshape(1)]).tolist()  # the step's one host sync
    tokens = max(vals[3], 1.0)
    return StepResult(loss=vals[0] / tokens, aux_loss=vals[1], tokens=int(vals[3]),
                      accuracy=vals[2] / tokens if with_accuracy else None)


def optimizer_step(optimizer: Any, scheduler: Optional[Any],
                   check: Optional[Callable[[float], bool]] = None) -> tuple[float, float, bool]:
    """Advance the LR schedule, then megatron's optimizer step, in the order of its own ``step()``:
    ``prepare_grads`` (DDP's reduced fp32 grads to the main params), ``get_grad_norm`` (megatron's
    ``get_grad_norm_fp32``: fp32, on the parameters' device, one all-reduce per group, all PP stages),
    ``clip_grad_by_total_norm_fp32`` (each sub-optimizer's ``clip_grad``), ``step_with_ready_grads``
    (main-weight update, copy back to the model). ``check(grad_norm)`` returning False skips the
    update (the health monitor's non-finite veto). Returns (grad norm before clipping, learning rate,
    updated)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if scheduler is not None:
        scheduler.step(1)
    lr = float(optimizer.param_groups[0]["lr"])
    if optimizer.prepare_grads():
        raise RuntimeError("megatron optimizer found inf/nan in the gradients (loss scaling overflow)")
    grad_norm = float(optimizer.get_grad_norm())
    if check is not None and not check(grad_norm):
        return grad_norm, lr, False
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = sub.get_parameters()
        if params and sub.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(params, max_norm=sub.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    if not optimizer.step_with_ready_grads():
        raise RuntimeError("megatron optimizer did not apply the update")
    return grad_norm, lr, True
