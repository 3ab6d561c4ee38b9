"""Host-side kernel plans: build time and host memory per new shape, at 32K / 128K / 1M tokens.

Every S2 / flash call needs a tile plan (which kv tiles each q tile visits, kernels/s2/plan.py)
and every Lightning call a chunk plan (kernels/lightning/_plan.py); a training step builds each
new one once. Plans are arithmetic runs, O(kv heads x tiles): target < 50 ms and O(nnz) memory
per plan at 1M tokens. ``--old`` adds the previous construction (a dense [kv heads, tiles, tiles]
mask and two ``nonzero``, kept as tests/s2_plan_reference.py) for comparison where it fits.

Cases (block 64, 8 kv heads, one causal plan, one thread, as issue 20 measured the old plans):
dense causal, S2 (local 4 blocks, vert_stride 8), varlen dense and varlen S2 (documents of 1 to
511 tokens, mean 256: 4096 documents at 1M), and Lightning's varlen chunk plan. Each case runs
in a fresh process: ``ms`` is the build's wall time and ``cpu_ms`` its CPU time (median of 3 builds,
cache bypassed; one thread, so on an idle machine they agree, and on a loaded one ``cpu_ms`` is the
number to read), ``peak MB`` the process' peak RSS growth during the first build, ``plan KB`` what
the plan keeps.

    python benchmarks/plans.py [--json out.json] [--old] [--tokens 32768 131072 1048576]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import print_table, write_json  # noqa: E402

TOKENS = (32768, 131072, 1 << 20)
BLOCK, KV_HEADS = 64, 8
TARGET_MS = 50.0
CASES = ("dense", "s2", "varlen dense", "varlen s2", "lightning varlen")
OLD_MAX_TOKENS = 131072  # the dense-mask construction at 1M needs ~25 GB


def _doc_bounds(tokens: int) -> tuple[int, ...]:
    import random

    rng = random.Random(0)
    cu = [0]
    while cu[-1] < tokens:
        cu.append(min(tokens, cu[-1] + rng.randint(1, 511)))
    return tuple(cu)


def _builder(case: str, tokens: int, old: bool):
    import torch

    from seqpar.kernels import S2Layout

    layout = S2Layout(block_size=BLOCK, local_blocks=4, vert_stride=8).with_heads(4 * KV_HEADS)
    lay = layout if "s2" in case else None
    cu = _doc_bounds(tokens) if "varlen" in case else None
    if case == "lightning varlen":
        from seqpar.kernels.lightning._plan import make_plan

        cu_t = torch.tensor(cu, dtype=torch.int32)

        def build():
            t = cu_t.clone()  # a fresh tensor each time, as a data loader gives: no cache hit
            return make_plan(1, tokens, t, 64, torch.device("cpu"))
        return build, lambda p: p.nbytes()
    args = (lay, True, KV_HEADS, tokens, tokens, 0, 0, cu, BLOCK)
    if old:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from s2_plan_reference import build_plan_dense_mask

        return (lambda: build_plan_dense_mask(*args)), lambda p: sum(t.numel() * 4 for t in p["csr"])
    from seqpar.kernels.s2.plan import build_plan_uncached

    return (lambda: build_plan_uncached(*args)), lambda p: p.nbytes()


def _child(case: str, tokens: int, old: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    build, nbytes = _builder(case, min(tokens, 4096), old)
    build()  # warm-up at a small shape: imports, allocator
    build, nbytes = _builder(case, tokens, old)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu = [], []
    for i in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        got = build()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
        if i == 0:
            plan = got
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    return {"ms": sorted(times)[1], "cpu_ms": sorted(cpu)[1], "peak_MB": round(peak_kb / 1024, 1),
            "plan_KB": round(nbytes(plan) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--old", action="store_true", help="also the dense-mask construction (<= 128K tokens)")
    ap.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        case, tokens, old = args.child
        print(json.dumps(_child(case, int(tokens), old == "1")))
        return
    rows = []
    for tokens in args.tokens:
        for case in CASES:
            for old in ((False, True) if args.old and case != "lightning varlen" and tokens <= OLD_MAX_TOKENS
                        else (False,)):
                out = subprocess.run([sys.executable, __file__, "--child", case, str(tokens), "1" if old else "0"],
                                     capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"tokens": tokens, "plan": case + (" (old: dense mask)" if old else ""), **r})
    print_table(rows, f"plan build per new shape (block {BLOCK}, {KV_HEADS} kv heads, causal, one thread)")
    slow = [r for r in rows if r["tokens"] == 1 << 20 and "old" not in r["plan"] and r["cpu_ms"] > TARGET_MS]
    for r in slow:
        print(f"warning: {r['plan']} at 1M tokens took {r['cpu_ms']:.1f} ms of CPU time (target < {TARGET_MS:g} ms)",
              file=sys.stderr)
    write_json(args.json, {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "block": BLOCK,
                           "kv_heads": KV_HEADS, "target_ms_at_1M": TARGET_MS, "rows": rows})


if __name__ == "__main__":
    main()
