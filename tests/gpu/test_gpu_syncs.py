"""Host syncs in a steady-state step: none per layer (issue 10, item 5; issue 20, item 7), checked by CUDA.

``torch.cuda.set_sync_debug_mode("error")`` turns every device-to-host synchronisation (``.item()``,
``.tolist()``, ``.cpu()``, blocking copies, ``nonzero``...) into a RuntimeError, and
``cp.count_host_syncs`` (which also sees host-to-device copies, which CUDA's mode does not) must
count nothing, so the forward and backward of a model with every attention kind must run inside
both after a warm-up step (caches of tile plans and index tensors are filled by then). As in the
trainer, the step runs inside ``cp.step_checks()``, whose one read of the deferred data checks
happens at its exit, after the checked region; with packed documents the step's ``cu_seqlens``
values are read once before it (``host_ints``: what a data loader's step costs, shared by every
layer: plans, RoPE positions, Lightning's varlen chunk plan). The optimizer step is outside:
megatron-core's grad-norm clipping reads the norm on the host once per step by design. The CPU dry
run counts with ``cp.count_host_syncs`` alone.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import replace

import pytest
import torch

from gpu_common import CUDA, DEVICE, seq


@contextlib.contextmanager
def _one_rank_parallel():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from seqpar.megatron import disable_cpu_compat, init_parallel

    with tempfile.TemporaryDirectory(prefix="seqpar_gpu_") as tmp:
        # NCCL on CUDA (gloo in the CPU dry run); file:// rendezvous, no port
        init_parallel(1, 1, seed=3, init_method=f"file://{os.path.join(tmp, 'rdv')}", rank=0, world_size=1)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
            if not CUDA:
                disable_cpu_compat()


@contextlib.contextmanager
def _no_host_sync():
    from seqpar import cp

    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with cp.count_host_syncs() as n:   # reads and host-to-device copies, by any code
            yield
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode(0)
    assert n.total == 0, list(n.sites)


pytestmark = pytest.mark.syncs


@pytest.mark.parametrize("pattern, dtype", [("ASLH", torch.bfloat16), ("LLLA", torch.float32)])
def test_steady_state_forward_backward_has_no_host_sync(pattern, dtype):
    from seqpar import cp
    from seqpar.models import build_gpt, preset, transformer_config

    n = seq(2048)
    with _one_rank_parallel():
        p = replace(preset("tiny"), pattern=pattern)
        cfg = transformer_config(p, params_dtype=dtype, bf16=dtype == torch.bfloat16, s2_block_size=64 if CUDA else 16,
                                 s2_local_blocks=2, s2_vert_stride=4)
        model = build_gpt(p, cfg, vocab_size=256, max_sequence_length=n).to(DEVICE, dtype)
        ids = torch.randint(0, 256, (2, n), device=DEVICE)
        pos = torch.arange(n, device=DEVICE)[None].expand(2, -1)

        def step(check=contextlib.nullcontext):
            with cp.step_checks():   # deferred data checks: one read at the exit of the step
                with check():
                    loss = model(ids, pos, None, labels=ids).float().mean()
                    loss.backward()
            return loss.detach()

        for _ in range(2):   # warm-up: Triton compilation, plan and index caches, agreed signatures
            step()
        model.zero_grad(set_to_none=True)
        loss = step(_no_host_sync)
        assert torch.isfinite(loss).all()
        grads = [q.grad for q in model.parameters() if q.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_packed_documents_step_has_no_host_sync():
    # packed THD documents (a fresh cu_seqlens every step, as a data loader gives): RoPE positions,
    # S2 / flash tile plans and Lightning's varlen chunk plan are built from it once per step
    from megatron.core.packed_seq_params import PackedSeqParams

    from seqpar import cp
    from seqpar.kernels._common import host_ints
    from seqpar.models import build_gpt, preset, transformer_config

    n = seq(4096)
    bounds = [0, n // 4 + 3, n // 2 + 17, n]   # documents not aligned to tiles or chunks
    with _one_rank_parallel():
        p = replace(preset("tiny"), pattern="ASL")
        cfg = transformer_config(p, params_dtype=torch.bfloat16, bf16=True, s2_block_size=64 if CUDA else 16,
                                 s2_local_blocks=2, s2_vert_stride=4)
        model = build_gpt(p, cfg, vocab_size=256, max_sequence_length=n).to(DEVICE, torch.bfloat16)
        ids = torch.randint(0, 256, (1, n), device=DEVICE)
        pos = torch.arange(n, device=DEVICE)[None]

        def step(check=contextlib.nullcontext):
            cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)   # this step's batch
            host_ints(cu)   # the step's one read of its document boundaries
            psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                  max_seqlen_q=n // 2, max_seqlen_kv=n // 2)
            with cp.step_checks():
                with check():
                    loss = model(ids, pos, None, labels=ids, packed_seq_params=psp).float().mean()
                    loss.backward()
            return loss.detach()

        for _ in range(2):
            step()
        model.zero_grad(set_to_none=True)
        assert torch.isfinite(step(_no_host_sync)).all()


def test_lightning_varlen_plan_has_no_host_sync():
    # the kernel alone: two "layers" of varlen Lightning on one cu_seqlens, forward + backward
    from seqpar.kernels import lightning_attention, lightning_slopes
    from seqpar.kernels._common import host_ints

    n = seq(8192)
    q, k, v = (torch.randn(1, n, h, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2))
    slope = lightning_slopes(4).to(DEVICE)

    def call(cu):
        o1, _ = lightning_attention(q, k, v, slope, cu_seqlens=cu, backend="triton")
        o2, _ = lightning_attention(q, k, v, slope, cu_seqlens=cu, backend="triton")
        (o1.float().sum() + o2.float().sum()).backward()

    bounds = [0, n // 3 + 5, n // 3 + 6, n]   # a one-token document, none chunk-aligned
    call(torch.tensor(bounds, dtype=torch.int32, device=DEVICE))   # warm-up: compilation
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)    # a fresh tensor: its plan is new
    host_ints(cu)
    from seqpar import cp
    with cp.step_checks():   # the slope check is deferred to the step's end
        with _no_host_sync():
            call(cu)
