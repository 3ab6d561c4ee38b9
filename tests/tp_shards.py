"""TP shards <-> full tensors for tests that compare a TP>1 megatron-core model with the TP=1 one.

megatron's column/row-parallel layers hold ``chunk(tp)[rank]`` of a weight along its
``partition_dim``; fused projections (Lightning's q|k|v|gate, SwiGLU's gate|up) are split per
section, so a rank's shard is ``[section_0 / tp; section_1 / tp; ...]``.
"""

from __future__ import annotations

import torch


def sections(model, name: str) -> list[int]:
    """Local (per-rank) section sizes of a fused projection's rows, or [] for a plain weight."""
    if name.endswith("linear_qkvg.weight"):
        mod = model.get_submodule(name.rsplit(".", 2)[0])
        d = mod.head_dim
        return [mod.heads * d, mod.kv_heads * d, mod.kv_heads * d, mod.heads * d]
    if name.endswith("linear_fc1.weight"):  # SwiGLU: [gate; up]
        half = model.get_parameter(name).shape[0] // 2
        return [half, half]
    return []


def full_grads(model, tp: int, attr: str = "grad") -> dict[str, torch.Tensor]:
    """name -> the full (TP=1-shaped) gradient, gathered over the TP group (``attr``: ``grad`` or
    megatron DDP's ``main_grad``)."""
    from megatron.core import parallel_state

    out = {}
    for name, p in model.named_parameters():
        g = getattr(p, attr).detach().clone()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(tp)]
            torch.distributed.all_gather(parts, g.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            secs = sections(model, name)
            if secs:
                split = [torch.split(part, secs, dim=0) for part in parts]
                g = torch.cat([torch.cat([split[r][i] for r in range(tp)]) for i in range(len(secs))])
            else:
                g = torch.cat(parts, dim=p.partition_dim)
        out[name] = g
    return out


def load_shards(model, full: dict[str, torch.Tensor], tp: int, rank: int) -> None:
    """Copy the TP=1 model's weights ``full`` into this TP rank's shards."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = full[name]
            if getattr(p, "tensor_model_parallel", False):
                secs = sections(model, name)
                if secs:
                    parts = torch.split(w, [s * tp for s in secs], dim=0)
                    w = torch.cat([sec.chunk(tp, dim=0)[rank] for sec in parts], dim=0)
                else:
                    w = w.chunk(tp, dim=p.partition_dim)[rank]
            p.copy_(w)
