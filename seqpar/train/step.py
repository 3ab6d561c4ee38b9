"""One training step's math: Megatron's zigzag CP split, the token-weighted loss over DP x CP, the
MoH aux loss, and the gradient all-reduce over DP x CP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.utils import get_batch_on_this_cp_rank

from seqpar import cp
from seqpar.megatron.attention import MoHCoreAttention, MoHSelfAttention


@dataclass
class StepResult:
    """Scalars of one step, identical on every rank."""

    loss: float
    """Cross-entropy averaged over the valid tokens of the whole DP x CP group."""
    aux_loss: float
    """Sum over MoH layers of the load-balance loss (times its coefficient), averaged over DP."""
    tokens: int
    """Valid tokens in the global batch."""


def local_batch(tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """This CP rank's share of a ``[batch, seq]`` batch: Megatron's ``get_batch_on_this_cp_rank``
    (zigzag: chunks r and 2P-1-r of 2P)."""
    return get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels, "loss_mask": loss_mask})


def _dpcp_group() -> Any:
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def moh_aux_losses(model: torch.nn.Module) -> list[torch.Tensor]:
    """The last aux loss of every MoH module (self-attention router or core query router)."""
    out = []
    for mod in model.modules():
        if isinstance(mod, (MoHSelfAttention, MoHCoreAttention)) and mod.last_aux_loss is not None:
            out.append(mod.last_aux_loss)
    return out


def forward_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepResult:
    """Forward + backward of this rank's batch share (already CP-split); gradients are left summed
    over DP x CP in ``param.grad`` so every rank holds the gradient of the global mean loss."""
    group = _dpcp_group()
    dp = parallel_state.get_data_parallel_world_size()
    tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"].float()
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with cp.step_checks():  # seqpar attention: data checks once per step, no host sync per layer
        per_token = model(tokens, position_ids, None, labels=labels)  # [b, s_local]
        counts = torch.stack([mask.sum(), (per_token.detach().float() * mask).sum()])
        dist.all_reduce(counts, group=group)
        total = counts[0].clamp(min=1.0)
        # aux losses are replicated over CP (computed over the CP group's tokens) and per DP replica
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / dp))
        loss = (per_token.float() * mask).sum() / total
        loss.backward()
    allreduce_grads(model, group)
    aux = moh_aux_losses(model)
    aux_val = torch.stack(aux).sum() if aux else torch.zeros(())
    if dp > 1:
        aux_val = aux_val.clone()
        dist.all_reduce(aux_val, group=parallel_state.get_data_parallel_group())
        aux_val = aux_val / dp
    return StepResult(loss=float(counts[1] / total), aux_loss=float(aux_val), tokens=int(counts[0]))


def allreduce_grads(model: torch.nn.Module, group: Optional[Any] = None) -> None:
    """Sum every gradient over ``group`` (default DP x CP), in one flat buffer per dtype."""
    group = _dpcp_group() if group is None else group
    if dist.get_world_size(group) == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat, group=group)
        off = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[off:off + n].view_as(p.grad))
            off += n
