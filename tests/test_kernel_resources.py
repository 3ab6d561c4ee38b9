"""GPU readiness without a GPU: every Triton kernel, compiled for sm_90 exactly as a real launch
specialises it, has 0 spill bytes, fits shared memory, and keeps >= 2 CTAs or >= 8 warps per SM.

``benchmarks/kernel_resources.py`` drives the library's launchers under a fake sm_90 driver (so
the head-dim stride is the constant 1 and 16-divisible pointers / sizes carry their alignment, as
on a GPU), compiles with Triton's bundled ptxas and reports ptxas' register / spill counts. It
runs in a subprocess: this test session runs the kernels under ``TRITON_INTERPRET=1``.
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
    "moh": {"moh_fwd", "moh_bwd_preprocess", "moh_bwd_dq", "moh_bwd_dkdv"},
    "lightning": {"chunk_state", "state_scan", "output", "dv", "dqk"},
    "lightning states": {"chunk_state", "state_scan", "output", "dv", "dqk"},  # initial / final states
}


def _has_nvidia_backend() -> bool:
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def run_harness(tmp_path, *args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / "resources.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--json", str(out), *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())["rows"]


def assert_rule(rows: list[dict]) -> None:
    bad = [r for r in rows if not (r["spill_st"] == 0 and r["spill_ld"] == 0 and r["smem_ok"]
                                   and (r["CTA/SM"] >= 2 or r["warps/SM"] >= 8))]
    assert not bad, "kernels breaking the occupancy rule:\n" + "\n".join(
        f"{r['case']} {r['kernel']} {r['dtype']} d={r['d']} {r['config']}: regs {r['regs']}, spills "
        f"{r['spill_st']}/{r['spill_ld']} B, smem {r['smem_KB']} KB, {r['CTA/SM']} CTA/SM x {r['warps']} warps"
        for r in bad)


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton wheel without the NVIDIA backend (ptxas)")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_default_configs_sm90(tmp_path, dtype):
    """Every default config the launchers pick at head dim 64 and 128 (the presets' shapes)."""
    rows = run_harness(tmp_path, "--targets", "90", "--dtypes", dtype, "--head-dims", "64", "128",
                       "--cases", *EXPECTED)
    for case, kernels in EXPECTED.items():
        for d in (64, 128):
            got = {r["kernel"] for r in rows if case in r["case"].split(", ") and r["d"] == d}
            assert got == kernels, (case, d, got)
    assert_rule(rows)
    # Hopper MMA for every matmul kernel, fp16 Lightning included (the rest are row sums / scans)
    assert all(r["mma"] == "wgmma" for r in rows if r["kernel"] not in ("s2_bwd_preprocess", "moh_bwd_preprocess",
                                                                           "state_scan"))
    # the Lightning state pass is parallel over chunks / state blocks: >= 1 program per SM at
    # seq 2048 (the old per-(tile, head) walk launched 128 programs at 32 heads, 48 at 12)
    for r in rows:
        if r["kernel"] in ("chunk_state", "state_scan"):
            assert r["programs/SM"] >= 1.0, r


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton wheel without the NVIDIA backend (ptxas)")
def test_autotune_space_sm90_and_sm80_shared_memory(tmp_path):
    """Every config of the autotune spaces at the heaviest tiles (bf16, d=128) passes on sm_90,
    and the defaults fit sm_80's 163 KB of shared memory (sm_80's mma.sync accumulators spill a
    few bytes in some backward kernels: reported by the harness, not tuned for)."""
    rows = run_harness(tmp_path, "--targets", "90", "--dtypes", "bf16", "--head-dims", "128", "--space",
                       "--cases", "s2", "moh", "lightning")
    assert {r["config"] for r in rows} > {"default"}
    assert_rule(rows)
    rows80 = run_harness(tmp_path, "--targets", "80", "--dtypes", "fp16", "--head-dims", "128",
                         "--cases", "s2", "moh", "lightning")
    assert rows80 and all(r["smem_ok"] for r in rows80), [r for r in rows80 if not r["smem_ok"]]
