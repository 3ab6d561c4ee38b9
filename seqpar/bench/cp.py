"""Context-parallel suite: bytes per rank, compute per rank and a modelled step time per kind and
scheme.

1. Ledger check: every supported (kind, scheme) runs on 4 spawned gloo ranks at small shapes —
   plain, with packed documents of awkward lengths (``cu_seqlens``) and at a length that is no
   multiple of P (padding); the bytes the comm ledger records (fwd and bwd) must equal
   ``cp.scheme_cost`` exactly, and a steady-state layer (``cp.step_checks``) must make 0 host
   syncs. A mismatch fails the suite. Then bytes per rank at user scale, with and without packed
   documents, the S2 exchange's buffers vs an all-gather, and the joint cost balancer vs zigzag.
2. Compute per rank, measured: each kind's kernel (forward + backward) is timed on this device at a
   local shape; its rate (FLOP/s of the FLOPs the mask needs, :mod:`seqpar.kernels.flops`) turns a
   rank's share of the FLOPs (balanced schemes: total / P) into milliseconds at any N and P.
3. Model, per layer, at P = 8 ... 64 on NVLink (450 GB/s) and InfiniBand (50 GB/s): communication
   time = bytes received per rank (``cp.scheme_cost``, fwd + bwd) / bandwidth + message steps x
   latency (5 / 10 us; 1 step per point-to-point call, P - 1 per collective); step time without
   overlap = compute + communication, with overlap = max(compute, communication) — except LASP-1,
   whose states pass rank to rank through dependent hops (never overlapped). Shapes: the 1b
   preset's attention (16 heads, 8 kv heads, d 128, bf16, batch 1), as in the LASP-2 paper's
   Linear-Llama3-1B comparison at 2048K tokens (LASP-2 vs Ring Attention: here ``lightning /
   allgather`` vs ``softmax / ring``, and ``lightning / ring`` = LASP-1); S2 (block 64, local 4,
   vert_stride 8): the stride-aware exchange vs a plain K/V all-gather (``softmax / allgather``
   moves exactly those bytes).
"""

from __future__ import annotations

import tempfile
from typing import Any, Optional

import torch

from seqpar import cp
from seqpar.bench.common import Context, Impl, SuiteResult, grad_call, median_ms, plotter, time_group
from seqpar.bench.report import new_figure, save_figure
from seqpar.kernels import S2Layout, flash_attention, lightning_attention, lightning_slopes, moh_attention, s2_attention
from seqpar.kernels.flops import attention_flops

LINKS = {"nvlink": 450e9, "ib": 50e9}  # bytes / s per rank
LATENCY = {"nvlink": 5e-6, "ib": 10e-6}  # seconds per message step (an assumption of the model, stated in the report)
SMALL = dict(b=1, h=4, hkv=2, d=16)
SMALL_LAYOUT = S2Layout(block_size=16, local_blocks=2, vert_stride=2)  # chunks of 2 blocks: exchange applies
MODEL = dict(heads=16, kv_heads=8, head_dim=128, dtype=torch.bfloat16)  # the 1b preset's attention
MODEL_LAYOUT = S2Layout(block_size=64, local_blocks=4, vert_stride=8)
LABELS = {("lightning", "allgather"): "LASP-2", ("lightning", "ring"): "LASP-1", ("s2", "allgather"): "s2 exchange",
          ("softmax", "ring"): "ring attention", ("softmax", "allgather"): "all-gather K/V"}


# ------------------------------------------------------------------------------------ ledger check

VARIANTS = ("plain", "docs", "odd")  # no documents; packed documents; N % P != 0 (padding slots)


def _small_inputs(kind: str, scheme: str, world: int, rank: int, variant: str = "plain"):
    g = torch.Generator().manual_seed(0)
    n = 2 * world * 32 + (3 if variant == "odd" else 0)
    q = torch.randn(SMALL["b"], n, SMALL["h"], SMALL["d"], generator=g)
    k = torch.randn(SMALL["b"], n, SMALL["hkv"], SMALL["d"], generator=g)
    v = torch.randn(SMALL["b"], n, SMALL["hkv"], SMALL["d"], generator=g)
    kw: dict[str, Any] = {"backend": "torch"}
    cu = None
    if variant == "docs":  # documents of 1 token, shorter than a chunk, none a multiple of 2P
        lens = [5, n // 2 - 6, 1, n - n // 2]
        cu = kw["cu_seqlens"] = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    else:
        kw["seq_len"] = n
    if kind == "lightning":
        kw["slope"] = torch.linspace(0.1, 0.5, SMALL["h"])
    if kind == "s2":
        kw["layout"] = SMALL_LAYOUT
    if scheme == "usp":
        kw["ulysses_degree"] = 2
    part = cp.make_partition(n, (rank, world), cu_seqlens=cu)
    if kind == "moh":
        kw["gates"] = part.shard(torch.rand(SMALL["b"], n, SMALL["h"], generator=g), rank).requires_grad_()
    loc = [part.shard(t, rank).requires_grad_() for t in (q, k, v)]
    return n, cu, loc, kw


def _ledger_worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=world)
    out = {}
    for variant in VARIANTS:
        for kind, scheme in sorted(cp.SUPPORTED):
            n, cu, (q, k, v), kw = _small_inputs(kind, scheme, world, rank, variant)
            with cp.comm_ledger() as fwd:
                o = cp.attention(q, k, v, kind=kind, scheme=scheme, **kw)
            o = o[0] if kind == "lightning" else o
            with cp.comm_ledger() as bwd:
                o.float().sum().backward()
            # steady state (signature agreed, index plans cached): host syncs of one layer, fwd + bwd
            _, _, (q, k, v), kw = _small_inputs(kind, scheme, world, rank, variant)
            with cp.count_host_syncs() as syncs:
                with cp.step_checks():
                    o = cp.attention(q, k, v, kind=kind, scheme=scheme, **kw)
                    (o[0] if kind == "lightning" else o).float().sum().backward()
                    per_layer = syncs.total
                per_step = syncs.total
            out[(variant, kind, scheme)] = {"fwd": fwd.summary(), "bwd": bwd.summary(), "n": n, "cu": cu,
                                            "syncs": (per_layer, per_step)}
    if rank == 0:
        torch.save(out, f"{tmp}/ledger.pt")
    dist.destroy_process_group()


def ledger_check(world: int = 4) -> list[dict]:
    """Rank 0's ledger vs ``cp.scheme_cost`` for every supported pair and variant on ``world``
    spawned gloo ranks; one row per (variant, kind, scheme)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ledger_worker, args=(world, tmp), nprocs=world)
        got = torch.load(f"{tmp}/ledger.pt", weights_only=False)
    rows = []
    for (variant, kind, scheme), rec in got.items():
        cost = cp.scheme_cost(kind, scheme, world=world, seq_len=rec["n"], batch=SMALL["b"], heads=SMALL["h"],
                              kv_heads=SMALL["hkv"], head_dim=SMALL["d"], dtype=torch.float32,
                              gates_dtype=torch.float32, layout=SMALL_LAYOUT if kind == "s2" else None,
                              ulysses_degree=2 if scheme == "usp" else None, rank=0, cu_seqlens=rec["cu"])
        ok = cost["fwd"] == rec["fwd"] and cost["bwd"] == rec["bwd"]
        rows.append({"variant": variant, "kind": kind, "scheme": scheme, "P": world, "N": rec["n"],
                     "ledger_fwd_B": sum(r["bytes"] for r in rec["fwd"].values()),
                     "ledger_bwd_B": sum(r["bytes"] for r in rec["bwd"].values()),
                     "== scheme_cost": "yes" if ok else "NO", "host_syncs_layer": rec["syncs"][0],
                     "host_syncs_step": rec["syncs"][1]})
    return rows


def scale_table() -> list[dict]:
    """Bytes received per rank per layer at user scale (7B-like attention, 128K / 1M tokens)."""
    rows = []
    shape = dict(heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    for world in (8, 32, 64):
        for n in (1 << 17, 1 << 20):
            for kind, scheme in sorted(cp.SUPPORTED):
                if scheme == "ulysses" and shape["heads"] % world:
                    continue
                c = cp.scheme_cost(kind, scheme, world=world, seq_len=n, layout=MODEL_LAYOUT if kind == "s2" else None,
                                   ulysses_degree=8 if scheme == "usp" else None, **shape)
                fwd, bwd, calls = _bytes(c)
                label = {("lightning", "usp"): "usp(u=8, lasp2)", ("softmax", "usp"): "usp(u=8)",
                         ("s2", "usp"): "usp(u=8)", ("moh", "usp"): "usp(u=8)"}.get((kind, scheme),
                                                                                     LABELS.get((kind, scheme), scheme))
                row = {"kind": kind, "scheme": label,
                       "P": world, "N": f"{n >> 10}K", "fwd_MB": fwd / 1e6, "bwd_MB": bwd / 1e6, "calls": calls}
                for name, bw in LINKS.items():
                    row[f"ms_{name}"] = (fwd + bwd) / bw * 1e3
                rows.append(row)
    return rows


def exchange_memory_table() -> list[dict]:
    """Peak extra K/V buffer bytes of the S2 exchange (send + received rows + one buffer ending at the
    rank's last piece) vs the plain all-gather (gathered + reordered full-length copies), bf16."""
    from seqpar.cp.s2_exchange import exchange_buffer_elements

    rows = []
    for world in (8, 32):
        for n in (1 << 17, 1 << 20):
            part = cp.make_partition(n, (0, world))
            for rank in (0, world - 1):
                m = exchange_buffer_elements(part, MODEL_LAYOUT.with_heads(32), kv_heads=8, width=256, rank=rank)
                rows.append({"P": world, "N": f"{n >> 10}K", "rank": rank, "send_MB": m["send"] * 2 / 1e6,
                             "recv_MB": m["recv"] * 2 / 1e6, "buffer_MB": m["buffer"] * 2 / 1e6,
                             "peak_MB": m["total"] * 2 / 1e6, "allgather_peak_MB": m["allgather"] * 2 / 1e6,
                             "ratio": m["total"] / m["allgather"]})
    return rows


def _mixed_docs(n: int) -> list[int]:
    """Packed documents of mixed lengths summing to ``n`` (a fixed draw: 1 token to a quarter of n)."""
    g = torch.Generator().manual_seed(0)
    lens, left = [], n
    while left:
        m = min(left, max(1, int(torch.randint(1, n // 4, (1,), generator=g))))
        lens.append(m)
        left -= m
    return lens


def documents_table() -> list[dict]:
    """Bytes per rank (the busiest) with packed documents vs one sequence, P = 8, 128K tokens: uniform
    documents of 2K and mixed lengths; zigzag splits every document, contiguous keeps them whole
    (the ring then moves only to ranks that hold later tokens of the same document)."""
    shape = dict(heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    world, n = 8, 1 << 17
    docsets = {"one sequence": None, "64 docs of 2K": [2048] * 64, "mixed docs": _mixed_docs(n)}
    rows = []
    for balance in ("zigzag", "contiguous"):
        for kind, scheme in (("softmax", "ring"), ("softmax", "allgather"), ("softmax", "ulysses"),
                             ("s2", "allgather"), ("lightning", "allgather"), ("lightning", "ring"),
                             ("moh", "usp")):
            for label, lens in docsets.items():
                cu = None if lens is None else [0, *torch.tensor(lens).cumsum(0).tolist()]
                c = cp.scheme_cost(kind, scheme, world=world, seq_len=n, balance=balance, cu_seqlens=cu,
                                   layout=MODEL_LAYOUT if kind == "s2" else None,
                                   ulysses_degree=2 if scheme == "usp" else None, **shape)
                fwd, bwd, calls = _bytes(c)
                rows.append({"balance": balance, "kind": kind, "scheme": scheme, "documents": label,
                             "docs": 1 if lens is None else len(lens), "fwd_MB": fwd / 1e6, "bwd_MB": bwd / 1e6,
                             "calls": calls})
    return rows


def window_table() -> list[dict]:
    """Sliding-window softmax (``window=``, Mistral-style), P = 8, 128K tokens, busiest rank: the
    ring moves only the window's halo (contiguous: ``window - 1`` rows from the previous rank, no
    other hop), so does allgather (one all-to-all of the halo rows, and backward only the dK/dV of
    those rows, where the ring re-sends K/V and returns fp32 dK/dV; "full causal" is the plain
    all-gather); Ulysses moves the same bytes as without a window."""
    shape = dict(heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    world, n = 8, 1 << 17
    rows = []
    for balance in ("contiguous", "zigzag"):
        for scheme in ("ring", "allgather", "ulysses"):
            for window in (None, 4096, 32768):
                c = cp.scheme_cost("softmax", scheme, world=world, seq_len=n, balance=balance, window=window, **shape)
                fwd, bwd, calls = _bytes(c)
                rows.append({"balance": balance, "scheme": scheme, "window": "full causal" if window is None
                             else f"{window >> 10}K", "collectives": " + ".join(sorted(set(c["fwd"]) | set(c["bwd"]))),
                             "fwd_MB": fwd / 1e6, "bwd_MB": bwd / 1e6, "calls": calls})
    return rows


def balance_table() -> list[dict]:
    """The joint cost balancer (``balance="cost"``) vs zigzag on packed documents of mixed lengths:
    modelled per-rank work ``max / mean`` (:class:`cp.CostModel` of the whole model), pieces (kernel
    calls per layer), the balancer's host time, and what the placement costs the ring (softmax) and
    LASP-2 in bytes (busiest rank, fwd + bwd)."""
    import time

    shape = dict(heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    models = {"3 s2 : 1 softmax": cp.CostModel(layers={"s2": 3, "softmax": 1}, heads=32, kv_heads=8,
                                               s2_layout=MODEL_LAYOUT),
              "3 lightning : 1 softmax": cp.CostModel(layers={"lightning": 3, "softmax": 1}, heads=32, kv_heads=8)}
    rows = []
    for world, n, docs_label, lens in ((8, 1 << 17, "mixed docs", _mixed_docs(1 << 17)),
                                       (8, 1 << 17, "512 docs of 1..511", [1 + (i * 37) % 511 for i in range(512)]),
                                       (64, 1 << 21, "mixed docs", _mixed_docs(1 << 21))):
        lens = lens if sum(lens) == n else lens + [n - sum(lens)]
        cu = [0, *torch.tensor(lens).cumsum(0).tolist()]
        for label, model in models.items():
            zz = cp.make_partition(n, (0, world), cu_seqlens=cu)
            t0 = time.perf_counter()
            part = cp.make_partition(n, (0, world), balance="cost", cost=model, cu_seqlens=cu)
            host_s = time.perf_counter() - t0
            for name, p in (("zigzag", zz), ("cost", part)):
                ring = cp.scheme_cost("softmax", "ring", world=world, seq_len=n, partition=p, **shape)
                lasp2 = cp.scheme_cost("lightning", "allgather", world=world, seq_len=n, partition=p, **shape)
                rows.append({"P": world, "N": n, "documents": f"{docs_label} ({len(lens)})", "model": label,
                             "balance": name, "imbalance": round(model.imbalance(p), 3),
                             "pieces_max": max(len(x) for x in p.pieces),
                             "host_s": round(host_s, 2) if name == "cost" else "",
                             "ring_MB": sum(r["bytes"] for side in ring.values() for r in side.values()) / 1e6,
                             "lasp2_MB": sum(r["bytes"] for side in lasp2.values() for r in side.values()) / 1e6})
    return rows


def auto_table() -> list[dict]:
    """``cp.recommend``'s choice (the model of ``parallel.cp_schemes: auto``: peak-rate compute + exact
    bytes over the link each group crosses, ranked without overlap) per kind for one node and for CP
    groups spanning nodes (8 GPUs / node, 450 GB/s NVLink, 50 GB/s IB), with the runner-up."""
    rows = []
    for p, n in ((8, 1 << 17), (16, 1 << 17), (64, 1 << 20)):
        topo = cp.Topology(gpus_per_node=8)
        for kind in ("softmax", "s2", "lightning", "moh"):
            if kind == "s2" and n > S2_MAX_N:
                continue
            rec = cp.recommend(kind, world=p, seq_len=n, topology=topo, layout=MODEL_LAYOUT if kind == "s2" else None,
                               moh_active=0.5 if kind == "moh" else 1.0, **MODEL)
            best, second = rec.candidates[0], rec.candidates[1]
            rows.append({"kind": kind, "P": p, "N": f"{n >> 10}K", "nodes": -(-p // 8), "choice": best.label,
                         "MB_per_rank": best.bytes / 1e6, "compute_ms": best.compute_s * 1e3,
                         "time_ms": best.time_no_overlap_s * 1e3, "overlap_ms": best.time_s * 1e3,
                         "runner_up": second.label, "runner_up_ms": second.time_no_overlap_s * 1e3})
    return rows


def _exchange_blocks(part: Any, layout: S2Layout, heads: int, kv_heads: int) -> list[int]:
    """S2 tiles each rank computes under the all-gather exchange: its query pieces over their
    documents' keys (the kernel's plans; a block split between ranks is a tile on both)."""
    from seqpar.kernels.s2.plan import build_plan_uncached

    return [sum(build_plan_uncached(layout, True, kv_heads, p.length, p.end, p.pos, 0, None, layout.block_size)
                .nnz(heads) for p in ps) for ps in part.pieces]


def head_placement_table() -> list[dict]:
    """S2 head placement under Ulysses (``head_placement``: contiguous split vs balanced) against the
    all-gather exchange: tiles per rank (max, min, max / mean) and bytes of the busiest rank (fwd +
    bwd), P = 4 (2 kv heads per rank), 128K tokens, one sequence and mixed packed documents, the
    stride-only layout and the same with 2 dense kv heads."""
    from dataclasses import replace

    from seqpar.cp.s2_heads import head_placement

    shape = dict(heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    world, n = 4, 1 << 17
    rows = []
    for lname, layout in (("stride", MODEL_LAYOUT), ("stride + 2 dense heads", replace(MODEL_LAYOUT, num_dense_heads=2))):
        lay = layout.with_heads(shape["heads"])
        for dname, lens in (("one sequence", None), ("mixed docs", _mixed_docs(n))):
            cu = None if lens is None else [0, *torch.tensor(lens).cumsum(0).tolist()]
            cut = None if cu is None else torch.tensor(cu, dtype=torch.int32)
            part = cp.make_partition(n, (0, world), cu_seqlens=cut)
            hp = head_placement(part, lay, heads=shape["heads"], kv_heads=shape["kv_heads"], degree=world)
            ex = _exchange_blocks(part, lay, shape["heads"], shape["kv_heads"])
            for scheme, label, blocks in (("allgather", "s2 exchange", ex),
                                          ("ulysses", "ulysses contiguous heads", list(hp.contiguous_blocks)),
                                          ("ulysses", "ulysses balanced heads", list(hp.blocks))):
                c = cp.scheme_cost("s2", scheme, world=world, seq_len=n, cu_seqlens=cu, layout=layout, **shape)
                fwd, bwd, _ = _bytes(c)
                rows.append({"layout": lname, "documents": dname, "scheme": label,
                             "blocks_max": max(blocks), "blocks_min": min(blocks),
                             "max/mean": round(max(blocks) * len(blocks) / sum(blocks), 3),
                             "MB (fwd+bwd)": (fwd + bwd) / 1e6})
    return rows


def stride_table(world: int = 8, n: int = 1 << 17) -> list[dict]:
    """Key-block ownership by stride residue (``balance="stride"``: S2 block b of a document on rank
    b mod P) vs zigzag, under the all-gather exchange (token-sharded queries): bytes of the busiest
    rank and the mean (fwd + bwd), the exchanged rows as a share of a plain K/V all-gather, S2 tiles
    per rank (max, max / mean) and slots per rank. Layouts: the model's (local 4), with 2 dense kv
    heads, and local 1 (no window halo). The last row per layout and documents is a *model*, not
    built: queries sharded by head too (rank r computes the heads whose columns it owns, for every
    query) moves q and o like Ulysses and, since every key block is the diagonal block of a query
    block, its heads' whole K/V too: exactly Ulysses' all-to-alls (``cp.scheme_cost(scheme=
    "ulysses")``)."""
    from dataclasses import replace

    from seqpar.cp.row_exchange import exchange_cost
    from seqpar.cp.s2_exchange import exchange_rows

    shape = dict(heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    row_b = (shape["head_dim"] * 2) * 2  # one (kv head, token) row of K and V, bf16
    rows = []
    layouts = (("local 4", MODEL_LAYOUT), ("local 4 + 2 dense heads", replace(MODEL_LAYOUT, num_dense_heads=2)),
               ("local 1", replace(MODEL_LAYOUT, local_blocks=1)))
    for lname, layout in layouts:
        lay = layout.with_heads(shape["heads"])
        for dname, lens in (("one sequence", None), ("mixed docs", _mixed_docs(n))):
            cu = None if lens is None else [0, *torch.tensor(lens).cumsum(0).tolist()]
            for balance in ("zigzag", "stride"):
                part = cp.make_partition(n, (0, world), balance=balance, cu_seqlens=cu,
                                         block_size=layout.block_size if balance == "stride" else None)
                counts = exchange_rows(part, lay, shape["kv_heads"])
                per = [sum(exchange_cost(counts, r, row_b) or (0, 0)) for r in range(world)]  # fwd + bwd
                tiles = _exchange_blocks(part, lay, shape["heads"], shape["kv_heads"])
                rows.append({"layout": lname, "documents": dname, "ownership": balance,
                             "MB busiest": max(per) / 1e6, "MB mean": sum(per) / world / 1e6,
                             "share of all-gather": round(max(sum(c) for c in counts)
                                                          / ((world - 1) * part.local_len * shape["kv_heads"]), 3),
                             "tiles max": max(tiles), "tiles max/mean": round(max(tiles) * world / sum(tiles), 3),
                             "slots per rank": part.local_len})
            uly = cp.scheme_cost("s2", "ulysses", world=world, seq_len=n, cu_seqlens=cu, layout=layout, **shape)
            fwd, bwd, _ = _bytes(uly)
            mb = (fwd + bwd) / 1e6
            rows.append({"layout": lname, "documents": dname, "ownership": "stride + head-sharded queries (model)",
                         "MB busiest": mb, "MB mean": mb, "share of all-gather": "", "tiles max": "",
                         "tiles max/mean": "", "slots per rank": -(-n // world)})
    return rows


def _steps(cost: dict, p: int) -> int:
    """Message steps on the critical path: 1 per point-to-point call, P - 1 per collective (ring algorithm)."""
    return sum(r["calls"] * (1 if op == "send_recv" else p - 1) for side in cost.values() for op, r in side.items())


def _bytes(cost: dict) -> tuple[int, int, int]:
    fwd = sum(r["bytes"] for r in cost["fwd"].values())
    bwd = sum(r["bytes"] for r in cost["bwd"].values())
    calls = sum(r["calls"] for side in cost.values() for r in side.values())
    return fwd, bwd, calls


# --------------------------------------------------------------------------------- compute + model

COMPUTE_SHAPES = {  # local problem timed per kind: b, seq, h, hkv, d, dtype
    "smoke": (1, 128, 2, 1, 16, torch.float32),
    "cpu": (1, 1024, 4, 2, 64, torch.float32),
    "gpu": (1, 16384, 16, 8, 128, torch.bfloat16),
}
MODEL_GRID = {  # (tokens, P values); s2 rows only up to S2_MAX_N (cp.scheme_cost builds its exchange's rows)
    "smoke": ([1 << 12], [8]),
    "cpu": ([1 << 18, 1 << 21], [8, 16, 32, 64]),
    "gpu": ([1 << 18, 1 << 21], [8, 16, 32, 64]),
}
S2_MAX_N = 1 << 18


def _compute_rates(ctx: Context, res: SuiteResult) -> dict[str, float]:
    """FLOP/s of each kind's kernel, forward + backward, measured on this device (interleaved)."""
    b, s, h, hkv, d, dtype = COMPUTE_SHAPES[ctx.size]
    backend = "triton" if ctx.cuda else "torch"
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, s, hh, d, generator=gen).to(ctx.device, dtype).requires_grad_() for hh in (h, hkv, hkv))
    qkv_full = [q, torch.randn(b, s, h, d, generator=gen).to(ctx.device, dtype).requires_grad_(),
                torch.randn(b, s, h, d, generator=gen).to(ctx.device, dtype).requires_grad_()]
    gates = torch.ones(b, s, h, device=ctx.device, dtype=dtype, requires_grad=True)
    slope = lightning_slopes(h).to(ctx.device)
    lay = MODEL_LAYOUT if s >= 4 * MODEL_LAYOUT.block_size * MODEL_LAYOUT.vert_stride else SMALL_LAYOUT
    fl = {kind: attention_flops(kind, batch=b, seq_len=s, heads=h, kv_heads=hkv, head_dim=d, layout=lay,
                                backward=True) for kind in ("softmax", "s2", "lightning", "moh")}
    impls = [
        Impl("softmax", grad_call(lambda q, k, v: flash_attention(q, k, v, backend=backend), (q, k, v)), fl["softmax"]),
        Impl("s2", grad_call(lambda q, k, v: s2_attention(q, k, v, lay, backend=backend), (q, k, v)), fl["s2"]),
        Impl("lightning", grad_call(lambda q, k, v: lightning_attention(q, k, v, slope, backend=backend)[0], qkv_full),
             fl["lightning"]),
        Impl("moh", grad_call(lambda q, k, v, g: moh_attention(q, k, v, g, backend=backend), (q, k, v, gates)),
             fl["moh"]),
    ]
    rows = time_group(ctx, f"local compute s {s} fwd+bwd", "fwd+bwd", impls,
                      {"seq": s, "heads": h, "kv_heads": hkv, "head_dim": d})
    res.results += rows
    return {r["impl"]: r["flops"] / (median_ms(r) / 1e3) for r in rows if median_ms(r)}


def model_table(rates: dict[str, float], grid: tuple[list[int], list[int]], notes: list[str]) -> list[dict]:
    """Modelled per-layer step time per kind x scheme x P x N x link (see the module docstring)."""
    rows = []
    ns, ps = grid
    for n in ns:
        for p in ps:
            for kind, scheme in sorted(cp.SUPPORTED):
                if kind not in rates:
                    continue
                if kind == "s2" and n > S2_MAX_N:
                    continue
                u = 8 if scheme == "usp" else None
                if (scheme == "usp" and p % 8) or (scheme == "ulysses" and MODEL["heads"] % p):
                    continue  # Ulysses shards heads: P must divide them (cp.attention refuses otherwise)
                try:
                    cost = cp.scheme_cost(kind, scheme, world=p, seq_len=n, ulysses_degree=u,
                                          layout=MODEL_LAYOUT if kind == "s2" else None, **MODEL)
                except ValueError as e:  # e.g. Ulysses over more ranks than heads
                    note = f"{kind} / {scheme} at P={p}: not modelled ({str(e).splitlines()[0][:120]})"
                    if note not in notes:
                        notes.append(note)
                    continue
                fwd, bwd, _ = _bytes(cost)
                flops = attention_flops(kind, batch=1, seq_len=n, heads=MODEL["heads"], kv_heads=MODEL["kv_heads"],
                                        head_dim=MODEL["head_dim"], layout=MODEL_LAYOUT, backward=True)
                compute_ms = flops / p / rates[kind] * 1e3
                row: dict[str, Any] = {"kind": kind, "scheme": LABELS.get((kind, scheme), scheme), "P": p,
                                       "N": f"{n >> 10}K", "MB_per_rank": (fwd + bwd) / 1e6, "compute_ms": compute_ms}
                steps = _steps(cost, p)
                # LASP-1's states travel through dependent hops: nothing to overlap them with
                chained = (kind, scheme) == ("lightning", "ring")
                for link, bw in LINKS.items():
                    comm = ((fwd + bwd) / bw + steps * LATENCY[link]) * 1e3
                    row[f"{link}_comm_ms"] = comm
                    row[f"{link}_step_ms"] = compute_ms + comm
                    row[f"{link}_step_overlap_ms"] = compute_ms + comm if chained else max(compute_ms, comm)
                rows.append(row)
    return rows


def comparisons(model: list[dict]) -> list[dict]:
    """The papers' questions answered from the model: LASP-2 vs ring attention and LASP-1, S2's
    exchange vs a plain all-gather (per P, N, link; ratio > 1: the first one is faster)."""
    idx = {(r["kind"], r["scheme"], r["P"], r["N"]): r for r in model}
    out = []
    for (kind, scheme, p, n), r in idx.items():
        pairs = []
        if (kind, scheme) == ("lightning", "LASP-2"):
            pairs = [("softmax", "ring attention"), ("lightning", "LASP-1")]
        if (kind, scheme) == ("s2", "s2 exchange"):
            pairs = [("softmax", "all-gather K/V")]
        for okind, oscheme in pairs:
            o = idx.get((okind, oscheme, p, n))
            if o is None:
                continue
            row: dict[str, Any] = {"this": f"{kind} {scheme}", "vs": f"{okind} {oscheme}", "P": p, "N": n,
                                   "MB_ratio": o["MB_per_rank"] / r["MB_per_rank"]}
            for link in LINKS:
                row[f"{link}_comm_x"] = o[f"{link}_comm_ms"] / r[f"{link}_comm_ms"]
                row[f"{link}_step_overlap_x"] = o[f"{link}_step_overlap_ms"] / r[f"{link}_step_overlap_ms"]
            out.append(row)
    return out


def cp_suite(ctx: Context) -> SuiteResult:
    res = SuiteResult("Context parallelism: bytes per rank (ledger == scheme_cost), compute per rank (measured "
                      "rate x FLOPs), modelled per-layer step time (1b attention: 16 heads, 8 kv heads, d 128, bf16)")
    if ctx.size == "smoke":  # 4 spawned ranks cost a minute; tests/test_cp_attention.py checks the ledger in make test
        res.notes.append("ledger check skipped at smoke size (tests/test_cp_attention.py checks ledger == scheme_cost)")
    else:
        check = ledger_check(4)
        res.tables["ledger of rank 0 vs cp.scheme_cost (4 gloo ranks, usp 2 x 2; plain / packed documents / "
                   "N % P != 0; host syncs of a steady-state layer and its step)"] = check
        bad = [r for r in check if r["== scheme_cost"] != "yes"]
        if bad:
            raise AssertionError(f"comm ledger differs from cp.scheme_cost: {bad}")
        if any(r["host_syncs_layer"] != 0 for r in check):
            raise AssertionError("a CP attention layer made host syncs in steady state (cp.step_checks)")
        res.tables["bytes received per rank per layer (32 heads, 8 kv heads, d 128, bf16; usp: ulysses 8 x ring "
                   "P/8)"] = scale_table()
        res.tables["S2 exchange peak K/V buffer vs plain all-gather (8 kv heads, d 128, bf16)"] = \
            exchange_memory_table()
        res.tables["packed documents (cu_seqlens), P = 8, 128K tokens, busiest rank (32 heads, 8 kv heads, d 128, "
                   "bf16; s2 block 64, local 4, vert_stride 8; usp u=2)"] = documents_table()
        res.tables["sliding-window softmax (window=), P = 8, 128K tokens, busiest rank (32 heads, 8 kv heads, d 128, "
                   "bf16): the ring and allgather move only the halo"] = window_table()
        res.tables["joint cost balancer vs zigzag: modelled per-rank work max / mean (cp.CostModel), pieces per "
                   "rank, host time of the balancer, bytes of the busiest rank (ring softmax, LASP-2; fwd + bwd; "
                   "32 heads, 8 kv heads, d 128, bf16; s2 block 64, local 4, vert_stride 8)"] = balance_table()
        res.tables["automatic schemes (cp.recommend, parallel.cp_schemes: auto): the choice per kind on one node and "
                   "across nodes (8 GPUs / node, 450 GB/s NVLink, 50 GB/s IB; H100 peak; 1b attention; MoH half the "
                   "heads active)"] = auto_table()
        res.tables["S2 head placement under ulysses vs the all-gather exchange: S2 tiles per rank and bytes of the "
                   "busiest rank (P = 4, 128K tokens, 32 heads, 8 kv heads, d 128, bf16; s2 block 64, local 4, "
                   "vert_stride 8)"] = head_placement_table()
        res.tables["stride ownership (balance='stride': S2 block b on rank b mod P) vs zigzag under the all-gather "
                   "exchange: bytes (busiest rank, mean; fwd + bwd), rows as a share of a K/V all-gather, S2 tiles per "
                   "rank, slots per rank (P = 8, 128K tokens, 32 heads, 8 kv heads, d 128, bf16; s2 block 64, "
                   "vert_stride 8)"] = stride_table()
    rates = _compute_rates(ctx, res)
    res.tables["measured compute rate (fwd+bwd FLOPs the mask needs / s) per kind on this device"] = [
        {"kind": k, "TFLOP/s": v / 1e12} for k, v in rates.items()]
    model = model_table(rates, MODEL_GRID[ctx.size], res.notes)
    res.tables["modelled attention time per layer (fwd+bwd): compute = FLOPs / P / measured rate; comm = bytes / "
               "link bandwidth (450 GB/s NVLink, 50 GB/s IB) + message steps x latency (5 / 10 us); overlap = "
               "max(compute, comm) (LASP-1: no overlap, its states pass through dependent hops)"] = model
    res.tables["who wins (x > 1: 'this' is faster / moves fewer bytes)"] = comparisons(model)
    if not ctx.cuda:
        res.notes.append("compute rates are this CPU's (torch paths): with them compute dominates every step; "
                         "the byte and comm columns are device-independent, and the GPU run gives the real balance")
    res.notes.append(f"s2 rows modelled up to {S2_MAX_N >> 10}K tokens: cp.scheme_cost builds the exchanged rows of "
                     "every receiver (about 10 s at 2M tokens and P = 8, a minute at P = 64, on the CPU build machine)")
    _plot(ctx, res, model)
    return res


def replot(ctx: Context, res: SuiteResult) -> None:
    """The plot from a report's tables (``python -m seqpar.bench --replot``)."""
    _plot(ctx, res, next((v for k, v in res.tables.items() if k.startswith("modelled")), []))


@plotter
def _plot(ctx: Context, res: SuiteResult, model: list[dict]) -> None:
    """Communication per layer vs P on each link (device-independent), and the step time with
    overlap on NVLink (uses this device's compute rates). Lightning / softmax at the largest N, S2
    (exchange vs all-gather) at the largest N it is modelled at."""
    if not model:
        return
    ns = sorted({int(r["N"][:-1]) for r in model})
    n_big = f"{ns[-1]}K"
    n_s2 = f"{max(int(r['N'][:-1]) for r in model if r['kind'] == 's2')}K" if any(
        r["kind"] == "s2" for r in model) else n_big
    show = [("lightning", "LASP-2", n_big), ("lightning", "LASP-1", n_big), ("softmax", "ring attention", n_big),
            ("softmax", "all-gather K/V", n_big), ("softmax", "ulysses", n_big), ("s2", "s2 exchange", n_s2),
            ("softmax", "all-gather K/V", n_s2)]
    panels = [(f"{link}_comm_ms", f"communication, {link} ({LINKS[link] / 1e9:.0f} GB/s)") for link in LINKS]
    panels.append(("nvlink_step_overlap_ms", f"step with overlap, nvlink (compute: {ctx.device.type} rates)"))
    fig, axes = new_figure(res.notes, len(panels), "modelled attention time per layer (fwd + bwd), 1b attention")
    if fig is None:
        return
    seen = list(dict.fromkeys(show))
    for ax, (key, title) in zip(axes, panels):
        for i, (kind, scheme, n) in enumerate(seen):
            pts = sorted((r["P"], r[key]) for r in model if (r["kind"], r["scheme"], r["N"]) == (kind, scheme, n))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}",
                        label=f"{kind} {scheme} @ {n}")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("P (ranks)")
        ax.set_ylabel("ms per layer")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    path = ctx.out / "cp.png"
    save_figure(fig, path, ctx.stamp_line)
    res.plots.append(path.name)
