"""Compile metadata of every seqpar Triton kernel for sm_90 / sm_80 / sm_86, on a machine without a GPU.

The library's own launchers (``s2_fwd`` / ``s2_bwd``, ``moh_fwd`` / ``moh_bwd``,
``lightning_fwd`` / ``lightning_bwd``) are called on CPU tensors of realistic shapes while a fake
Triton driver reports a GPU target. Every ``kernel[grid](...)`` they issue goes through Triton's
own argument binder, so the specialisation is exactly what a real launch produces (unit head-dim
strides become constants, 16-divisible pointers and integers are marked), then compiles with the
bundled LLVM + ptxas instead of launching. For each compiled kernel this reports:

* regs, spill store / load bytes: ``ptxas -v`` on the kernel's PTX with Triton's own flags;
* smem: Triton's dynamic shared memory plus the cubin's static shared memory
  (``cuobjdump -res-usage``);
* CTAs/SM: the minimum of the register, shared-memory, warp and CTA limits of the target
  (per-warp register allocation in units of 256, 1 KB of shared memory reserved per CTA);
* wgmma: whether the PTX uses Hopper's warpgroup MMA (else ``mma.sync`` or no MMA);
* grid: programs of the launch at the case's shape (compare with the target's SM count).

The occupancy rule checked by ``tests/test_kernel_resources.py``: 0 spill bytes and
(>= 2 CTAs per SM or >= 8 resident warps) for every default configuration at head dim <= 128.

    python benchmarks/kernel_resources.py [--json out.json] [--targets 90 80 86] [--head-dims 64 128]
        [--dtypes bf16 fp16] [--space]        # --space: also every config of the autotune space
    python benchmarks/kernel_resources.py --update-readme   # rewrite README.md's tables from a run

The launchers pick their configs for the fake target (``seqpar.kernels._tuning.compile_target``)
exactly as they would from ``torch.cuda.get_device_capability`` on that GPU.

Needs Triton's NVIDIA backend (ptxas, cuobjdump ship in the wheel); must run without
``TRITON_INTERPRET`` (kernels defined under the interpreter cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("kernel_resources.py compiles real GPU code: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import print_table, write_json  # noqa: E402


@dataclass(frozen=True)
class TargetLimits:
    """Per-SM limits of a GPU target (CUDA occupancy calculator values)."""

    name: str
    sms: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_per_cta: int = 227 * 1024
    smem_reserved_per_cta: int = 1024


TARGETS = {
    90: TargetLimits("H100 (sm_90)", sms=132),
    80: TargetLimits("A100 (sm_80)", sms=108, smem_per_sm=164 * 1024, smem_per_cta=163 * 1024),
    # A40 / RTX A6000 (sm_86; sm_89 L40S / RTX 4090 have the same per-SM limits): its own table
    86: TargetLimits("A40 (sm_86)", sms=84, max_warps_per_sm=48, max_ctas_per_sm=16, smem_per_sm=100 * 1024,
                     smem_per_cta=99 * 1024),
}


def ctas_per_sm(regs: int, smem: int, warps: int, lim: TargetLimits) -> int:
    """Resident CTAs per SM: registers are allocated per warp in units of 256 (regs/thread
    rounded up to 8), shared memory per CTA plus the reserved 1 KB."""
    warp_regs = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (lim.regs_per_sm // warp_regs) // warps
    by_smem = lim.smem_per_sm // (smem + lim.smem_reserved_per_cta) if smem else lim.max_ctas_per_sm
    by_warps = lim.max_warps_per_sm // warps
    return max(0, min(by_regs, by_smem, by_warps, lim.max_ctas_per_sm))


class FakeDriver:
    """Just enough of a Triton driver for JITFunction.run to bind, specialise and compile."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"fake-sm{self.target.arch}"  # separate per-target kernel caches

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


@dataclass
class Launch:
    kernel: str
    grid: tuple
    compiled: object


@contextlib.contextmanager
def capture_launches(capability: int) -> Iterator[list[Launch]]:
    """Inside the block every Triton launch compiles for ``sm_<capability>`` and returns without
    running (warmup); the compiled kernels and grids are appended to the yielded list. The
    launchers pick their configs for that target (``_tuning.compile_target``), as they would from
    ``torch.cuda.get_device_capability`` on that GPU."""
    from seqpar.kernels._tuning import compile_target

    launches: list[Launch] = []
    orig_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        g = tuple(grid(dict(zip(self.arg_names, args), **kwargs)) if callable(grid) else grid)
        g = g + (1,) * (3 - len(g))
        launches.append(Launch(self.fn.__name__, g, kernel))
        return kernel

    prev = driver._active
    driver.set_active(FakeDriver(capability))
    JITFunction.run = run
    try:
        with compile_target(capability):
            yield launches
    finally:
        JITFunction.run = orig_run
        driver._active = prev


_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _ptxas_path(capability: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(capability).path


def resources(compiled, capability: int) -> dict:
    """regs / spills (ptxas -v with Triton's flags), smem, wgmma of one compiled kernel."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    md = compiled.metadata
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src, out, cubin = (os.path.join(tmp, n) for n in ("k.ptx", "k.o", "k.cubin"))
        with open(src, "w") as f:
            f.write(ptx)
        fmad = [] if md.enable_fp_fusion else ["--fmad=false"]
        log = subprocess.run([_ptxas_path(capability), "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", out],
                             capture_output=True, text=True, check=True).stderr
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st, spill_ld = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    fields = dict(f.split(":", 1) for f in next(ln for ln in usage.splitlines() if "REG:" in ln).split())
    assert int(fields["REG"]) == regs, (fields, regs)  # the cubin Triton built == our ptxas run
    static_smem = int(fields["SHARED"])
    return {
        "regs": regs, "spill_st": spill_st, "spill_ld": spill_ld, "stack": int(fields["STACK"]),
        "smem": int(md.shared) + static_smem, "warps": int(md.num_warps), "stages": int(md.num_stages),
        "mma": "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "-"),
    }


# ---------------------------------------------------------------------------------------------
# Cases: the launchers at the presets' attention shapes
# ---------------------------------------------------------------------------------------------

# (head dim) -> (heads, kv heads): 125m (d 64, MHA) and 1b / 7b (d 128, GQA 2 and 4)
PRESET_HEADS = {64: (12, 12), 128: (32, 8)}
SEQ = 2048
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _qkv(h: int, hkv: int, d: int, dtype, seq: int = SEQ, b: int = 1):
    g = torch.Generator().manual_seed(0)
    mk = lambda n: (torch.randn(b, seq, n, d, generator=g) * 0.5).to(dtype)  # noqa: E731
    return mk(h), mk(hkv), mk(hkv)


def case_s2(h, hkv, d, dtype, causal=True, layout=True, window=0):
    from seqpar.kernels.s2.layout import S2Layout
    from seqpar.kernels.s2.plan import build_plan
    from seqpar.kernels.s2.triton_bwd import s2_bwd
    from seqpar.kernels.s2.triton_fwd import s2_fwd

    q, k, v = _qkv(h, hkv, d, dtype)
    if layout:
        lay = S2Layout(block_size=64, local_blocks=4, vert_stride=4).with_heads(h)
        plan = build_plan(lay, True, hkv, SEQ, SEQ, 0, 0, None, lay.block_size)
    else:
        from seqpar.kernels.flash.api import DEFAULT_BLOCK_SIZE

        plan = build_plan(None, causal, hkv, SEQ, SEQ, 0, 0, None, DEFAULT_BLOCK_SIZE, window=window)
    o, lse = s2_fwd(q, k, v, plan, d ** -0.5)
    s2_bwd(q, k, v, o, lse, torch.randn_like(q), torch.zeros_like(lse), plan, d ** -0.5)


def case_moh(h, hkv, d, dtype):
    from seqpar.kernels.moh.rows import build_active_rows
    from seqpar.kernels.moh.triton_bwd import moh_bwd
    from seqpar.kernels.moh.triton_fwd import moh_fwd

    q, k, v = _qkv(h, hkv, d, dtype)
    gates = (torch.rand(1, SEQ, h) < 0.5).to(dtype)
    act = build_active_rows(gates)
    kw = dict(causal=True, sm_scale=d ** -0.5, q_offset=0, k_offset=0)
    o, lse = moh_fwd(q, k, v, gates, act, **kw)
    moh_bwd(torch.randn_like(q), torch.zeros_like(lse), q, k, v, gates, o, lse, act, **kw)


def case_lightning(h, hkv, d, dtype, states=False):
    from seqpar.kernels.lightning._plan import make_plan
    from seqpar.kernels.lightning.api import CHUNK_SIZE
    from seqpar.kernels.lightning.triton_bwd import lightning_bwd
    from seqpar.kernels.lightning.triton_fwd import lightning_fwd

    q, k, v = (t.view(SEQ, t.shape[2], d) for t in _qkv(h, hkv, d, dtype))
    slope = torch.linspace(0.01, 0.5, h)
    plan = make_plan(1, SEQ, None, CHUNK_SIZE, torch.device("cpu"))
    h0 = torch.zeros(1, h, d, d) if states else None
    lightning_fwd(q, k, v, slope, h0, plan)
    lightning_bwd(q, k, v, slope, h0, torch.randn_like(q), torch.zeros(1, h, d, d) if states else None,
                  plan, need_dh0=states)


CASES: dict[str, Callable] = {
    "s2": case_s2,
    "flash causal": lambda h, hkv, d, dt: case_s2(h, hkv, d, dt, causal=True, layout=False),
    "flash full": lambda h, hkv, d, dt: case_s2(h, hkv, d, dt, causal=False, layout=False),
    # the sliding-window specialisation (WINDOW constexpr: one more compare in the mask)
    "flash window": lambda h, hkv, d, dt: case_s2(h, hkv, d, dt, causal=True, layout=False, window=300),
    "moh": case_moh,
    "lightning": case_lightning,
    "lightning states": lambda h, hkv, d, dt: case_lightning(h, hkv, d, dt, states=True),
}


def collect(targets=(90,), head_dims=(64, 128), dtypes=("bf16", "fp16"), cases: Optional[list[str]] = None,
            space: bool = False) -> list[dict]:
    """One row per (target, case, dtype, head dim, kernel launch) of the default configuration
    (and, with ``space``, of every autotune config). Duplicate specialisations are reported once."""
    rows: list[dict] = []
    seen: dict = {}
    for cap in targets:
        lim = TARGETS[cap]
        for name in cases or list(CASES):
            for dt in dtypes:
                for d in head_dims:
                    h, hkv = PRESET_HEADS[d]
                    for cfg_label, ctx in _config_contexts(space):
                        with ctx(), capture_launches(cap) as launches:
                            CASES[name](h, hkv, d, DTYPES[dt])
                        for ln in launches:
                            key = (cap, ln.compiled.hash, ln.grid)
                            if key in seen:  # e.g. s2 and flash causal share the compiled kernels
                                if name not in seen[key]["case"].split(", "):
                                    seen[key]["case"] += f", {name}"
                                continue
                            r = resources(ln.compiled, cap)
                            ctas = ctas_per_sm(r["regs"], r["smem"], r["warps"], lim)
                            programs = ln.grid[0] * ln.grid[1] * ln.grid[2]
                            seen[key] = {
                                "target": f"sm_{cap}", "case": name, "dtype": dt, "d": d, "heads": f"{h}/{hkv}",
                                "kernel": ln.kernel.lstrip("_").removesuffix("_kernel"), "config": cfg_label,
                                "regs": r["regs"], "spill_st": r["spill_st"], "spill_ld": r["spill_ld"],
                                "smem_KB": round(r["smem"] / 1024, 1), "warps": r["warps"], "stages": r["stages"],
                                "CTA/SM": ctas, "warps/SM": ctas * r["warps"], "mma": r["mma"],
                                "programs": programs, "programs/SM": round(programs / lim.sms, 2),
                                "smem_ok": r["smem"] <= lim.smem_per_cta,
                            }
                            rows.append(seen[key])
    return rows


def _config_contexts(space: bool):
    """(label, context manager) pairs: the deterministic default, plus every autotune config."""
    yield "default", contextlib.nullcontext
    if not space:
        return
    try:
        from seqpar.kernels._tuning import force_each_config
    except ImportError:
        return
    yield from force_each_config()


def occupancy_ok(row: dict) -> bool:
    """The rule the test enforces: no spills, shared memory fits, and >= 2 CTAs or >= 8 warps per SM."""
    return (row["spill_st"] == 0 and row["spill_ld"] == 0 and row["smem_ok"]
            and (row["CTA/SM"] >= 2 or row["warps/SM"] >= 8))


# README tables: bf16, d = 128, default configs, one row per kernel (rows of the same label merge)
README_LABELS = {
    ("s2", "s2_fwd"): "s2 / flash causal fwd", ("s2", "s2_bwd_preprocess"): "s2 / flash bwd preprocess (delta)",
    ("s2", "s2_bwd_dq"): "s2 / flash causal bwd dq", ("s2", "s2_bwd_dkdv"): "s2 / flash causal bwd dk/dv",
    ("flash full", "s2_fwd"): "flash non-causal fwd", ("flash full", "s2_bwd_dq"): "flash non-causal bwd dq",
    ("flash full", "s2_bwd_dkdv"): "flash non-causal bwd dk/dv",
    ("flash window", "s2_fwd"): "flash sliding-window fwd", ("flash window", "s2_bwd_dq"): "flash sliding-window bwd dq",
    ("flash window", "s2_bwd_dkdv"): "flash sliding-window bwd dk/dv",
    ("moh", "moh_fwd"): "moh fwd", ("moh", "moh_bwd_preprocess"): "moh bwd preprocess (active rows)",
    ("moh", "moh_bwd_dq"): "moh bwd dq", ("moh", "moh_bwd_dkdv"): "moh bwd dk/dv",
    ("lightning", "chunk_state"): "lightning chunk-local state (fwd, bwd)",
    ("lightning", "state_scan"): "lightning state scan (fwd, bwd)", ("lightning", "output"): "lightning output",
    ("lightning", "dv"): "lightning bwd dv", ("lightning", "dqk"): "lightning bwd dq/dk",
}
README_CASES = ["s2", "flash full", "flash window", "moh", "lightning"]


def readme_table(rows: list[dict], cap: int) -> str:
    """The README's markdown table for ``sm_<cap>`` from harness rows (bf16, d = 128 defaults)."""
    lim = TARGETS[cap]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["target"] != f"sm_{cap}" or r["dtype"] != "bf16" or r["d"] != 128 or r["config"] != "default":
            continue
        case = r["case"].split(", ")[0]
        label = README_LABELS.get((case, r["kernel"]))
        if label is not None:
            groups.setdefault(label, []).append(r)

    def span(vals, fmt=str) -> str:
        lo, hi = min(vals), max(vals)
        return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"

    out = [f"Triton {triton.__version__}, target sm_{cap} ({lim.name.split(' ')[0]}: {lim.sms} SMs, "
           f"{lim.regs_per_sm // 1024}K registers, {lim.smem_per_sm // 1024} KB shared memory per SM, "
           f"{lim.smem_per_cta // 1024} KB per CTA), bf16, d = 128, 32 / 8 heads, seq {SEQ}, default configs:",
           "",
           "| kernel | regs | spill st/ld | smem | warps / stages | CTA/SM (warps) | MMA | programs |",
           "|---|---|---|---|---|---|---|---|"]
    for label in dict.fromkeys(README_LABELS.values()):
        g = groups.get(label)
        if not g:
            continue
        worst = min(g, key=lambda r: r["CTA/SM"])
        out.append("| " + " | ".join([
            label, span([r["regs"] for r in g]),
            f"{max(r['spill_st'] for r in g)} / {max(r['spill_ld'] for r in g)}",
            span([r["smem_KB"] for r in g], lambda v: f"{v:g} KB" if v else "0"),
            " ; ".join(dict.fromkeys(f"{r['warps']} / {r['stages']}" for r in g)),
            f"{worst['CTA/SM']} ({worst['warps/SM']})",
            " ; ".join(dict.fromkeys(r["mma"] for r in g)), span([r["programs"] for r in g]),
        ]) + " |")
    return "\n".join(out)


def readme_block(cap: int) -> tuple[str, str]:
    return f"<!-- kernel_resources.py sm_{cap} table begin -->", f"<!-- kernel_resources.py sm_{cap} table end -->"


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_current(cap: int, path: str = README) -> Optional[str]:
    """The table between the sm_<cap> markers of README.md (None without markers)."""
    text = open(path).read()
    begin, end = readme_block(cap)
    if begin not in text or end not in text:
        return None
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def update_readme(rows: list[dict], targets, path: str = README) -> None:
    text = open(path).read()
    for cap in targets:
        begin, end = readme_block(cap)
        if begin not in text or end not in text:
            sys.exit(f"{path} has no {begin} ... {end} block")
        head, rest = text.split(begin, 1)
        text = head + begin + "\n" + readme_table(rows, cap) + "\n" + end + rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(text)
    print(f"updated {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--targets", type=int, nargs="*", default=[90, 80, 86], choices=sorted(TARGETS))
    ap.add_argument("--head-dims", type=int, nargs="*", default=[64, 128], choices=sorted(PRESET_HEADS))
    ap.add_argument("--dtypes", nargs="*", default=["bf16", "fp16"], choices=sorted(DTYPES))
    ap.add_argument("--cases", nargs="*", default=None, choices=sorted(CASES))
    ap.add_argument("--space", action="store_true", help="also compile every config of the autotune space")
    ap.add_argument("--update-readme", action="store_true",
                    help="run bf16 d=128 defaults of the README's cases and rewrite README.md's tables")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    if args.update_readme:
        update_readme(collect(args.targets, (128,), ("bf16",), README_CASES), args.targets)
        return
    rows = collect(args.targets, args.head_dims, args.dtypes, args.cases, args.space)
    for r in rows:
        r["ok"] = "yes" if occupancy_ok(r) else "NO"
    shown = ["target", "case", "dtype", "d", "kernel", "config", "regs", "spill_st", "spill_ld", "smem_KB",
             "warps", "stages", "CTA/SM", "mma", "programs/SM", "ok"]
    print_table([{c: r[c] for c in shown} for r in rows],
                f"Triton {triton.__version__} compile metadata, seq {SEQ}, heads per head dim {PRESET_HEADS}")
    bad = [r for r in rows if r["ok"] != "yes" and r["config"] == "default"]
    print(f"\n{len(rows)} kernels, {len(bad)} default configs break the rule "
          f"(0 spills, smem fits, >= 2 CTA/SM or >= 8 warps/SM)")
    write_json(args.json, {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                           "triton": triton.__version__, "seq": SEQ, "heads": PRESET_HEADS,
                           "targets": {f"sm_{c}": asdict(TARGETS[c]) for c in args.targets}, "rows": rows,
                           # what --update-readme would write from these rows (tests compare README)
                           "readme_tables": {f"sm_{c}": readme_table(rows, c) for c in args.targets}})


if __name__ == "__main__":
    main()
