"""Both engines' steady-state step, as the one loop runs it, makes no host sync per layer.

The loop hands every engine a ``StepContext`` whose ``forward_backward()`` opens ``cp.step_checks()``
around the step's forward + backward. Counted with ``cp.count_host_syncs`` (every host read and
host-to-device copy, by any code: seqpar, megatron-core, DeepSpeed, autograd) inside that context,
on 2 gloo ranks (tiny hybrid ASLH at CP=2): a steady-state step of the Megatron engine and of the
DeepSpeed engine (ZeRO-2, 2 micro-batches, its optimizer step included) with 8 layers makes exactly
the host reads and copies of one with 4 layers (none per layer; the per-step ones are the engines'
loss / grad-norm reads and the step's one agreed data check). The same holds for a step of packed
documents (document masking: THD ``PackedSeqParams``, ``cp.make_partition``, RoPE from ``cu_seqlens``):
its boundaries are read on the host before the batch is copied, so they cost no read per layer either.
The control: the same DeepSpeed forward + backward without the context reads at least once per layer
call (every call's handshake).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Iterator

from cp_harness import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVR = ["model.preset=tiny-hybrid", "parallel.context_parallel=2", "data.dataset=mqar", "data.seq_len=64",
       "data.global_batch=4", "data.vocab_size=64", "data.mqar_pairs=4", "data.mqar_queries=4",
       "train.steps=4", "optim.warmup_steps=1", "train.progress=false", "parallel.backend=torch",
       "train.time_attention=false"]
LAYERS = (4, 8)  # ASLH once and twice: every layer is a CP attention layer
DOCS = ((23, 41), (64,), (7, 30, 27), (40, 24))  # per row of the global batch: packed document lengths


def _packed(batch, device):
    """``batch`` (on the host) with the rows cut into the documents of DOCS (this DP rank holds them all)."""
    import torch

    from seqpar.train.engine import Batch

    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCS[:batch.tokens.shape[0]]])
    return Batch(batch.tokens.cpu(), batch.labels.cpu(), batch.loss_mask.cpu(), pos).to(device)


def _job(rank: int, world: int) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from megatron.core import parallel_state

    from seqpar import cp
    from seqpar.megatron import disable_cpu_compat, init_parallel
    from seqpar.train.config import load_recipe
    from seqpar.train.engine import Batch, StepContext, engine_class
    from seqpar.train.loop import _batch, build_data

    class Counted(StepContext):
        """The loop's context, counting what happens inside it."""

        @contextlib.contextmanager
        def forward_backward(self) -> Iterator[None]:
            with cp.count_host_syncs() as n:
                with super().forward_backward():
                    yield
            self.count = (n.reads, n.copies, list(n.sites))

    out = {}
    try:
        for name, extra in (("megatron", []),
                            ("deepspeed", ["train.engine=deepspeed", "deepspeed.zero_stage=2", "data.micro_batch=2"])):
            for layers in LAYERS:
                cfg = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml",
                                  OVR + extra + [f"model.num_layers={layers}"])
                init_parallel(1, 2, seed=cfg.train.seed)
                data, vocab = build_data(cfg)
                engine = engine_class(name).build(cfg, vocab)
                engine.train()
                for step in range(2):  # step 0 agrees the call signatures; step 1 is steady state
                    ctx = Counted(step)
                    res = engine.train_step(Batch(*_batch(data, step, cfg, engine.device)), ctx)
                    assert res.tokens > 0 and res.loss > 0 and res.lr > 0
                out[(name, layers)] = ctx.count
                for step in range(2, 4):  # packed documents: step 2 agrees their signatures, step 3 is counted
                    ctx = Counted(step)
                    batch = _packed(_batch(data, step, cfg, engine.device), engine.device)
                    assert len(batch.cu_seqlens()[0]) > batch.tokens.shape[0] + 1  # several documents per row
                    res = engine.train_step(batch, ctx)
                    assert res.tokens > 0 and res.loss > 0
                out[(name, layers, "packed")] = ctx.count
                if name == "deepspeed" and layers == LAYERS[0]:  # control: the step without the loop's context
                    from seqpar.deepspeed.engine import forward_backward
                    from seqpar.train.runtime import micro_batches

                    batch = Batch(*_batch(data, 3, cfg, engine.device))
                    with cp.count_host_syncs() as n:
                        forward_backward(engine.engine, micro_batches(batch, engine.micro))
                    out["deepspeed_without_context"] = n.reads
                engine.close()
                parallel_state.destroy_model_parallel()
    finally:
        disable_cpu_compat()
    return out


def test_steady_state_step_of_both_engines_makes_no_host_sync_per_layer():
    for per_rank in run_ranks(_job, 2, timeout=900):
        for key in [(name, *packed) for name in ("megatron", "deepspeed") for packed in ((), ("packed",))]:
            short, long = per_rank[(key[0], LAYERS[0], *key[1:])], per_rank[(key[0], LAYERS[1], *key[1:])]
            assert short[:2] == long[:2], (key, short[2], long[2])  # twice the layers, the same syncs
            checks = [s for s in long[2] if "seqpar/cp/validation.py" in s]
            assert len(checks) == 1, (key, long[2])  # the step's one deferred data check
        # without cp.step_checks every CP layer call handshakes (2 micro-batches x 4 layers)
        assert per_rank["deepspeed_without_context"] >= 2 * LAYERS[0], per_rank["deepspeed_without_context"]
