"""``python -m seqpar.demo``: a small S2 layout, its block picture and density, and S2 vs dense
flash attention on the same input, checked against the fp64 reference (flash-attn's rule).

Runs the Triton kernels when CUDA or ``TRITON_INTERPRET=1`` is available (``make demo`` sets it),
the torch block-sparse fallback otherwise. Takes a few seconds on a CPU.
"""

from __future__ import annotations

import torch

from seqpar.kernels import S2Layout, s2_attention
from seqpar.kernels._common import select_backend
from seqpar.kernels.flash.api import _flash_attention
from seqpar.kernels.s2 import s2_stats
from seqpar.kernels.s2.plan import build_plan
from seqpar.kernels.s2.reference import attention_reference

OUT_FACTOR = 2.0  # flash-attn's rule: ours within 2x the error of the same-dtype reference


def _check(name: str, ours: torch.Tensor, q, k, v, **ref_kwargs) -> bool:
    ref64, _ = attention_reference(q.double(), k.double(), v.double(), **ref_kwargs)
    ref_lp, _ = attention_reference(q, k, v, **ref_kwargs)
    err = (ours.double() - ref64).abs().max().item()
    bound = OUT_FACTOR * (ref_lp.double() - ref64).abs().max().item() + 1e-6
    ok = err <= bound
    print(f"{name:<6} max |err| vs fp64 reference = {err:.2e}  (tolerance {bound:.2e})  "
          f"{'within tolerance' if ok else 'OUT OF TOLERANCE'}")
    return ok


def _counted_blocks(q, k, v, layout, backend: str) -> tuple[int, int]:
    """Blocks one forward computes for S2 and for dense causal attention at the same tile size:
    counted by the Triton kernel itself, or read from the tile plan on the torch backend."""
    b, s, h, _ = q.shape
    hkv = k.shape[2]
    bs = layout.block_size
    counts = []
    for lay in (layout, None):
        plan = build_plan(None if lay is None else lay.with_heads(h), True, hkv, s, s, 0, 0, None, bs)
        if backend != "triton":
            counts.append(b * plan.nnz(h))
            continue
        from seqpar.kernels.s2.triton_fwd import s2_fwd

        counter = torch.zeros(1, dtype=torch.int32, device=q.device)
        s2_fwd(q, k, v, plan, q.shape[-1] ** -0.5, counter=counter)
        counts.append(int(counter))
    return counts[0], counts[1]


def main() -> int:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layout = S2Layout(block_size=16, local_blocks=2, vert_stride=4)
    b, seq, h, hkv, d = 1, 128, 8, 4, 32
    print(f"S2 layout: {layout}")
    print(f"{seq // layout.block_size} blocks of {layout.block_size} tokens, {h} q heads / {hkv} kv heads "
          f"(x = computed, . = skipped causal block)\n")
    print(layout.picture(hkv, seq // layout.block_size, num_heads=h))
    st = s2_stats(layout, seq, h, hkv)
    print(f"\ndensity {st['density']:.3f}: {st['computed_blocks']} of {st['causal_blocks']} causal blocks "
          f"(summed over q heads)")

    q = torch.randn(b, seq, h, d, device=device)
    k = torch.randn(b, seq, hkv, d, device=device)
    v = torch.randn(b, seq, hkv, d, device=device)
    backend = select_backend("auto", q)
    print(f"\nbackend: {backend} on {device}")
    o_s2 = s2_attention(q, k, v, layout)
    o_fl = _flash_attention(q, k, v, causal=True, block_size=16)
    s2_count, dense_count = _counted_blocks(q, k, v, layout, backend)
    print(f"computed blocks: s2 {s2_count}, flash {dense_count} "
          f"({'counted by the Triton kernel' if backend == 'triton' else 'from the tile plan'})")
    ok = _check("s2", o_s2, q, k, v, layout=layout)
    ok &= _check("flash", o_fl, q, k, v, causal=True)
    print(f"s2 vs flash max |diff| = {(o_s2 - o_fl).abs().max().item():.3f} (nonzero: S2 skips blocks)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
