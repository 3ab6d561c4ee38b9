"""The MoH Triton kernels compile for real GPUs (sm_80, sm_90), checked on a CPU-only machine.

The interpreter runs kernels as numpy and misses GPU code generation errors (types, shared memory
per tile choice). This compiles every MoH kernel to a cubin with Triton's bundled toolchain in a
subprocess without ``TRITON_INTERPRET`` and checks the shared memory of the chosen tiles.
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
from seqpar.kernels.moh.triton_fwd import _moh_fwd_kernel, block_sizes, dot_precision
from seqpar.kernels.moh.triton_bwd import _moh_bwd_dq_kernel, _moh_bwd_dkdv_kernel

cap, dtype, head_dim = int(sys.argv[1]), getattr(torch, sys.argv[2]), int(sys.argv[3])
name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
bm, bn, bd = block_sizes(head_dim, dtype)
ptrs = {n: "*" + name for n in ("Q", "K", "V", "G", "O", "DO", "DQ", "DK", "DV")}
ptrs.update({n: "*i32" for n in ("ROWS", "COUNTS", "CNT", "PREFIX")})
ptrs.update({n: "*fp32" for n in ("LSE", "DELTA")})
shared = {}
for fn, extra in ((_moh_fwd_kernel, {"COUNT": True}), (_moh_bwd_dq_kernel, {"COUNT": True}), (_moh_bwd_dkdv_kernel, {})):
    consts = dict(CAUSAL=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=False, DOT_PREC=dot_precision(dtype), **extra)
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n == "sm_scale" else "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    shared[fn.__name__] = triton.compile(src, target=GPUTarget("cuda", cap, 32)).metadata.shared
print(json.dumps(shared))
'''


@pytest.mark.parametrize("cap, dtype, head_dim", [(90, "bfloat16", 128), (80, "float16", 64), (80, "float32", 128)])
def test_kernels_compile_for_gpu(cap, dtype, head_dim):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(cap), dtype, str(head_dim)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    shared = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(shared) == 3
    assert max(shared.values()) <= 163 * 1024, f"tiles exceed sm_80 shared memory: {shared}"
