"""The S2 / flash Triton kernels compile for real GPUs (sm_80, sm_90), checked on a CPU-only machine.

The interpreter runs kernels as numpy and misses GPU code generation errors (types, fp64 in the
delta preprocess, shared memory of the tile choice). This compiles the production configuration of
every S2 kernel (forward, delta preprocess, dq, dk/dv; no debug counter) to a cubin with Triton's
bundled toolchain in a subprocess without ``TRITON_INTERPRET`` and checks the shared memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from seqpar.kernels.s2.triton_fwd import _s2_fwd_kernel, kernel_options
from seqpar.kernels.s2.triton_bwd import _s2_bwd_preprocess_kernel, _s2_bwd_dq_kernel, _s2_bwd_dkdv_kernel

cap, dtype, head_dim, block = int(sys.argv[1]), getattr(torch, sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
opts = kernel_options(torch.empty(1, 1, 1, head_dim, dtype=dtype), block)
launch = {k: opts.pop(k) for k in ("num_warps", "num_stages")}
ptrs = {n: "*" + name for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
ptrs.update({n: "*fp32" for n in ("LSE", "DELTA", "DLSE", "CNT")})
ptrs.update({n: "*i32" for n in ("q_start_ptr", "q_end_ptr", "kv_start_ptr", "kv_end_ptr", "row_ptr",
                                  "col_idx", "col_ptr", "row_idx")})
floats = ("scale_log2", "sm_scale")
shared = {}
kernels = (
    (_s2_fwd_kernel, dict(CAUSAL=True, COUNT=False, **opts)),
    (_s2_bwd_preprocess_kernel, dict(HAS_DLSE=True, BLOCK_M=64, BLOCK_D=opts["BLOCK_D"])),
    (_s2_bwd_dq_kernel, dict(CAUSAL=True, COUNT=False, **opts)),
    (_s2_bwd_dkdv_kernel, dict(CAUSAL=True, COUNT=False, **opts)),
)
for fn, consts in kernels:
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in floats else "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=launch)
    shared[fn.__name__] = compiled.metadata.shared
print(json.dumps(shared))
'''


@pytest.mark.parametrize("cap, dtype, head_dim, block", [
    (90, "bfloat16", 128, 64),   # the S2-Attention paper's setting
    (80, "float16", 64, 128),    # flash's larger tile
    (80, "float32", 80, 64),     # padded head dim, fp32 inputs (needs fewer pipeline stages)
    (80, "float16", 128, 128),   # 128 x 128 half tiles
])
def test_s2_kernels_compile_for_gpu(cap, dtype, head_dim, block):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(cap), dtype, str(head_dim), str(block)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    shared = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(shared) == 4
    assert max(shared.values()) <= 163 * 1024, f"tiles exceed sm_80 shared memory: {shared}"
