"""Lightning attention vs softmax attention: time vs sequence length (forward + backward).

Lightning (Triton on GPU, torch chunked on CPU) should scale linearly, t(2N)/t(N) ≈ 2, while
softmax attention (seqpar flash_attention, torch SDPA) is quadratic, ≈ 4. On GPU, FLA's
``chunk_simple_gla`` (same math: constant per-head log decay) is timed too when ``import fla``
works. Default shapes run in < 1 minute on CPU.

    python benchmarks/lightning.py [--json out.json] [--fwd-only]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import bench, device_name, print_table, write_json  # noqa: E402

from seqpar.kernels import lightning_attention, lightning_slopes  # noqa: E402


def _flash() -> Optional[Callable]:
    try:
        from seqpar.kernels import flash_attention
    except Exception:  # another op may not be importable in this checkout
        return None
    return flash_attention


def _fla() -> Optional[Callable]:
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:
        return None

    def run(q, k, v, slope):
        try:  # newer FLA: a constant per-head log decay
            return chunk_simple_gla(q, k, v, g_gamma=-slope, scale=1.0)[0]
        except TypeError:  # older FLA: per-token log decay [B, T, H]
            g = (-slope).expand(q.shape[0], q.shape[1], -1).contiguous()
            return chunk_simple_gla(q, k, v, g=g, scale=1.0)[0]

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--fwd-only", action="store_true", help="time the forward pass only")
    p.add_argument("--seqlens", default=None, help="comma-separated sequence lengths")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    b, h, d = (1, 16, 128) if cuda else (1, 2, 32)
    seqlens = [int(s) for s in args.seqlens.split(",")] if args.seqlens else (
        [4096, 8192, 16384, 32768] if cuda else [1024, 2048, 4096, 8192])
    # explicit backends: the Triton interpreter (TRITON_INTERPRET=1) is a test tool, not a CPU path
    backend = "triton" if cuda else "torch"
    slope = lightning_slopes(h).to(dev)

    impls: dict[str, Callable] = {
        "lightning": lambda q, k, v: lightning_attention(q, k, v, slope, backend=backend)[0],
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2),
    }
    flash = _flash()
    if flash is not None:
        impls["flash"] = lambda q, k, v: flash(q, k, v, causal=True, backend=backend)
    fla = _fla() if cuda else None
    if fla is not None:
        impls["fla_simple_gla"] = lambda q, k, v: fla(q, k, v, slope)

    rows = []
    prev: dict[str, float] = {}
    for n in seqlens:
        q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=dtype) * 0.1 for _ in range(3))
        row: dict[str, object] = {"seq": n}
        for name, fn in impls.items():
            xs = [t.clone().requires_grad_(not args.fwd_only) for t in (q, k, v)]

            def step(fn=fn, xs=xs):
                o = fn(*xs)
                if not args.fwd_only:
                    o.backward(torch.ones_like(o))

            try:
                first = bench(step, dev, warmup=0, reps=1)  # also the warm-up (compiles Triton)
                # slow cases (softmax on CPU at large N) get one more timed run, the rest five
                ms = bench(step, dev, warmup=0, reps=1 if first > 1000 else 5)
            except Exception as e:  # report, keep timing the others
                row[f"{name}_ms"] = f"error: {type(e).__name__}"
                continue
            row[f"{name}_ms"] = ms
            row[f"{name}_x"] = ms / prev[name] if name in prev else "-"
            prev[name] = ms
        rows.append(row)

    mode = "fwd" if args.fwd_only else "fwd+bwd"
    title = (f"lightning vs softmax, {mode}, b={b} h={h} d={d} {str(dtype).replace('torch.', '')}, "
             f"{device_name(dev)}  (*_x = t(N)/t(N/2): linear ≈ 2, quadratic ≈ 4)")
    print_table(rows, title)
    write_json(args.json, {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                           "device": device_name(dev), "mode": mode, "batch": b, "heads": h,
                           "head_dim": d, "dtype": str(dtype), "rows": rows})


if __name__ == "__main__":
    main()
