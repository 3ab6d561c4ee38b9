"""Per-rank memory of a training layout without launching it: parameter, gradient and optimizer-state
bytes of every distinct shard (one per (pipeline stage, tensor-parallel rank); DP and CP ranks hold
copies), measured on meta-device stage models built in this one process, next to the closed form.

Bytes per parameter held by a rank (the engine's precision choices, ``seqpar.train.megatron_engine``):

=========================  =========  ===================  =======================================
model.dtype / optimizer    parameter  gradient (DDP, fp32)  optimizer state (Adam)
=========================  =========  ===================  =======================================
bf16, distributed          2          4                     (4 fp32 main + 4 m + 4 v) / (DP x CP)
bf16, not distributed      2          4                     12
fp32, distributed          4          4                     (4 m + 4 v) / (DP x CP) (main = param)
fp32, not distributed      4          4                     8
=========================  =========  ===================  =======================================

so bf16 with the distributed optimizer costs ``6 + 12 / (DP x CP)`` bytes per parameter of the rank's
shard (gradients are reduced in fp32: ``grad_reduce_in_fp32``). Activations are not counted.

``train.engine: deepspeed`` (:func:`zero_bytes_per_param`; ``N`` = DP x CP, ZeRO's group; README's table):

=========  ==================  ==================  ===============================================
ZeRO       parameter           gradient            optimizer state (fp32 master + Adam m, v)
=========  ==================  ==================  ===============================================
0          2 (fp32: 4)         2 (fp32: 4)         12 (fp32: 8, AdamW on the parameters)
1          2 (fp32: 4)         2 (fp32: 4)         12 / N (fp32 too: ZeRO-1/2 clone the fp32 partition)
2          2 (fp32: 4)         2 / N (fp32: 4 / N) 12 / N
3          2 / N (fp32: 4 / N) 2 / N (fp32: 4 / N) 12 / N (fp32: 8 / N, the partition is the master)
=========  ==================  ==================  ===============================================

``offload_optimizer`` (cpu, or nvme through a ds_config JSON) moves the optimizer column off the device:
``12 / N`` bytes per parameter there (the offloaded fp32 master is always a copy), 0 on the device;
``offload_param`` (ZeRO-3, ds_config JSON) moves the parameter partitions (``2 / N``) likewise. The
stage and offloads are read from the ds_config that would run (recipe + ``deepspeed.config``).

Closed-form parameter count of one rank (``h`` hidden, ``f`` FFN, ``H``/``G`` query/kv heads, ``d`` head
dim, ``V`` vocabulary, ``t`` TP size; SwiGLU MLP, RMSNorm, no biases):

- every layer: ``2 h`` norms + ``3 h f / t`` MLP;
- A / S / H layer attention: ``h d (H + 2 G) / t`` qkv + ``H d h / t`` output; H adds its router
  ``h H`` (+ ``2 h`` mix weights when it has shared and routed heads);
- L layer: ``h d (2 H + 2 G) / t`` q/k/v/gate + ``H d h / t`` output + ``H d / t`` per-head norm;
- first stage: ``V h / t`` embedding; last stage: ``V h / t`` output layer + ``h`` final norm.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from seqpar.megatron.config import KIND_OF_LETTER


@dataclass
class ShardMemory:
    """One distinct shard: the ranks at (pp_rank, tp_rank) for every DP and CP index."""

    pp_rank: int
    tp_rank: int
    layers: str
    """The stage's layer letters (e.g. "LLLA")."""
    params: int
    """Parameters of the shard (measured on the meta-device stage model)."""
    params_closed_form: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    offloaded_bytes: int = 0
    """Bytes off the device (host memory or NVMe: DeepSpeed's offload_optimizer / offload_param)."""

    @property
    def total_bytes(self) -> int:
        """Bytes on the device (offloaded bytes not included)."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def bytes_per_param(bf16: bool, distributed: bool, dp_cp: int) -> tuple[int, int, float]:
    """The Megatron engine's (parameter, gradient, optimizer-state) bytes per parameter of a rank's
    shard (module table)."""
    param = 2 if bf16 else 4
    opt = (4 if bf16 else 0) + 8
    return param, 4, opt / dp_cp if distributed else float(opt)


def zero_bytes_per_param(stage: int, bf16: bool, n: int, *, offload_optimizer: bool = False,
                         offload_param: bool = False) -> tuple[float, float, float, float]:
    """The DeepSpeed engine's (parameter, gradient, optimizer state, offloaded) bytes per parameter of a
    rank's shard under ZeRO ``stage`` over ``n`` = DP x CP ranks (module table; DeepSpeed 0.19's
    allocations: ZeRO-1/2 clone their fp32 master partition even from fp32 weights, ZeRO-3 uses an fp32
    partition as the master in place, ZeRO-0 fp32 steps torch AdamW on the parameters)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {stage!r} is not 0, 1, 2 or 3")
    if offload_optimizer and stage == 0 or offload_param and stage != 3:
        raise ValueError(f"ZeRO-{stage} cannot offload the {'optimizer' if offload_optimizer else 'parameters'} "
                         f"(offload_optimizer needs stage >= 1, offload_param stage 3)")
    w = 2 if bf16 else 4
    param = w / n if stage == 3 else float(w)
    grad = w / n if stage >= 2 else float(w)
    if bf16 or stage in (1, 2):
        master = 4.0  # a separate fp32 copy of the weights
    else:
        master = 0.0  # fp32 ZeRO-0 / ZeRO-3: the optimizer updates the (partitioned) fp32 weights in place
    opt = (master + 8) / (n if stage >= 1 else 1)
    off = 0.0
    if offload_optimizer:
        off, opt = 12 / n, 0.0  # offloaded, the fp32 master is always a copy (stage 1-3, cpu_offload)
    if offload_param:
        off, param = off + param, 0.0
    return param, grad, opt, off


def engine_bytes_per_param(cfg: Any, dp: int) -> dict[str, Any]:
    """The engine that ``cfg`` would run at data-parallel size ``dp`` and its bytes per parameter of a
    rank's shard (the engine's ``memory_plan``: Megatron's :func:`bytes_per_param`, DeepSpeed's
    :func:`zero_bytes_per_param` for the ZeRO stage and offloads of the ds_config that would run)."""
    from seqpar.train.engine import engine_class

    return engine_class(cfg.train.engine).memory_plan(cfg, dp)


def bytes_entry(param: float, grad: float, optimizer: float, offloaded: float = 0) -> dict[str, float]:
    """``memory_plan``'s ``bytes_per_param`` entry."""
    return {"param": param, "grad": grad, "optimizer": optimizer, "offloaded": offloaded,
            "total": param + grad + optimizer}


def closed_form_params(p: Any, pattern: str, vocab: int, tp: int, *, first: bool, last: bool,
                       moh_num_shared_heads: int, norms: bool = True) -> int:
    """The module docstring's parameter count of one rank's shard; ``norms=False`` leaves out the norm
    weights (vectors, no matmul: the ``N`` of ``6 N`` in ``seqpar.train.perf``)."""
    h, f, H, G = p.hidden_size, p.ffn_hidden_size, p.num_attention_heads, p.num_query_groups
    d = h // H
    nv = int(norms)  # input / pre-MLP norms per layer, Lightning's output norm, the final norm
    n = 0
    for c in pattern:
        n += nv * 2 * h + 3 * h * f // tp
        if c == "L":
            n += h * d * (2 * H + 2 * G) // tp + H * d * h // tp + nv * H * d // tp
        else:
            n += h * d * (H + 2 * G) // tp + H * d * h // tp
            if c == "H":
                routed = H - moh_num_shared_heads
                n += h * H + (2 * h if moh_num_shared_heads and routed else 0)
    if first:
        n += vocab * h // tp
    if last:
        n += vocab * h // tp + nv * h
    return n


@contextlib.contextmanager
def _fake_world(world_size: int, rank: int, cfg: Any) -> Iterator[None]:
    """This process as global rank ``rank`` of ``world_size`` on torch's ``fake`` backend (collectives
    are no-ops, no peer exists) with megatron's groups of the recipe's layout."""
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from seqpar.megatron.cpu_compat import (cpu_compat_enabled, disable_cpu_compat, enable_cpu_compat,
                                            model_parallel_seed)

    par = cfg.parallel
    compat_before = cpu_compat_enabled()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        if not torch.cuda.is_available():
            enable_cpu_compat()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor_parallel, pipeline_model_parallel_size=par.pipeline_parallel,
            context_parallel_size=par.context_parallel, create_gloo_process_groups=False)
        if torch.cuda.is_available():
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
            model_parallel_cuda_manual_seed(cfg.train.seed)
        else:
            model_parallel_seed(cfg.train.seed)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        if not compat_before:
            disable_cpu_compat()


def layout_memory(cfg: Any, world_size: int, vocab_size: int) -> list[ShardMemory]:
    """Build each distinct (pp_rank, tp_rank) shard of the recipe on the meta device in this process
    (as that rank of a fake world) and return its bytes; validates the layout (``cfg.check_world``)
    first. Needs a process without a default process group (``seqpar-train --dry-run`` is one)."""
    from megatron.core import parallel_state

    from seqpar.train import runtime

    if dist.is_initialized():
        raise RuntimeError("layout_memory builds its own (fake) world; call it before init_process_group")
    dp = cfg.check_world(world_size)
    par = cfg.parallel
    tp, pp, cp = par.tensor_parallel, par.pipeline_parallel, par.context_parallel
    p = runtime._preset(cfg)
    letters = cfg.model.layers
    per_stage = p.num_layers // pp
    b = engine_bytes_per_param(cfg, dp)["bytes_per_param"]
    out = []
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            rank = tp_rank + tp * cp * dp * pp_rank  # megatron's order tp-cp-ep-dp-pp, cp = dp = 0
            with _fake_world(world_size, rank, cfg):
                assert (parallel_state.get_tensor_model_parallel_rank(),
                        parallel_state.get_pipeline_model_parallel_rank()) == (tp_rank, pp_rank)
                with torch.device("meta"):  # shapes only: nothing is drawn or allocated
                    chunks = runtime.build_model(cfg, vocab_size, device="meta")
            n = sum(q.numel() for c in chunks for q in c.parameters())
            stage = letters[pp_rank * per_stage:(pp_rank + 1) * per_stage]
            closed = closed_form_params(p, stage, vocab_size, tp, first=pp_rank == 0, last=pp_rank == pp - 1,
                                        moh_num_shared_heads=cfg.model.moh_num_shared_heads)
            out.append(ShardMemory(pp_rank, tp_rank, stage, n, closed, round(n * b["param"]), round(n * b["grad"]),
                                   round(n * b["optimizer"]), round(n * b["offloaded"])))
    return out


def report(cfg: Any, world_size: int, vocab_size: int) -> dict[str, Any]:
    """The dry-run summary: layout, the engine that would run (Megatron with or without the distributed
    optimizer, or DeepSpeed's ZeRO stage and offloads: :func:`engine_bytes_per_param`), its bytes per
    parameter and every distinct shard's bytes (``total_bytes`` / ``max_rank_bytes``: on the device)."""
    shards = layout_memory(cfg, world_size, vocab_size)
    par = cfg.parallel
    dp = world_size // (par.tensor_parallel * par.context_parallel * par.pipeline_parallel)
    shape = cfg.model.shape
    return {"dry_run": "ok", "world": world_size, "tensor_parallel": par.tensor_parallel,
            "pipeline_parallel": par.pipeline_parallel, "context_parallel": par.context_parallel,
            "data_parallel": dp, **engine_bytes_per_param(cfg, dp), "pattern": cfg.model.layer_pattern,
            "layers": shape.num_layers, "hidden": shape.hidden_size, "heads": shape.num_attention_heads,
            "kv_heads": shape.num_query_groups,
            "shards": [{**asdict(s), "total_bytes": s.total_bytes} for s in shards],
            "max_rank_bytes": max(s.total_bytes for s in shards)}


_ZERO_SHARDS = ("nothing sharded", "optimizer state sharded", "optimizer state and gradients sharded",
                "optimizer state, gradients and parameters sharded")


def engine_line(rep: dict[str, Any]) -> str:
    """The engine part of the dry run's layout line, e.g. ``engine megatron, distributed optimizer: True``
    or ``engine deepspeed ZeRO-3 (optimizer state, gradients and parameters sharded over N = DP x CP = 4
    ranks), optimizer state offloaded (cpu)``."""
    if rep["engine"] != "deepspeed":
        return f"engine megatron, distributed optimizer: {rep['distributed_optimizer']}"
    stage = rep["zero_stage"]
    over = f" over N = DP x CP = {rep['zero_ranks']} ranks" if stage else ""
    off = [f"{'optimizer state' if k == 'optimizer' else 'parameters'} offloaded ({v})"
           for k, v in rep["offload"].items() if v != "none"]
    return ", ".join([f"engine deepspeed ZeRO-{stage} ({_ZERO_SHARDS[stage]}{over})"] + off)


def format_report(rep: dict[str, Any]) -> str:
    """JSON line (machine-readable) followed by a human table, GiB per rank."""
    gib = 2 ** 30
    lines = [json.dumps(rep)]
    lines.append(f"layout TP={rep['tensor_parallel']} PP={rep['pipeline_parallel']} CP={rep['context_parallel']} "
                 f"DP={rep['data_parallel']} (world {rep['world']}), {engine_line(rep)}, bytes/param "
                 f"{rep['bytes_per_param']}")
    w = max([6] + [len(s["layers"]) for s in rep["shards"]])  # the stage's whole layer pattern, never cut
    lines.append(f"{'pp':>3} {'tp':>3} {'layers':>{w}} {'params':>14} {'param GiB':>10} {'grad GiB':>9} "
                 f"{'optim GiB':>10} {'total GiB':>10}")
    for s in rep["shards"]:
        lines.append(f"{s['pp_rank']:>3} {s['tp_rank']:>3} {s['layers']:>{w}} {s['params']:>14,} "
                     f"{s['param_bytes'] / gib:>10.3f} {s['grad_bytes'] / gib:>9.3f} "
                     f"{s['optimizer_bytes'] / gib:>10.3f} {s['total_bytes'] / gib:>10.3f}")
    if any(s["offloaded_bytes"] for s in rep["shards"]):
        lines.append(f"off the device per rank (not in total): up to "
                     f"{max(s['offloaded_bytes'] for s in rep['shards']) / gib:.3f} GiB")
    return "\n".join(lines)


__all__ = ["KIND_OF_LETTER", "ShardMemory", "bytes_entry", "bytes_per_param", "closed_form_params", "engine_bytes_per_param",
           "engine_line", "format_report", "layout_memory", "report", "zero_bytes_per_param"]
