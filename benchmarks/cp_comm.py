"""Communication per layer of every kind x scheme: bytes each rank receives (fwd + bwd) and the
time they take on NVLink (450 GB/s) and InfiniBand (50 GB/s), from ``cp.scheme_cost``.

The closed forms are first cross-checked against the comm ledger on 4 spawned gloo ranks at small
shapes (the run fails if any differs) — plain, with packed documents of awkward lengths
(``cu_seqlens``) and at a length that is no multiple of P (padding) — then evaluated at
user-scale shapes (7B-like: 32 heads, 8 kv heads, head dim 128, bf16; 128K-1M tokens; P = 8, 32,
64), with and without packed documents (per-document zigzag; the ring moves only what each rank's
documents read), and the joint cost balancer against zigzag (modelled imbalance, pieces, bytes).

    python benchmarks/cp_comm.py [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from _util import device_name, print_table, write_json  # noqa: E402

from seqpar import cp  # noqa: E402
from seqpar.kernels import S2Layout  # noqa: E402

LINKS = {"nvlink_450GBs": 450e9, "ib_50GBs": 50e9}
SMALL = dict(b=1, h=4, hkv=2, d=16)
SMALL_LAYOUT = S2Layout(block_size=16, local_blocks=2, vert_stride=2)  # chunks of 2 blocks: exchange applies
BIG_LAYOUT = S2Layout(block_size=64, local_blocks=4, vert_stride=8)


VARIANTS = ("plain", "docs", "odd")  # no documents; packed documents; N % P != 0 (padding slots)


def _small_inputs(kind: str, scheme: str, world: int, rank: int, variant: str = "plain"):
    g = torch.Generator().manual_seed(0)
    n = 2 * world * 32 + (3 if variant == "odd" else 0)
    q = torch.randn(SMALL["b"], n, SMALL["h"], SMALL["d"], generator=g)
    k = torch.randn(SMALL["b"], n, SMALL["hkv"], SMALL["d"], generator=g)
    v = torch.randn(SMALL["b"], n, SMALL["hkv"], SMALL["d"], generator=g)
    kw = {"backend": "torch"}
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
    rows = []
    shape = dict(heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    for world in (8, 32, 64):
        for n in (1 << 17, 1 << 20):
            for kind, scheme in sorted(cp.SUPPORTED):
                if scheme == "ulysses" and shape["heads"] % world:
                    continue
                c = cp.scheme_cost(kind, scheme, world=world, seq_len=n, layout=BIG_LAYOUT if kind == "s2" else None,
                                   ulysses_degree=8 if scheme == "usp" else None, **shape)
                fwd = sum(r["bytes"] for r in c["fwd"].values())
                bwd = sum(r["bytes"] for r in c["bwd"].values())
                calls = sum(r["calls"] for side in c.values() for r in side.values())
                label = {("lightning", "allgather"): "lasp2", ("s2", "allgather"): "s2_exchange",
                         ("lightning", "ring"): "lasp1", ("lightning", "usp"): "usp(u=8, lasp2)",
                         ("softmax", "usp"): "usp(u=8)", ("s2", "usp"): "usp(u=8)",
                         ("moh", "usp"): "usp(u=8)"}.get((kind, scheme), scheme)
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
                m = exchange_buffer_elements(part, BIG_LAYOUT.with_heads(32), kv_heads=8, width=256, rank=rank)
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
                                   layout=BIG_LAYOUT if kind == "s2" else None,
                                   ulysses_degree=2 if scheme == "usp" else None, **shape)
                fwd = sum(r["bytes"] for r in c["fwd"].values())
                bwd = sum(r["bytes"] for r in c["bwd"].values())
                rows.append({"balance": balance, "kind": kind, "scheme": scheme, "documents": label,
                             "docs": 1 if lens is None else len(lens), "fwd_MB": fwd / 1e6, "bwd_MB": bwd / 1e6,
                             "calls": sum(r["calls"] for side in c.values() for r in side.values())})
    return rows


def balance_table() -> list[dict]:
    """The joint cost balancer (``balance="cost"``) vs zigzag on packed documents of mixed lengths:
    modelled per-rank work ``max / mean`` (:class:`cp.CostModel` of the whole model), pieces (kernel
    calls per layer), the balancer's host time, and what the placement costs the ring (softmax) and
    LASP-2 in bytes (busiest rank, fwd + bwd)."""
    import time

    shape = dict(heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    models = {"3 s2 : 1 softmax": cp.CostModel(layers={"s2": 3, "softmax": 1}, heads=32, kv_heads=8,
                                               s2_layout=BIG_LAYOUT),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    check = ledger_check()
    print_table(check, f"ledger of rank 0 vs scheme_cost, 4 gloo ranks (usp: 2 x 2) on {device_name('cpu')}, "
                       "plain / packed documents / N % P != 0; host syncs of one steady-state layer (fwd + bwd) "
                       "and of its step (cp.step_checks)")
    if any(r["== scheme_cost"] != "yes" for r in check):
        raise SystemExit("ledger differs from cp.scheme_cost")
    if any(r["host_syncs_layer"] != 0 for r in check):
        raise SystemExit("a CP attention layer made host syncs in steady state (cp.step_checks)")
    table = scale_table()
    print_table(table, "bytes received per rank per layer (32 heads, 8 kv heads, d 128, bf16, batch 1; "
                       "s2: block 64, local 4, vert_stride 8; usp: ulysses 8 x ring P/8)")
    mem = exchange_memory_table()
    print_table(mem, "S2 exchange peak K/V buffer bytes per rank vs plain all-gather (8 kv heads, d 128, bf16, "
                     "block 64, local 4, vert_stride 8)")
    docs = documents_table()
    print_table(docs, "packed documents (cu_seqlens), P = 8, 128K tokens, busiest rank (32 heads, 8 kv heads, d 128, "
                      "bf16; s2 block 64, local 4, vert_stride 8; usp u=2)")
    bal = balance_table()
    print_table(bal, "joint cost balancer vs zigzag: modelled per-rank work max / mean, pieces per rank, host time of "
                     "the balancer, bytes of the busiest rank (ring softmax, LASP-2; fwd + bwd; 32 heads, 8 kv heads, "
                     "d 128, bf16; s2 block 64, local 4, vert_stride 8)")
    write_json(args.json, {"ledger_check": check, "scale": table, "s2_exchange_memory": mem, "documents": docs,
                           "balance": bal})


if __name__ == "__main__":
    main()
