"""GPU readiness without a GPU: every Triton kernel, compiled for sm_90 (H100), sm_80 (A100) and sm_86
(A40; sm_89 L40S / RTX 4090 have the same limits) exactly as a real launch on that GPU specialises and
configures it, has 0 spill bytes, fits shared memory, and keeps >= 2 CTAs or >= 8 warps per SM.

``benchmarks/kernel_resources.py`` drives the library's launchers under a fake sm_90 / sm_80
driver (so the head-dim stride is the constant 1 and 16-divisible pointers / sizes carry their
alignment, as on a GPU, and the launchers pick that target's configs: kernels/_tuning.py has one table
per target), compiles with Triton's
bundled ptxas and reports ptxas' register / spill counts. It runs in a subprocess: this test
session runs the kernels under ``TRITON_INTERPRET=1``. Cost: about 40 s per (target, dtype) and
60 s per target's autotune space with a cold Triton cache, a few seconds warm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "kernel_resources.py")

# every kernel each case launches (forward and backward), by the names the harness reports
EXPECTED = {
    "s2": {"s2_fwd", "s2_bwd_preprocess", "s2_bwd_dq", "s2_bwd_dkdv"},
    "flash full": {"s2_fwd", "s2_bwd_preprocess", "s2_bwd_dq", "s2_bwd_dkdv"},
    "flash window": {"s2_fwd", "s2_bwd_preprocess", "s2_bwd_dq", "s2_bwd_dkdv"},  # its own WINDOW specialisation
    "moh": {"moh_fwd", "moh_bwd_preprocess", "moh_bwd_dq", "moh_bwd_dkdv"},
    "lightning": {"chunk_state", "state_scan", "output", "dv", "dqk"},
    "lightning states": {"chunk_state", "state_scan", "output", "dv", "dqk"},  # initial / final states
}


def _has_nvidia_backend() -> bool:
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def run_harness(tmp_path, *args: str, payload: bool = False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / "resources.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--json", str(out), *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    return data if payload else data["rows"]


def assert_rule(rows: list[dict]) -> None:
    bad = [r for r in rows if not (r["spill_st"] == 0 and r["spill_ld"] == 0 and r["smem_ok"]
                                   and (r["CTA/SM"] >= 2 or r["warps/SM"] >= 8))]
    assert not bad, "kernels breaking the occupancy rule:\n" + "\n".join(
        f"{r['case']} {r['kernel']} {r['dtype']} d={r['d']} {r['config']}: regs {r['regs']}, spills "
        f"{r['spill_st']}/{r['spill_ld']} B, smem {r['smem_KB']} KB, {r['CTA/SM']} CTA/SM x {r['warps']} warps"
        for r in bad)


# the kernels of each target's table (seqpar.kernels._tuning), by harness name -> (op, kind)
TUNED = {"s2_fwd": ("s2", "fwd"), "s2_bwd_dq": ("s2", "dq"), "s2_bwd_dkdv": ("s2", "dkdv"),
         "moh_fwd": ("moh", "fwd"), "moh_bwd_dq": ("moh", "dq"), "moh_bwd_dkdv": ("moh", "dkdv")}
MMA = {90: "wgmma", 80: "mma.sync", 86: "mma.sync"}
SCALAR_KERNELS = ("s2_bwd_preprocess", "moh_bwd_preprocess", "state_scan")  # row sums / scans: no MMA

needs_ptxas = pytest.mark.skipif(not _has_nvidia_backend(), reason="triton wheel without the NVIDIA backend (ptxas)")


@needs_ptxas
@pytest.mark.parametrize("cap", [90, 80, 86])
def test_default_configs(tmp_path, cap):
    """Every default config the launchers pick on sm_<cap> at head dim 64 and 128 in bf16 and fp16
    (the presets' shapes), and the README table of that target is this run's."""
    import torch
    import triton

    from seqpar.kernels import _tuning

    data = run_harness(tmp_path, "--targets", str(cap), "--dtypes", "bf16", "fp16", "--head-dims", "64", "128",
                       "--cases", *EXPECTED, payload=True)
    rows = data["rows"]
    for dtype in ("bf16", "fp16"):
        for case, kernels in EXPECTED.items():
            for d in (64, 128):
                got = {r["kernel"] for r in rows if case in r["case"].split(", ") and r["d"] == d and r["dtype"] == dtype}
                assert got == kernels, (case, dtype, d, got)
    assert {r["target"] for r in rows} == {f"sm_{cap}"}
    assert_rule(rows)
    # the fake target drove the selection: each attention kernel ran its target's table default
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    with _tuning.compile_target(cap):
        for r in rows:
            if r["kernel"] in TUNED:
                op, kind = TUNED[r["kernel"]]
                if r["case"] == "flash window":  # the windowed specialisation has its own table entries
                    op = "window"
                t = _tuning.attention_tuning(kind, 64, r["d"], dtypes[r["dtype"]], "cpu", op=op)
                assert (r["warps"], r["stages"]) == (t.default.num_warps, t.default.num_stages), r
    # tensor-core MMA for every matmul kernel, fp16 Lightning included
    assert all(r["mma"] == MMA[cap] for r in rows if r["kernel"] not in SCALAR_KERNELS), \
        [r for r in rows if r["kernel"] not in SCALAR_KERNELS and r["mma"] != MMA[cap]]
    # the Lightning state pass is parallel over chunks / state blocks: >= 1 program per SM at
    # seq 2048 (the old per-(tile, head) walk launched 128 programs at 32 heads, 48 at 12)
    for r in rows:
        if r["kernel"] in ("chunk_state", "state_scan"):
            assert r["programs/SM"] >= 1.0, r
    # README's table of this target is regenerated from exactly these rows (same Triton)
    readme = open(os.path.join(ROOT, "README.md")).read()
    begin, end = f"<!-- kernel_resources.py sm_{cap} table begin -->", f"<!-- kernel_resources.py sm_{cap} table end -->"
    assert begin in readme and end in readme, f"README.md lacks the sm_{cap} table markers"
    current = readme.split(begin, 1)[1].split(end, 1)[0].strip("\n")
    if f"Triton {triton.__version__}," in current:  # another Triton compiles other numbers
        assert current == data["readme_tables"][f"sm_{cap}"], (
            "README.md's kernel-resources table is stale: run python benchmarks/kernel_resources.py --update-readme")


@needs_ptxas
@pytest.mark.parametrize("cap", [90, 80, 86])
def test_autotune_space(tmp_path, cap):
    """Every config of the autotune spaces at the heaviest tiles (bf16, d=128; causal, non-causal
    and sliding-window) passes on sm_<cap>."""
    rows = run_harness(tmp_path, "--targets", str(cap), "--dtypes", "bf16", "--head-dims", "128", "--space",
                       "--cases", "s2", "flash full", "flash window", "moh", "lightning")
    configs = {r["config"] for r in rows}
    assert configs > {"default"} and len(configs) >= 4, configs
    assert_rule(rows)
