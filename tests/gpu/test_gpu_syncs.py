"""Host syncs in a steady-state step: none per layer (issue 10, item 5), checked by CUDA itself.

``torch.cuda.set_sync_debug_mode("error")`` turns every device-to-host synchronisation (``.item()``,
``.tolist()``, ``.cpu()``, blocking copies, ``nonzero``...) into a RuntimeError, so the forward and
backward of a model with every attention kind must run inside it after a warm-up step (caches of
tile plans and index tensors are filled by then). As in the trainer, the step runs inside
``cp.step_checks()``, whose one read of the deferred data checks happens at its exit, after the
checked region. The optimizer step is outside: megatron-core's grad-norm clipping reads the norm
on the host once per step by design. The CPU dry run counts seqpar's own host reads with
``cp.count_host_syncs`` instead (0 expected as well).
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
    if not CUDA:   # dry run: seqpar's own host reads, counted by patching torch.Tensor
        from seqpar import cp

        with cp.count_host_syncs() as n:
            yield
        assert n.total == 0, list(n.sites)
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


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
