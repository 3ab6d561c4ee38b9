"""Context parallelism on NCCL: every kind x scheme at P = 2 equals the single-rank op (outputs and
gradients), one GPU per rank (``pytest tests/gpu -m multi_gpu``).

One GPU cannot host two NCCL ranks, so on a one-GPU machine these skip with one reason line; the
rest of tests/gpu runs there. The CPU dry run (``SEQPAR_GPU_DRYRUN=1``) runs them on gloo.
"""

from __future__ import annotations

import pytest
import torch

from cp_harness import run_ranks
from gpu_common import CUDA, DRYRUN, NEEDS_TWO_GPUS, TWO_GPUS, seq
from tolerance import GRAD_FACTOR, OUT_FACTOR, assert_rel_close

pytestmark = [pytest.mark.multi_gpu, pytest.mark.skipif(not (TWO_GPUS or DRYRUN), reason=NEEDS_TWO_GPUS)]

CASES = [("softmax", "ring"), ("softmax", "allgather"), ("softmax", "ulysses"), ("s2", "ring"), ("s2", "allgather"),
         ("lightning", "allgather"), ("lightning", "ring"), ("lightning", "ulysses"), ("moh", "ring"),
         ("moh", "allgather"), ("moh", "ulysses")]


def _inputs(kind: str, n: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    h, hkv, d = 8, 2, 64 if CUDA else 16
    full = [torch.randn(1, n, hh, d, generator=g) for hh in (h, hkv, hkv)]
    if kind == "lightning":
        full[1] = full[1] * d ** -0.5
    kw = {}
    if kind == "lightning":
        kw["slope"] = torch.linspace(0.05, 0.5, h)
    if kind == "s2":
        from seqpar.kernels import S2Layout

        kw["layout"] = S2Layout(block_size=64 if CUDA else 16, local_blocks=2, vert_stride=4)
    if kind == "moh":
        kw["gates"] = (torch.rand(1, n, h, generator=g) + 0.1) * (torch.rand(1, n, h, generator=g) < 0.5)
    do = torch.randn(1, n, h, d, generator=g)
    return [t.to(device, dtype) for t in full], {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}, \
        do.to(device, dtype)


def _job(rank: int, world: int, kind: str, scheme: str) -> dict:
    from seqpar import cp

    device = torch.device("cuda", rank) if CUDA else torch.device("cpu")
    dtype = torch.bfloat16 if CUDA else torch.float32
    n = seq(8192)
    full, kw, do = _inputs(kind, n, device, dtype)
    group = torch.distributed.group.WORLD
    local = [cp.shard(t, group, dim=1, balance="zigzag").detach().requires_grad_() for t in full]
    lkw = dict(kw)
    if kind == "moh":
        lkw["gates"] = cp.shard(kw["gates"], group, dim=1, balance="zigzag")
    o = cp.attention(*local, kind=kind, scheme=scheme, group=group, balance="zigzag", backend="triton", **lkw)
    o = o[0] if isinstance(o, tuple) else o
    (o.float() * cp.shard(do, group, dim=1, balance="zigzag").float()).sum().backward()
    return {"o": cp.unshard(o.detach(), group, dim=1, balance="zigzag"),
            "grads": [cp.unshard(x.grad, group, dim=1, balance="zigzag") for x in local]}


@pytest.mark.parametrize("kind, scheme", CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_cp_on_nccl_equals_one_rank(kind, scheme):
    from seqpar.kernels import flash_attention, lightning_attention, moh_attention, s2_attention

    out = run_ranks(_job, 2, kind, scheme, timeout=600, backend="nccl" if CUDA else "gloo")[0]
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.bfloat16 if CUDA else torch.float32
    full, kw, do = _inputs(kind, seq(8192), device, dtype)

    def single(dt):
        xs = [t.to(dt).detach().requires_grad_() for t in full]
        args = {k: (v.to(dt) if k == "gates" else v) for k, v in kw.items()}
        if kind == "softmax":
            o = flash_attention(*xs, backend="triton")
        elif kind == "s2":
            o = s2_attention(*xs, args["layout"], backend="triton")
        elif kind == "moh":
            o = moh_attention(*xs, args["gates"], backend="triton")
        else:
            o, _ = lightning_attention(*xs, args["slope"], backend="triton")
        (o.float() * do.float()).sum().backward()
        return [o.detach()] + [x.grad for x in xs]
    ref = single(dtype)
    got = [out["o"].to(device)] + [g.to(device) for g in out["grads"]]
    if not CUDA:  # dry run: fp32 on gloo, the same kernels in the interpreter
        for i, name in enumerate(("o", "dq", "dk", "dv")):
            torch.testing.assert_close(got[i], ref[i], rtol=1e-4, atol=1e-4, msg=name)
        return
    r32 = single(torch.float32)
    for i, name in enumerate(("o", "dq", "dk", "dv")):
        # the bf16 CP result vs the bf16 one-rank op, both against the fp32 one-rank op
        assert_rel_close(name, got[i], ref[i], r32[i], OUT_FACTOR if i == 0 else GRAD_FACTOR)
