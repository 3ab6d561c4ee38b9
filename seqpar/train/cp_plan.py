"""The recipe's CP schemes, predicted and (with ``parallel.cp_schemes: auto``) chosen.

:func:`resolve_auto` is the one place that turns ``auto`` into a scheme per layer kind and the USP
degree (``seqpar.cp.choose_schemes`` on the recipe's model, sequence length, CP size and topology);
``RunConfig`` calls it while validating a recipe, so every later reader (``--check``, ``--dry-run``,
the model build, the launchers' pre-flight) sees the resolved ``parallel.cp_schemes`` /
``usp_ulysses_degree`` and no process group exists yet. :func:`report` / :func:`format_lines` give
``--dry-run``'s CP section: per layer kind the scheme, the Ulysses degree, the predicted bytes per
rank and the predicted time per layer (and every candidate when ``auto`` chose).

The model's inputs from the recipe (docs/cp.md "Automatic schemes" lists every assumption): one
row of ``data.seq_len`` tokens as one document (the worst case of causal work), heads per TP rank,
``model.dtype``'s element size, the placement of ``parallel.cp_balance`` (zigzag, or the cost
balancer's partition of the whole model), the S2 layout, the softmax layers' sliding window and MoH's
active heads of the model, ``train.peak_tflops`` (else an H100 SXM's dense peak for the model's math mode,
``seqpar.kernels.flops.PEAK_TFLOPS``: bf16 989.4) and the ``parallel`` topology fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["AutoChoice", "format_lines", "model_inputs", "report", "resolve_auto"]


@dataclass(frozen=True)
class AutoChoice:
    """What ``parallel.cp_schemes: auto`` resolved to: ``plan`` (a ``seqpar.cp.SchemePlan``), or
    None with ``reason`` when there is nothing to choose (CP size 1)."""

    plan: Any
    reason: str = ""


def model_inputs(cfg: Any) -> tuple[dict[str, int], dict[str, Any]]:
    """``({kind: layers}, keyword arguments of seqpar.cp.choose_schemes)`` of a recipe (any schemes)."""
    from seqpar.cp import Topology
    from seqpar.megatron.config import s2_layout
    from seqpar.kernels.flops import PEAK_TFLOPS, math_mode

    m, par = cfg.model, cfg.parallel
    shape, tp = m.shape, par.tensor_parallel
    layers = m.layer_kinds
    heads = shape.num_attention_heads
    kw = dict(world=par.context_parallel, seq_len=cfg.data.seq_len, heads=heads // tp,
              kv_heads=shape.num_query_groups // tp, head_dim=shape.hidden_size // heads,
              dtype=torch.bfloat16 if m.dtype == "bf16" else torch.float32,
              moh_active=m.moh_active,
              topology=Topology(gpus_per_node=par.gpus_per_node, intra_node_gbytes_per_s=par.intra_node_gbytes_per_s,
                                inter_node_gbytes_per_s=par.inter_node_gbytes_per_s, tensor_parallel=tp),
              peak_tflops=cfg.train.peak_tflops or dict(PEAK_TFLOPS)["H100"][math_mode(m.dtype)],
              overlap=par.cp_auto_overlap)
    if par.cp_balance == "cost":  # the partition every layer shares is balanced on the whole model
        from seqpar.train.runtime import cost_model

        kw.update(balance="cost", cost=cost_model(cfg))
    return layers, {**kw, "layouts": {"s2": s2_layout(m)}, "softmax_window": m.softmax_window}


def resolve_auto(cfg: Any) -> AutoChoice:
    """Choose the schemes of a recipe with ``parallel.cp_schemes: auto`` and write them into
    ``cfg.parallel`` (``cp_schemes`` per kind, ``usp_ulysses_degree``); kinds the model does not
    have keep the default. Raises ValueError naming ``parallel.cp_schemes`` when the model cannot be
    predicted (e.g. heads not divisible by the TP size: the layout check says why)."""
    from seqpar.cp import choose_schemes
    from seqpar.megatron.config import DEFAULT_SCHEMES

    par = cfg.parallel
    if "usp_ulysses_degree" in par.model_fields_set:
        raise ValueError(f"parallel.usp_ulysses_degree={par.usp_ulysses_degree} is chosen by parallel.cp_schemes: "
                         f"auto; remove it, or give parallel.cp_schemes as a mapping kind -> scheme")
    shape, tp = cfg.model.shape, par.tensor_parallel
    reason = ("parallel.context_parallel=1: no context parallelism, nothing to choose" if par.context_parallel == 1
              else "the heads do not split over parallel.tensor_parallel (the layout check says how to fix it)"
              if shape.num_attention_heads % tp or shape.num_query_groups % tp else "")
    if reason:
        par.cp_schemes, par.usp_ulysses_degree = dict(DEFAULT_SCHEMES), 1
        return AutoChoice(None, reason)
    layers, kw = model_inputs(cfg)
    plan = choose_schemes(layers, **kw)
    par.cp_schemes = {**DEFAULT_SCHEMES, **plan.schemes}
    par.usp_ulysses_degree = plan.ulysses_degree
    return AutoChoice(plan)


def _row(c: Any) -> dict[str, Any]:
    return {"scheme": c.scheme, "ulysses_degree": c.ulysses_degree, "bytes": c.bytes, "compute_ms": c.compute_s * 1e3,
            "comm_ms": c.comm_s * 1e3, "time_ms": c.time_s * 1e3, "time_no_overlap_ms": c.time_no_overlap_s * 1e3,
            "links": dict(c.links)}


def report(cfg: Any, auto: Optional[AutoChoice] = None) -> Optional[dict[str, Any]]:
    """JSON-able CP section of ``--dry-run`` (None without CP): per layer kind the scheme the model is
    built with, its Ulysses degree, layers, predicted bytes and times per layer, ``auto`` (whether it
    was chosen) and, when chosen, every candidate (fastest first)."""
    from seqpar.cp import predict

    par = cfg.parallel
    if par.context_parallel == 1:
        return None
    layers, kw = model_inputs(cfg)
    layouts, overlap, window = kw.pop("layouts"), kw.pop("overlap"), kw.pop("softmax_window")
    plan = auto.plan if auto is not None else None
    kinds = {}
    for kind, n in sorted(layers.items()):
        scheme = par.cp_schemes[kind]
        u = par.usp_ulysses_degree if scheme == "usp" else None
        if plan is not None:
            chosen, cands = plan.chosen(kind), [_row(c) for c in plan.per_kind[kind].candidates]
        else:
            chosen, cands = predict(kind, scheme, ulysses_degree=u, layout=layouts.get(kind),
                                    window=window if kind == "softmax" else None, **kw), None
        kinds[kind] = {"layers": n, **_row(chosen), **({"candidates": cands} if cands is not None else {})}
    return {"auto": plan is not None, "ranked_by": "time_ms" if overlap else "time_no_overlap_ms",
            "context_parallel": par.context_parallel, "usp_ulysses_degree": par.usp_ulysses_degree,
            "gpus_per_node": par.gpus_per_node, "intra_node_gbytes_per_s": par.intra_node_gbytes_per_s,
            "inter_node_gbytes_per_s": par.inter_node_gbytes_per_s, "kinds": kinds}


def _label(r: dict[str, Any]) -> str:
    return f"usp(U={r['ulysses_degree']})" if r["scheme"] == "usp" else r["scheme"]


def format_lines(rep: Optional[dict[str, Any]]) -> list[str]:
    """Human lines of :func:`report`: one per layer kind (and its runners-up when chosen)."""
    if rep is None:
        return []
    how = "chosen by parallel.cp_schemes: auto" if rep["auto"] else "from parallel.cp_schemes"
    rank = ("; ranked " + ("with" if rep["ranked_by"] == "time_ms" else "without") + " overlap") if rep["auto"] else ""
    out = [f"CP schemes ({how}; CP={rep['context_parallel']}, {rep['gpus_per_node']} GPUs/node, "
           f"{rep['intra_node_gbytes_per_s']:g} GB/s intra-node, {rep['inter_node_gbytes_per_s']:g} GB/s inter-node; "
           f"predicted per layer, forward + backward, busiest rank{rank}):",
           f"{'kind':>9} {'layers':>6} {'scheme':>12} {'MB/rank':>10} {'compute ms':>10} {'comm ms':>9} "
           f"{'time ms':>9} {'no-overlap':>10}  links"]
    for kind, r in rep["kinds"].items():
        links = ", ".join(f"{g} {w}" for g, w in r["links"].items())
        out.append(f"{kind:>9} {r['layers']:>6} {_label(r):>12} {r['bytes'] / 1e6:>10.3f} {r['compute_ms']:>10.4f} "
                   f"{r['comm_ms']:>9.4f} {r['time_ms']:>9.4f} {r['time_no_overlap_ms']:>10.4f}  {links}")
        others = [c for c in r.get("candidates", []) if _label(c) != _label(r)]
        if others:
            key = rep["ranked_by"]
            out.append(f"{'':>17} others: " + ", ".join(f"{_label(c)} {c[key]:.4f} ms" for c in others))
    return out
