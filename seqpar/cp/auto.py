"""Automatic CP schemes: a time model per (kind, scheme, Ulysses degree) from the exact bytes of
:func:`seqpar.cp.scheme_cost`, a compute model (:mod:`seqpar.kernels.flops` over a peak TFLOP/s)
and the cluster topology, and the choice of the fastest scheme per attention kind
(:func:`recommend`) and for a whole model with one shared USP degree (:func:`choose_schemes`,
what a recipe's ``parallel.cp_schemes: auto`` runs).

The model, per layer (forward + backward), for the busiest rank (docs/cp.md, "Automatic schemes"):

- compute ``T_c`` = the attention FLOPs the kernels run (``attention_flops(..., backward=True,
  recompute=True)``, summed per document) x the busiest rank's share / (``peak_tflops`` x 1e12).
  The share is ``1 / P`` under Ulysses (heads split evenly) and ``imbalance / P`` for
  token-sharded schemes (allgather, ring; usp on its merged groups), with ``imbalance`` the
  ``max / mean`` of :class:`seqpar.cp.CostModel` over the partition (1.0 for causal softmax under
  zigzag).
- communication: each collective's bytes (``scheme_cost``, the busiest rank) over the bandwidth of
  the link its group crosses: ``intra_node_gbytes_per_s`` when every group of that kind lies in one
  node, else ``inter_node_gbytes_per_s``. Groups follow megatron-core's rank order (TP fastest,
  then CP): the CP group spans ``TP x P`` consecutive ranks; USP's Ulysses group ``TP x U`` of
  them, its ring group strides by ``TP x U``. A group is "inside a node" only if it is for every
  DP / PP replica (the worst placement decides).
- overlap: the ring (softmax / s2 / moh, and usp's ring over the ``P / U`` groups) posts the next
  hop before it computes the current block, so its transfers hide behind ``(P_r - 1) / P_r`` of the
  compute (``P_r`` ring steps, one per block, the first block local):
  ``T = T_c + T_serial + max(0, T_ring - T_c (P_r - 1) / P_r)``. All-gather, reduce-scatter and
  all-to-all wait for their data: ``T = T_c + T_serial``. ``time_no_overlap_s`` is
  ``T_c + T_serial + T_ring`` for every scheme. The choice ranks by ``time_no_overlap_s`` unless
  ``overlap=True`` (recipe ``parallel.cp_auto_overlap``): see :func:`recommend`.
- not modelled: per-message latency, kernel efficiency below peak (set ``peak_tflops`` to the
  attention kernels' achieved rate to account for it), the memory each scheme needs. LASP-1
  (lightning ring) is never a candidate: its ``P - 1`` hops are a sequential chain whose
  latency the byte model does not see, and LASP-2 moves the same states in one all-gather
  (:func:`predict` still prices it, for a recipe that fixes it, with its hops not hidden).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from seqpar.kernels.flops import PEAK_TFLOPS

__all__ = ["Candidate", "Recommendation", "SchemePlan", "Topology", "choose_schemes", "predict", "recommend",
           "H100_PEAK_TFLOPS", "NVLINK_GBYTES_PER_S", "INFINIBAND_GBYTES_PER_S"]

# Defaults of the topology and compute model, per direction (what one GPU can receive):
NVLINK_GBYTES_PER_S = 450.0  # NVLink 4 (H100 / H200 SXM, NVSwitch): 900 GB/s bidirectional per GPU
INFINIBAND_GBYTES_PER_S = 50.0  # one 400 Gb/s InfiniBand NDR NIC per GPU (DGX H100): 50 GB/s
H100_PEAK_TFLOPS = dict(PEAK_TFLOPS)["H100"]["bf16"]  # dense bf16, H100 SXM: 989.4

_ORDER = ("allgather", "ring", "ulysses", "usp")  # tie-break: the simplest scheme first


def _positive(name: str, v: Any, integer: bool) -> None:
    ok = (isinstance(v, int) if integer else isinstance(v, (int, float))) and not isinstance(v, bool)
    if not ok or not v > 0 or v != v or v == float("inf"):
        what = "a positive int" if integer else "a finite number > 0"
        raise ValueError(f"{name} must be {what}, got {v!r}")


@dataclass(frozen=True)
class Topology:
    """Where a CP group's ranks sit and how fast they talk (per GPU, per direction, GB/s = 1e9 B/s).

    Args:
        gpus_per_node: GPUs (ranks) per node (default 8: DGX / HGX H100).
        intra_node_gbytes_per_s: bandwidth between GPUs of one node (default 450: NVLink 4).
        inter_node_gbytes_per_s: bandwidth between nodes per GPU (default 50: InfiniBand NDR 400 Gb/s).
        tensor_parallel: TP size (CP ranks are ``tensor_parallel`` global ranks apart).
    """

    gpus_per_node: int = 8
    intra_node_gbytes_per_s: float = NVLINK_GBYTES_PER_S
    inter_node_gbytes_per_s: float = INFINIBAND_GBYTES_PER_S
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        _positive("Topology.gpus_per_node", self.gpus_per_node, True)
        _positive("Topology.tensor_parallel", self.tensor_parallel, True)
        _positive("Topology.intra_node_gbytes_per_s", self.intra_node_gbytes_per_s, False)
        _positive("Topology.inter_node_gbytes_per_s", self.inter_node_gbytes_per_s, False)

    def spans_nodes(self, world: int, groups: Sequence[Sequence[int]]) -> bool:
        """Whether any of ``groups`` (lists of CP ranks of a CP group of ``world`` ranks) crosses a
        node boundary, for any placement of the CP group (megatron order: global rank =
        ``offset + cp_rank x TP + tp_rank``, ``offset`` a multiple of ``TP x world``)."""
        g, tp = self.gpus_per_node, self.tensor_parallel
        for d in range(g):  # offsets modulo the node size: every placement a replica can have
            off = d * tp * world
            for t in range(tp):
                for grp in groups:
                    nodes = {(off + r * tp + t) // g for r in grp}
                    if len(nodes) > 1:
                        return True
        return False

    def link(self, world: int, groups: Sequence[Sequence[int]]) -> tuple[str, float]:
        """``("intra" | "inter", bytes per second)`` of the link these groups' collectives cross."""
        if self.spans_nodes(world, groups):
            return "inter", self.inter_node_gbytes_per_s * 1e9
        return "intra", self.intra_node_gbytes_per_s * 1e9


@dataclass(frozen=True)
class Candidate:
    """Predicted cost of one scheme for one layer (forward + backward) on the busiest rank."""

    scheme: str
    ulysses_degree: Optional[int]
    bytes: int
    """Bytes received by the busiest rank (``scheme_cost``, forward + backward)."""
    compute_s: float
    comm_s: float
    """All transfer time, nothing hidden (the sum over collectives of bytes / link bandwidth)."""
    time_s: float
    """Predicted time with the overlap the scheme has (the ring's hops behind its compute)."""
    time_no_overlap_s: float
    links: tuple[tuple[str, str], ...] = ()
    """(group, "intra" | "inter") of each group the scheme talks over: "cp", or usp's "ulysses" / "ring"."""

    def predicted(self, overlap: bool) -> float:
        """The time the choice compares: ``time_s`` with ``overlap``, else ``time_no_overlap_s``."""
        return self.time_s if overlap else self.time_no_overlap_s

    @property
    def label(self) -> str:
        return f"usp(U={self.ulysses_degree})" if self.scheme == "usp" else self.scheme


@dataclass(frozen=True)
class Recommendation:
    """:func:`recommend`'s answer: the chosen scheme (and Ulysses degree for usp) and every
    candidate considered, fastest first."""

    kind: str
    scheme: str
    ulysses_degree: Optional[int]
    candidates: tuple[Candidate, ...]
    overlap: bool = False
    """Whether the ranking credited the ring's overlap (``Candidate.time_s``) or not (``time_no_overlap_s``)."""

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def times(self) -> dict[str, float]:
        """``{label: predicted seconds}`` of every candidate (the time the ranking compared)."""
        return {c.label: c.predicted(self.overlap) for c in self.candidates}


def _fits(heads: int, kv_heads: int, degree: int) -> bool:
    # Ulysses over `degree` ranks: query heads split evenly; kv heads split, or replicated to the degree
    return heads % degree == 0 and (kv_heads % degree == 0 or degree % kv_heads == 0)


def _flops(kind: str, docs: Sequence[int], *, batch: int, heads: int, kv_heads: int, head_dim: int,
           v_head_dim: Optional[int], layout: Any, moh_active: float, window: Optional[int]) -> float:
    from seqpar.kernels.flops import attention_flops

    return sum(attention_flops(kind, batch=batch, seq_len=n, heads=heads, head_dim=head_dim, v_head_dim=v_head_dim,
                               kv_heads=kv_heads, layout=layout, active_fraction=moh_active, backward=True,
                               recompute=True, window=window) for n in docs if n)


def predict(kind: str, scheme: str, *, world: int, seq_len: int, heads: int, kv_heads: int, head_dim: int,
            v_head_dim: Optional[int] = None, batch: int = 1, dtype: Any = torch.bfloat16, balance: str = "zigzag",
            layout: Any = None, ulysses_degree: Optional[int] = None, moh_active: float = 1.0,
            topology: Optional[Topology] = None, peak_tflops: float = H100_PEAK_TFLOPS,
            cu_seqlens: Any = None, cost: Any = None, window: Optional[int] = None) -> Candidate:
    """The predicted time of one ``kind`` layer under ``scheme`` (module docstring: the model).

    Shapes are per TP rank: ``heads`` / ``kv_heads`` the heads one rank of the CP group holds,
    ``seq_len`` N the global length, ``batch`` rows of N tokens (or ``cu_seqlens``, host values:
    packed documents, ``batch=1``); ``layout`` the S2 layout (kind ``s2``); ``moh_active`` MoH's
    ``(shared + top_k) / heads``; ``topology`` (default :class:`Topology`); ``peak_tflops`` the
    rate the attention kernels run at (default H100 SXM dense bf16). ``balance`` the partition
    (a ``cp.BALANCERS`` name; ``"cost"`` needs ``cost``, the *whole model's* ``cp.CostModel``: the
    one partition every layer shares); ``window``: softmax's sliding window (its bytes, FLOPs and
    per-rank work).
    """
    from seqpar.cp.api import SUPPORTED, _stride_block, scheme_cost
    from seqpar.cp.cost import CostModel
    from seqpar.cp.partition import resolve

    topo = Topology() if topology is None else topology
    if not isinstance(topo, Topology):
        raise ValueError(f"topology must be a seqpar.cp.Topology, got {type(topology).__name__}")
    _positive("peak_tflops", peak_tflops, False)
    if (kind, scheme) not in SUPPORTED:
        raise ValueError(f"kind={kind!r} with scheme={scheme!r} is not supported")
    p = world
    if scheme == "usp":
        u = ulysses_degree
        if isinstance(u, bool) or not isinstance(u, int) or u < 1 or p % u or not _fits(heads, kv_heads, u):
            raise ValueError(f"usp needs ulysses_degree dividing world={p} and the heads ({heads} query, {kv_heads} "
                             f"kv: divisible, or the kv heads dividing it), got {u!r}")
    elif ulysses_degree is not None:
        raise ValueError(f"ulysses_degree is a scheme='usp' option, got scheme={scheme!r}")
    if scheme == "ulysses" and not _fits(heads, kv_heads, p):
        raise ValueError(f"ulysses needs the {heads} query heads divisible by world={p} and the {kv_heads} kv heads "
                         f"divisible by it (or dividing it)")
    if window is not None and kind != "softmax":
        raise ValueError(f"window is the softmax layers' sliding window, got it for kind={kind!r}")
    part = resolve(p, seq_len, balance=balance, cu_seqlens=cu_seqlens, cost=cost,
                   block_size=_stride_block(balance, layout))
    comm = scheme_cost(kind, scheme, world=p, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       v_head_dim=v_head_dim, batch=batch, dtype=dtype, layout=layout, ulysses_degree=ulysses_degree,
                       partition=part, window=window)
    # compute: the FLOPs of the whole layer x the busiest rank's share
    docs = list(part.doc_real) if part.varlen else [seq_len]
    total = _flops(kind, docs, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_head_dim,
                   layout=layout, moh_active=moh_active, window=window)
    if scheme == "ulysses":
        share = 1.0 / p
    else:
        work = CostModel(layers={kind: 1}, heads=heads, kv_heads=kv_heads, s2_layout=layout,
                         moh_active=moh_active if kind == "moh" else 1.0, softmax_window=window)
        share = work.imbalance(part.merged(ulysses_degree) if scheme == "usp" else part) / p
    compute = total * share / (peak_tflops * 1e12)
    # communication: each collective over the link of its group
    everyone = [list(range(p))]
    if scheme == "usp":
        u = ulysses_degree
        uly = topo.link(p, [list(range(i * u, (i + 1) * u)) for i in range(p // u)])
        ring = topo.link(p, [list(range(j, p, u)) for j in range(u)])
        links = (("ulysses", uly[0]), ("ring", ring[0]))
        steps = p // u
    else:
        uly = ring = topo.link(p, everyone)
        links = (("cp", uly[0]),)
        steps = p
    serial = hidden = 0.0
    nbytes = 0
    for side in comm.values():
        for op, rec in side.items():
            nbytes += rec["bytes"]
            if op == "send_recv" and kind != "lightning":  # the ring's hops behind its blocks
                hidden += rec["bytes"] / ring[1]
            elif scheme == "usp" and op != "all_to_all":  # LASP-2 over usp's ring group
                serial += rec["bytes"] / ring[1]
            else:
                serial += rec["bytes"] / uly[1]
    exposed = max(0.0, hidden - compute * (steps - 1) / steps)
    return Candidate(scheme, ulysses_degree if scheme == "usp" else None, nbytes, compute, serial + hidden,
                     compute + serial + exposed, compute + serial + hidden, links)


def candidates(kind: str, world: int, heads: int, kv_heads: int,
               ulysses_degrees: Optional[Sequence[int]] = None) -> list[tuple[str, Optional[int]]]:
    """The (scheme, Ulysses degree) pairs :func:`recommend` weighs for ``kind`` at ``world`` ranks:
    allgather, ring (not for lightning: LASP-1), ulysses when the heads split over ``world``, usp
    for every degree ``1 < U < world`` dividing ``world`` that the heads allow (``ulysses_degrees``
    restricts the degrees)."""
    from seqpar.cp.api import SUPPORTED

    out: list[tuple[str, Optional[int]]] = [("allgather", None)]
    if kind != "lightning":
        out.append(("ring", None))
    if _fits(heads, kv_heads, world):
        out.append(("ulysses", None))
    for u in range(2, world):
        if world % u == 0 and _fits(heads, kv_heads, u) and (ulysses_degrees is None or u in ulysses_degrees):
            out.append(("usp", u))
    return [(s, u) for s, u in out if (kind, s) in SUPPORTED]


def recommend(kind: str, *, world: int, seq_len: int, heads: int, kv_heads: int, head_dim: int,
              v_head_dim: Optional[int] = None, batch: int = 1, dtype: Any = torch.bfloat16,
              balance: str = "zigzag", layout: Any = None, moh_active: float = 1.0,
              topology: Optional[Topology] = None, peak_tflops: float = H100_PEAK_TFLOPS,
              cu_seqlens: Any = None, ulysses_degrees: Optional[Sequence[int]] = None,
              overlap: bool = False, cost: Any = None, window: Optional[int] = None) -> Recommendation:
    """The fastest CP scheme for one ``kind`` layer: every candidate of :func:`candidates`
    (allgather / LASP-2, ring, ulysses, usp at every valid Ulysses degree, which with
    ``U = gpus_per_node`` is the hierarchical layout: Ulysses inside a node x ring or LASP-2
    across nodes) predicted by :func:`predict`, fastest first (ties: fewer bytes, then allgather,
    ring, ulysses, usp by degree).

    Returns a :class:`Recommendation` (``.scheme``, ``.ulysses_degree``, ``.candidates`` with bytes,
    compute, communication and time with and without overlap). Arguments as :func:`predict`.

    >>> rec = cp.recommend("softmax", world=16, seq_len=32768, heads=32, kv_heads=8, head_dim=128,
    ...                    topology=cp.Topology(gpus_per_node=8))
    >>> rec.scheme, rec.ulysses_degree
    ('usp', 8)
    """
    from seqpar.cp.api import KINDS

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 2:
        raise ValueError(f"recommend needs a CP world of at least 2 ranks, got world={world!r} (one rank: no CP)")
    if kind == "s2" and layout is None:
        raise ValueError("recommend for kind='s2' needs layout= (its bytes and FLOPs depend on it)")
    if not isinstance(overlap, bool):
        raise ValueError(f"overlap must be a bool, got {overlap!r}")
    cands = [predict(kind, s, world=world, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                     v_head_dim=v_head_dim, batch=batch, dtype=dtype, balance=balance, layout=layout,
                     ulysses_degree=u, moh_active=moh_active, topology=topology, peak_tflops=peak_tflops,
                     cu_seqlens=cu_seqlens, cost=cost, window=window)
             for s, u in candidates(kind, world, heads, kv_heads, ulysses_degrees)]
    cands.sort(key=lambda c: (c.predicted(overlap), c.bytes, _ORDER.index(c.scheme), c.ulysses_degree or 0))
    return Recommendation(kind, cands[0].scheme, cands[0].ulysses_degree, tuple(cands), overlap)


@dataclass(frozen=True)
class SchemePlan:
    """:func:`choose_schemes`' answer: the scheme per kind, the one USP degree (1: no usp) and each
    kind's :class:`Recommendation` (every candidate, with the chosen one's prediction)."""

    schemes: dict[str, str]
    ulysses_degree: int
    per_kind: dict[str, Recommendation] = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)

    def chosen(self, kind: str) -> Candidate:
        """The chosen candidate of ``kind`` (its predicted bytes and time)."""
        s = self.schemes[kind]
        u = self.ulysses_degree if s == "usp" else None
        return next(c for c in self.per_kind[kind].candidates if c.scheme == s and c.ulysses_degree == u)

    def time_s(self) -> float:
        """Predicted attention time of one step's layers of every kind (one row, forward + backward;
        the time the choice compared: with or without overlap)."""
        return sum(n * self.chosen(k).predicted(self.per_kind[k].overlap) for k, n in self.layers.items())


def choose_schemes(layers: Mapping[str, int], *, world: int, layouts: Optional[Mapping[str, Any]] = None,
                   softmax_window: Optional[int] = None, **kw: Any) -> SchemePlan:
    """Schemes for a whole model: per kind of ``layers`` (``{kind: number of layers}``) the fastest
    candidate, with *one* Ulysses degree shared by every kind that runs usp (a model has one USP
    degree: ``usp_ulysses_degree``). Every degree is tried; the plan with the least summed time
    (layers x predicted time) wins (ties: no usp, then the smaller degree). ``layouts`` maps
    ``"s2"`` to its layout, ``softmax_window`` is the softmax layers' sliding window; ``kw`` as
    :func:`recommend` (``layout`` and ``window`` are taken from these two; with ``balance="cost"``,
    ``cost`` is the whole model's ``cp.CostModel``)."""
    if not layers or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in layers.values()):
        raise ValueError(f"layers must map attention kinds to layer counts >= 0, got {dict(layers)!r}")
    layers = {k: n for k, n in layers.items() if n}
    per = {k: recommend(k, world=world, layout=(layouts or {}).get(k),
                        window=softmax_window if k == "softmax" else None, **kw) for k in sorted(layers)}
    degrees = sorted({c.ulysses_degree for r in per.values() for c in r.candidates if c.scheme == "usp"})
    best: Optional[tuple[float, int, dict[str, str]]] = None
    for u in [1] + degrees:
        schemes, total = {}, 0.0
        for k, rec in per.items():
            c = next(c for c in rec.candidates if c.scheme != "usp" or c.ulysses_degree == u)  # fastest first
            schemes[k] = c.scheme
            total += layers[k] * c.predicted(rec.overlap)
        if u != 1 and "usp" not in schemes.values():
            continue
        if best is None or total < best[0] * (1 - 1e-12):
            best = (total, u, schemes)
    assert best is not None
    return SchemePlan(best[2], best[1], per, dict(layers))
