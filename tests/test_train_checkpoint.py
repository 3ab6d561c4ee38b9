"""dist_checkpointing checkpoints across parallel layouts: a checkpoint written by 2 ranks at TP=2
loads on 1 rank at TP=1 (model, AdamW moments, step) and training continues with the losses of the
uninterrupted TP=2 run; one written by the distributed optimizer at DP=2 resumes at DP=1 x PP=2; the Lightning layer's own TP-sharded parameter (``norm_weight``) is written
as a shard of its global tensor; a leftover temp folder from a crashed save is ignored."""

from __future__ import annotations

import pathlib

from cp_harness import run_ranks

# A (softmax), S (s2), L (lightning): the kinds that run at TP=2 (MoH needs TP=1)
OVR = ["model.preset=tiny", "model.pattern=ASL", "data.dataset=mqar", "data.seq_len=32", "data.global_batch=2",
       "data.vocab_size=64", "data.mqar_pairs=4", "data.mqar_queries=4", "train.steps=4", "optim.warmup_steps=1",
       "train.progress=false", "parallel.backend=torch", "parallel.context_parallel=1"]


def _cfg(out: str, tp: int):
    from seqpar.train.config import load_recipe

    root = pathlib.Path(__file__).resolve().parents[1]
    return load_recipe(root / "recipes" / "tiny_hybrid_cp2.yaml",
                       OVR + [f"train.out_dir={out}", f"parallel.tensor_parallel={tp}"])


def _norm_weight_entries(cfg) -> list[tuple]:
    from megatron.core import parallel_state

    from seqpar.megatron import init_parallel
    from seqpar.train.loop import build_model

    init_parallel(cfg.parallel.tensor_parallel, 1, seed=cfg.train.seed)
    model = build_model(cfg, cfg.data.vocab_size)[0]
    sd = model.sharded_state_dict(metadata={"non_homogeneous_layers": True})
    out = [(k, v.local_shape, v.global_shape, v.global_offset) for k, v in sd.items() if k.endswith("norm_weight")]
    parallel_state.destroy_model_parallel()
    return out


def _tp2(rank: int, world: int, out_full: str, out_part: str):
    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.loop import train

    entries = _norm_weight_entries(_cfg(out_full, 2))
    full = train(_cfg(out_full, 2))
    part = train(_cfg(out_part, 2), stop_after=2)
    disable_cpu_compat()
    return entries, full, part


def _tp1(rank: int, world: int, out: str):
    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.loop import train

    losses = train(_cfg(out, 1), resume=True)
    disable_cpu_compat()
    return losses


def test_tp2_checkpoint_resumes_at_tp1(tmp_path):
    res = run_ranks(_tp2, 2, str(tmp_path / "full"), str(tmp_path / "part"), timeout=300)
    entries, full, part = res[0]
    # the L layer (index 2) owns norm_weight [heads*dim] = [64], split over the 2 TP ranks
    for rank in range(2):
        assert res[rank][0] == [("decoder.layers.2.self_attention.norm_weight", (32,), (64,), (32 * rank,))]
    assert part == full[:2]
    ck = tmp_path / "part" / "checkpoints"
    (ck / ".tmp_step_0000003").mkdir()  # a save that crashed before its rename: never read
    resumed = run_ranks(_tp1, 1, str(tmp_path / "part"), timeout=300)[0]
    assert len(resumed) == 2
    # same parameters and optimizer state, only the TP reduction order differs
    for a, b in zip(resumed, full[2:]):
        assert abs(a - b) <= 1e-5 * abs(b), (resumed, full)
    assert (ck / "latest").read_text() == "step_0000004"


def _dp2(rank: int, world: int, out_full: str, out_part: str):
    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.loop import train

    full = train(_cfg(out_full, 1))  # DP=2: distributed optimizer (auto), state sharded over the 2 ranks
    part = train(_cfg(out_part, 1), stop_after=2)
    disable_cpu_compat()
    return full, part


def _pp2(rank: int, world: int, out: str):
    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import train

    cfg = load_recipe(pathlib.Path(__file__).resolve().parents[1] / "recipes" / "tiny_hybrid_cp2.yaml",
                      OVR + [f"train.out_dir={out}", "parallel.pipeline_parallel=2", "optim.distributed=true"])
    losses = train(cfg, resume=True)
    disable_cpu_compat()
    return losses


def test_dp2_distributed_optimizer_checkpoint_resumes_at_pp2_dp1(tmp_path):
    # written by the distributed optimizer with its state sharded over DP=2, read back at DP=1 with two
    # pipeline stages (every layer and its optimizer state moves to another rank and shard size)
    full, part = run_ranks(_dp2, 2, str(tmp_path / "full"), str(tmp_path / "part"), timeout=300)[0]
    assert part == full[:2]
    resumed = run_ranks(_pp2, 2, str(tmp_path / "part"), timeout=300)
    for losses in resumed:  # every stage reports the last stage's loss
        assert len(losses) == 2
        for a, b in zip(losses, full[2:]):
            assert abs(a - b) <= 1e-5 * abs(b), (losses, full)
