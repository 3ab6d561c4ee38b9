"""MoH attention: time vs active fraction of (token, head) pairs, forward and forward+backward.

Each token keeps a random 25 / 50 / 75 / 100 % of its heads (gates 0 elsewhere). seqpar's
moh_attention skips the rest, so time should fall with the active fraction: target
t(50 %) / t(100 %) <= 0.6. Backends: the Triton kernel on GPU, the torch gather/scatter fallback
on CPU (and on GPU at a smaller shape). "dense+mask" is what the MoH release does (every head
computed with SDPA, then multiplied by the gates); it does not fall with the fraction.

    python benchmarks/moh.py [--json out.json] [--fwd-only]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import bench, device_name, print_table, write_json  # noqa: E402

from seqpar.kernels import moh_attention  # noqa: E402

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def random_gates(b: int, s: int, h: int, frac: float, device, dtype) -> torch.Tensor:
    """Every token keeps round(frac * h) heads chosen at random, with positive weights."""
    keep = round(frac * h)
    rank = torch.rand(b, s, h, device=device).argsort(dim=-1).argsort(dim=-1)
    return ((torch.rand(b, s, h, device=device) + 0.5) * (rank < keep)).to(dtype)


def dense_masked(q, k, v, gates):
    g = q.shape[2] // k.shape[2]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2),
                                       v.repeat_interleave(g, 2).transpose(1, 2), is_causal=True)
    return o.transpose(1, 2) * gates.unsqueeze(-1)


def run_case(name: str, fn, shape: tuple, dtype, device, fwd_only: bool, reps: int) -> list[dict]:
    b, s, h, hkv, d = shape
    q = torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, s, hkv, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, s, hkv, d, device=device, dtype=dtype, requires_grad=True)
    rows = []
    for frac in FRACTIONS:
        gates = random_gates(b, s, h, frac, device, dtype).requires_grad_()
        row = {"impl": name, "shape(b,s,h,hkv,d)": str(shape), "dtype": str(dtype).replace("torch.", ""),
               "active": f"{int(frac * 100)}%"}
        with torch.no_grad():
            row["fwd_ms"] = bench(lambda: fn(q, k, v, gates), device, reps=reps)
        if not fwd_only:
            row["fwd_bwd_ms"] = bench(lambda: fn(q, k, v, gates).sum().backward(), device, reps=reps)
        rows.append(row)
    full = rows[-1]
    for r in rows:  # time relative to all heads active
        r["fwd_vs_100"] = r["fwd_ms"] / full["fwd_ms"]
        if not fwd_only:
            r["fwd_bwd_vs_100"] = r["fwd_bwd_ms"] / full["fwd_bwd_ms"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the rows and the 50%/100% ratios here")
    ap.add_argument("--fwd-only", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cases = []
    if cuda:
        cases.append(("moh triton", lambda *x: moh_attention(*x, backend="triton"), (2, 8192, 32, 8, 128), torch.bfloat16))
        cases.append(("dense+mask (SDPA)", dense_masked, (2, 8192, 32, 8, 128), torch.bfloat16))
        cases.append(("moh torch", lambda *x: moh_attention(*x, backend="torch"), (1, 2048, 16, 4, 128), torch.bfloat16))
        reps = 10
    else:
        torch.set_num_threads(1)  # the CPU is shared: one thread gives steadier medians
        cases.append(("moh torch", lambda *x: moh_attention(*x, backend="torch"), (1, 1024, 4, 2, 64), torch.float32))
        cases.append(("dense+mask (SDPA)", dense_masked, (1, 1024, 4, 2, 64), torch.float32))
        reps = 7
    rows = []
    for name, fn, shape, dtype in cases:
        rows += run_case(name, fn, shape, dtype, device, args.fwd_only, reps)
    print_table(rows, f"MoH attention vs active fraction, causal — {device_name(device)}")
    ratios = {}
    for name, *_ in cases:
        half = next(r for r in rows if r["impl"] == name and r["active"] == "50%")
        ratios[name] = {k: half[k] for k in ("fwd_vs_100", "fwd_bwd_vs_100") if k in half}
        shown = ", ".join(f"{k.replace('_vs_100', '')} {v:.2f}" for k, v in ratios[name].items())
        print(f"{name}: t(50%)/t(100%) = {shown}  (target <= 0.6 for moh)")
    write_json(args.json, {"benchmark": "moh", "device": device_name(device),
                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                           "rows": rows, "ratio_50_vs_100": ratios})


if __name__ == "__main__":
    main()
