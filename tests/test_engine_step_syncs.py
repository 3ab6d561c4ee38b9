"""Both engines' steady-state step, as the one loop runs it, makes no host sync per CP attention layer.

The loop hands every engine a ``StepContext`` whose ``forward_backward()`` opens ``cp.step_checks()``
around the step's forward + backward. Counted with ``cp.count_host_syncs`` over seqpar's CP, kernel
entry, megatron-layer and nn code, inside that context (the optimizer update after it is megatron's
and DeepSpeed's own code), on 2 gloo ranks (tiny hybrid ASLH at CP=2, one CP attention layer of each
kind): a steady-state step of the Megatron engine and of the DeepSpeed engine (ZeRO-2, 2
micro-batches) makes exactly the step's one agreed data check. The control: the same DeepSpeed
forward + backward without the context reads at least once per layer call (every call's handshake).
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
LAYERS = 4  # ASLH: every layer is a CP attention layer


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
            with cp.count_host_syncs(also=("megatron", "nn")) as n:
                with super().forward_backward():
                    yield
            self.count = (n.total, list(n.sites))

    out = {}
    try:
        for name, extra in (("megatron", []),
                            ("deepspeed", ["train.engine=deepspeed", "deepspeed.zero_stage=2", "data.micro_batch=2"])):
            cfg = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", OVR + extra)
            init_parallel(1, 2, seed=cfg.train.seed)
            data, vocab = build_data(cfg)
            engine = engine_class(name).build(cfg, vocab)
            engine.train()
            counts = []
            for step in range(3):  # step 0 agrees the call signatures; 1 and 2 are steady state
                ctx = Counted(step)
                res = engine.train_step(Batch(*_batch(data, step, cfg, engine.device)), ctx)
                counts.append(ctx.count)
                assert res.tokens > 0 and res.loss > 0 and res.lr > 0
            out[name] = counts
            if name == "deepspeed":  # control: the same step without the loop's context
                from seqpar.deepspeed.engine import forward_backward
                from seqpar.train.runtime import micro_batches

                batch = Batch(*_batch(data, 3, cfg, engine.device))
                with cp.count_host_syncs(also=("megatron", "nn")) as n:
                    forward_backward(engine.engine, micro_batches(batch, engine.micro))
                out["deepspeed_without_context"] = n.total
            engine.close()
            parallel_state.destroy_model_parallel()
    finally:
        disable_cpu_compat()
    return out


def test_steady_state_step_of_both_engines_makes_one_host_sync():
    for per_rank in run_ranks(_job, 2, timeout=600):
        for name in ("megatron", "deepspeed"):
            for total, sites in per_rank[name][1:]:
                assert total == 1, (name, sites)  # the step's one deferred data check, none per layer
        # without cp.step_checks every CP layer call handshakes (2 micro-batches x LAYERS layers)
        assert per_rank["deepspeed_without_context"] >= 2 * LAYERS, per_rank["deepspeed_without_context"]
