"""Communication per layer of every kind x scheme: bytes each rank receives (fwd + bwd) and the
time they take on NVLink (450 GB/s) and InfiniBand (50 GB/s), from ``cp.scheme_cost``.

The closed forms are first cross-checked against the comm ledger on 4 spawned gloo ranks at small
shapes (the run fails if any differs), then evaluated at user-scale shapes (7B-like: 32 heads,
8 kv heads, head dim 128, bf16; 128K-1M tokens; P = 8, 32, 64).

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


def _small_inputs(kind: str, scheme: str, world: int, rank: int):
    g = torch.Generator().manual_seed(0)
    n = 2 * world * 32
    q = torch.randn(SMALL["b"], n, SMALL["h"], SMALL["d"], generator=g)
    k = torch.randn(SMALL["b"], n, SMALL["hkv"], SMALL["d"], generator=g)
    v = torch.randn(SMALL["b"], n, SMALL["hkv"], SMALL["d"], generator=g)
    kw = {"backend": "torch"}
    if kind == "lightning":
        kw["slope"] = torch.linspace(0.1, 0.5, SMALL["h"])
    if kind == "s2":
        kw["layout"] = SMALL_LAYOUT
    if scheme == "usp":
        kw["ulysses_degree"] = 2
    if kind == "moh":
        kw["gates"] = cp.shard(torch.rand(SMALL["b"], n, SMALL["h"], generator=g), (rank, world)).requires_grad_()
    loc = [cp.shard(t, (rank, world)).requires_grad_() for t in (q, k, v)]
    return n, loc, kw


def _ledger_worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=world)
    out = {}
    for kind, scheme in sorted(cp.SUPPORTED):
        n, (q, k, v), kw = _small_inputs(kind, scheme, world, rank)
        with cp.comm_ledger() as fwd:
            o = cp.attention(q, k, v, kind=kind, scheme=scheme, **kw)
        o = o[0] if kind == "lightning" else o
        with cp.comm_ledger() as bwd:
            o.float().sum().backward()
        # steady state (signature agreed, index plans cached): host syncs of one layer, fwd + bwd
        _, (q, k, v), kw = _small_inputs(kind, scheme, world, rank)
        with cp.count_host_syncs() as syncs:
            with cp.step_checks():
                o = cp.attention(q, k, v, kind=kind, scheme=scheme, **kw)
                (o[0] if kind == "lightning" else o).float().sum().backward()
                per_layer = syncs.total
            per_step = syncs.total
        out[(kind, scheme)] = {"fwd": fwd.summary(), "bwd": bwd.summary(), "n": n, "syncs": (per_layer, per_step)}
    if rank == 0:
        torch.save(out, f"{tmp}/ledger.pt")
    dist.destroy_process_group()


def ledger_check(world: int = 4) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ledger_worker, args=(world, tmp), nprocs=world)
        got = torch.load(f"{tmp}/ledger.pt", weights_only=False)
    rows = []
    for (kind, scheme), rec in got.items():
        cost = cp.scheme_cost(kind, scheme, world=world, seq_len=rec["n"], batch=SMALL["b"], heads=SMALL["h"],
                              kv_heads=SMALL["hkv"], head_dim=SMALL["d"], dtype=torch.float32,
                              gates_dtype=torch.float32, layout=SMALL_LAYOUT if kind == "s2" else None,
                              ulysses_degree=2 if scheme == "usp" else None, rank=0)
        ok = cost["fwd"] == rec["fwd"] and cost["bwd"] == rec["bwd"]
        rows.append({"kind": kind, "scheme": scheme, "P": world, "N": rec["n"],
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
    rank's last chunk) vs the plain all-gather (gathered + reordered full-length copies), bf16."""
    from seqpar.cp.s2_exchange import exchange_buffer_elements

    rows = []
    for world in (8, 32):
        for n in (1 << 17, 1 << 20):
            for rank in (0, world - 1):
                m = exchange_buffer_elements(BIG_LAYOUT.with_heads(32), world=world, balance="zigzag", chunk_len=n // (2 * world),
                                             kv_heads=8, width=256, rank=rank)
                rows.append({"P": world, "N": f"{n >> 10}K", "rank": rank, "send_MB": m["send"] * 2 / 1e6,
                             "recv_MB": m["recv"] * 2 / 1e6, "buffer_MB": m["buffer"] * 2 / 1e6,
                             "peak_MB": m["total"] * 2 / 1e6, "allgather_peak_MB": m["allgather"] * 2 / 1e6,
                             "ratio": m["total"] / m["allgather"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    check = ledger_check()
    print_table(check, f"ledger of rank 0 vs scheme_cost, 4 gloo ranks (usp: 2 x 2) on {device_name('cpu')}; "
                       "host syncs of one steady-state layer (fwd + bwd) and of its step (cp.step_checks)")
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
    write_json(args.json, {"ledger_check": check, "scale": table, "s2_exchange_memory": mem})


if __name__ == "__main__":
    main()
