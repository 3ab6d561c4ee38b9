"""The Lightning Triton kernels compile for an H100 (sm_90) without a GPU.

The CPU interpreter does not run Triton's compiler, so it cannot see compile errors, register
spills or shared-memory overflows of the real GPU build. Here each kernel is compiled ahead of
time for sm_90 with the launch configuration the launchers use (bf16/fp16, head dim 128), in a
subprocess because the test session runs with TRITON_INTERPRET=1, and its cubin resources are
checked: it builds, spills nothing, and fits Hopper's 227 KiB of shared memory per block.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _compile_all(dtype: str, head_dim: int) -> list[dict]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from seqpar.kernels.lightning import triton_bwd as B
    from seqpar.kernels.lightning import triton_fwd as F

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    blk = F.tile(head_dim, tdtype)
    mode, smode = F.dot_modes(tdtype)
    base = dict(H=16, DK=head_dim, DV=head_dim, C=64, BK=blk, BV=blk, MODE=mode)
    t, f32, i32 = "*" + dtype, "*fp32", "*i32"
    snap = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[F.snapshot_dtype(tdtype)]
    sequential = dict(num_warps=4, num_stages=3)  # the launchers' Triton defaults
    parallel = dict(num_warps=F.NUM_WARPS, num_stages=F.NUM_STAGES)
    kernels = [
        (F._state_kernel, dict(k_ptr=t, v_ptr=t, slope_ptr=f32, h0_ptr=f32, hbuf_ptr=snap, ht_ptr=f32,
                               cu_ptr=i32, choff_ptr=i32), dict(base, HKV=16, HAS_H0=True, STORE_HT=True), sequential),
        (F._output_kernel, dict(q_ptr=t, k_ptr=t, v_ptr=t, slope_ptr=f32, hbuf_ptr=snap, o_ptr=t, cu_ptr=i32,
                                chidx_ptr=i32), dict(base, HKV=16, SMODE=smode), parallel),
        (B._dstate_kernel, dict(q_ptr=t, do_ptr=t, slope_ptr=f32, dht_ptr=f32, dhbuf_ptr=snap, dh0_ptr=f32,
                                cu_ptr=i32, choff_ptr=i32), dict(base, HAS_DHT=True, STORE_DH0=True), sequential),
        (B._dv_kernel, dict(q_ptr=t, k_ptr=t, do_ptr=t, slope_ptr=f32, dhbuf_ptr=snap, dv_ptr=f32, cu_ptr=i32,
                            chidx_ptr=i32), dict(base, HKV=16, SMODE=smode), parallel),
        (B._dqk_kernel, dict(q_ptr=t, k_ptr=t, v_ptr=t, do_ptr=t, slope_ptr=f32, hbuf_ptr=snap, dhbuf_ptr=snap,
                             dq_ptr=t, dk_ptr=f32, cu_ptr=i32, chidx_ptr=i32), dict(base, HKV=16, SMODE=smode), parallel),
    ]
    out = []
    for fn, ptrs, consts, opts in kernels:
        sig = {a: ("constexpr" if a in consts else ptrs[a]) for a in fn.arg_names}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        cubin = os.path.join(os.environ["LIGHTNING_AOT_DIR"], fn.__name__ + ".cubin")
        with open(cubin, "wb") as fh:
            fh.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        fields = dict(f.split(":") for f in next(line for line in usage.splitlines() if "REG:" in line).split())
        out.append({"kernel": fn.__name__, "regs": int(fields["REG"]), "stack": int(fields["STACK"]),
                    "shared": int(compiled.metadata.shared)})
    return out


def _has_nvidia_backend() -> bool:
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton wheel without the NVIDIA backend (ptxas)")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_kernels_compile_for_sm90_without_spills(tmp_path, dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(LIGHTNING_AOT_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, __file__, dtype, "128"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["kernel"] for r in results] == ["_state_kernel", "_output_kernel", "_dstate_kernel", "_dv_kernel",
                                              "_dqk_kernel"]
    for r in results:
        assert r["stack"] == 0, f"{r['kernel']} spills registers: {r}"
        assert r["shared"] <= 227 * 1024, f"{r['kernel']} needs too much shared memory: {r}"


if __name__ == "__main__":
    print(json.dumps(_compile_all(sys.argv[1], int(sys.argv[2]))))
