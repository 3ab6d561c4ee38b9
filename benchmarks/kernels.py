"""S2 block-sparse attention vs dense attention: time vs sequence length and density.

Times seqpar ``s2_attention`` and ``flash_attention`` (Triton on GPU, the torch block-sparse
fallback on CPU), torch SDPA (causal), and torch ``flex_attention`` given the same S2 block mask
(the alternative a user would reach for; compiled on GPU, eager on CPU). Prints ratios, computed
blocks and, on GPU, achieved TFLOP/s (counting only computed blocks for s2 / flex). Default
shapes run in < 1 minute on CPU.

    python benchmarks/kernels.py [--json out.json] [--bwd] [--seqs 1024 4096] [--strides 4 8]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import bench, device_name, print_table, write_json  # noqa: E402

from seqpar.kernels import S2Layout, flash_attention, s2_attention  # noqa: E402
from seqpar.kernels.s2 import s2_stats  # noqa: E402


def _flex(layout: S2Layout, b: int, h: int, hkv: int, seq: int, device) -> tuple[Optional[Callable], str]:
    """flex_attention closure with the S2 block mask, or (None, why it is skipped)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as e:  # pragma: no cover - depends on the torch build
        return None, f"flex_attention unavailable: {e}"
    nb = -(-seq // layout.block_size)
    blocks = layout.block_mask(h, hkv, nb, nb).to(device)
    bs = layout.block_size

    def mask_mod(b_, h_, q_idx, kv_idx):
        return (q_idx >= kv_idx) & blocks[h_, q_idx // bs, kv_idx // bs]

    try:
        bm = create_block_mask(mask_mod, B=None, H=h, Q_LEN=seq, KV_LEN=seq, device=str(device), BLOCK_SIZE=bs)
        fn = flex_attention
        if torch.device(device).type == "cuda":
            fn = torch.compile(flex_attention, dynamic=False)
        else:
            # torch.compile of flex_attention needs a C++ toolchain on CPU; eager is the unfused
            # reference path (it materializes the scores), which is what a CPU user gets
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

        def run(q, k, v):
            return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, enable_gqa=True)

        return run, ""
    except Exception as e:
        return None, f"flex_attention skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    ap.add_argument("--bwd", action="store_true", help="time forward + backward (default: forward)")
    ap.add_argument("--seqs", type=int, nargs="*", default=None)
    ap.add_argument("--strides", type=int, nargs="*", default=None, help="S2 vert_stride values (density)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        b, h, hkv, d, dtype, bs, local = 1, 32, 8, 128, torch.bfloat16, 64, 4
        seqs = args.seqs or [1024, 2048, 4096, 8192, 16384, 32768]
    else:
        b, h, hkv, d, dtype, bs, local = 1, 4, 2, 64, torch.float32, 64, 2
        seqs = args.seqs or [512, 1024, 2048]
    strides = args.strides or [4, 16]
    backend = "triton" if cuda else "torch"
    notes = set()
    rows = []
    for seq in seqs:
        q = torch.randn(b, seq, h, d, device=dev, dtype=dtype, requires_grad=args.bwd)
        k = torch.randn(b, seq, hkv, d, device=dev, dtype=dtype, requires_grad=args.bwd)
        v = torch.randn(b, seq, hkv, d, device=dev, dtype=dtype, requires_grad=args.bwd)
        do = torch.randn_like(q)

        reps = 5 if cuda else 3  # 3 on CPU: enough for min / median and the spread warning (h16), still short

        def timed(fn: Callable[[], torch.Tensor]) -> float:
            if not args.bwd:
                with torch.no_grad():
                    return bench(fn, dev, reps=reps)
            return bench(lambda: fn().backward(do), dev, reps=reps)

        flash_ms = timed(lambda: flash_attention(q, k, v, backend=backend))
        sdpa_ms = timed(lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2))
        dense_flops = 4 * b * h * d * seq * (seq + 1) / 2 * (3.5 if args.bwd else 1.0)
        for vs in strides:
            lay = S2Layout(block_size=bs, local_blocks=local, vert_stride=vs)
            st = s2_stats(lay, seq, h, hkv)
            s2_ms = timed(lambda: s2_attention(q, k, v, lay, backend=backend))
            flex, why = _flex(lay, b, h, hkv, seq, dev)
            flex_ms = None
            if flex is None:
                notes.add(why)
            else:
                if not cuda:
                    notes.add("flex_attention runs eager on CPU (unfused: materializes the full score matrix)")
                try:
                    flex_ms = timed(lambda: flex(q, k, v).transpose(1, 2))
                except Exception as e:
                    notes.add(f"flex_attention skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            row = {
                "seq": seq, "vert_stride": vs, "density": round(st["density"], 3),
                "blocks": st["computed_blocks"], "s2_ms": s2_ms, "flash_ms": flash_ms, "sdpa_ms": sdpa_ms,
                "flex_ms": flex_ms if flex_ms is not None else "-",
                "flash/s2": flash_ms / s2_ms, "target 0.7/dens": 0.7 / st["density"],
                "sdpa/flash": sdpa_ms / flash_ms,
                "flex/s2": flex_ms / s2_ms if flex_ms is not None else "-",
            }
            if cuda:
                row["s2_TFLOPs"] = dense_flops * st["density"] / s2_ms / 1e9
                row["flash_TFLOPs"] = dense_flops / flash_ms / 1e9
            rows.append(row)

    mode = "fwd+bwd" if args.bwd else "fwd"
    title = (f"S2 vs dense attention, {mode}, b={b} h={h} hkv={hkv} d={d} {str(dtype).replace('torch.', '')}, "
             f"block={bs} local={local}, backend={backend}, {device_name(dev)}")
    print_table(rows, title)
    for n in sorted(notes):
        print(f"note: {n}")
    write_json(args.json, {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                           "device": device_name(dev), "mode": mode, "batch": b, "heads": h, "kv_heads": hkv,
                           "head_dim": d, "dtype": str(dtype), "block_size": bs, "local_blocks": local,
                           "rows": rows, "notes": sorted(notes)})


if __name__ == "__main__":
    main()
