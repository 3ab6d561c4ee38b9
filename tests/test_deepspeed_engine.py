"""The DeepSpeed engine against the Megatron engine on the same seed and batches (fp32, tiny hybrid ASLH,
5 steps, 1e-5 relative, weight decay 4.0 in every run):

- CP=2 on 2 gloo ranks: ZeRO 0, 1, 2, 3; ZeRO-3 with the optimizer offloaded to the host; ZeRO-2 with
  2 micro-batches of gradient accumulation (MoH load-balance loss off there: it is a function of each
  micro-batch's routing, so accumulation changes it in either engine); resume exactness (stop after
  3 steps + resume) under ZeRO-2 and ZeRO-3; the consolidated fp32 state dict of the ZeRO checkpoints. The weight decay is visible in the losses (a
  run at weight decay 0 differs), so ZeRO-3's decayed / no-decay groups are really checked.
- CP=2 x DP=2 on 4 ranks, where ZeRO really shards: ZeRO 0, 1, 2, 3; DeepSpeed's groups are ours (DP,
  TP as model parallel, ZeRO parameters and optimizer over DP x CP: 4 ranks; at TP=2 x CP=2 the ZeRO
  group is the 2 CP ranks of one TP rank, never TP); the ZeRO-2 checkpoint of step 3 resumes at DP=1
  (2 ranks) with the losses of the uninterrupted DP=2 run (MoH load-balance loss off there).
"""

from __future__ import annotations

import os
import pathlib

import pytest

from cp_harness import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVR = ["model.preset=tiny-hybrid", "parallel.context_parallel=2", "data.dataset=mqar", "data.seq_len=64",
       "data.global_batch=4", "data.vocab_size=64", "data.mqar_pairs=4",
       "data.mqar_queries=4", "train.steps=5", "optim.warmup_steps=2", "train.progress=false",
       "parallel.backend=torch", "train.time_attention=false",
       # a weight decay large enough to move the 5-step losses far beyond the tolerance (see
       # test_weight_decay_is_visible_in_the_losses): a dropped or misgrouped decay cannot pass
       "optim.weight_decay=4.0"]
DS = ["train.engine=deepspeed"]
NO_AUX = ["model.moh_aux_loss_coef=0"]
NO_WD = ["optim.weight_decay=0"]  # a control: the weight decay must change the losses
RTOL = 1e-5


def _runs(rank: int, world: int, root: str, plans: list) -> dict:
    """Each plan: (name, overrides, [(resume, stop_after), ...]) -> the losses of every part."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import train

    out = {}
    for name, extra, parts in plans:
        cfg = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", OVR + [f"train.out_dir={root}/{name}"] + extra)
        out[name] = [train(cfg, resume=resume, stop_after=stop) for resume, stop in parts]
    disable_cpu_compat()
    return out


def _groups(rank: int, world: int, stage: int = 2, tp: int = 1) -> dict:
    """DeepSpeed's view of the process groups after deepspeed.initialize at TP=tp x CP=2 x DP=world/(2 tp)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from seqpar.deepspeed.config import build_ds_config
    from seqpar.deepspeed.engine import initialize
    from seqpar.megatron import destroy_parallel, disable_cpu_compat, init_parallel
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import build_model

    cfg = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml",
                      OVR + DS + [f"deepspeed.zero_stage={stage}", f"parallel.tensor_parallel={tp}"])
    init_parallel(tp, 2, seed=cfg.train.seed)
    engine = initialize(cfg, build_model(cfg, 64)[0], build_ds_config(cfg, world // (2 * tp)))
    ranks = dist.get_process_group_ranks
    res = {"dp": ranks(engine.data_parallel_group), "zero": ranks(engine.optimizer.dp_process_group),
           "ours_dp": ranks(ps.get_data_parallel_group()),
           "ours_dpcp": ranks(ps.get_data_parallel_group(with_context_parallel=True)),
           "ours_cp": ranks(ps.get_context_parallel_group()),
           "ours_tp": ranks(ps.get_tensor_model_parallel_group()),
           "dp_world": engine.dp_world_size, "mp_world": engine.mp_world_size,
           "micro": engine.train_micro_batch_size_per_gpu()}
    if stage == 3:  # the parameters themselves are partitioned over the same group
        p = next(engine.module.parameters())
        res["params"] = ranks(p.ds_process_group)
    # this rank's fp32 master partition vs the model (of this TP rank): the divisor of the sharded state
    flat = (engine.optimizer.fp32_partitioned_groups_flat if stage == 3 else engine.optimizer.single_partition_of_fp32_groups)
    res["fp32_numel"] = sum(t.numel() for t in flat)
    res["model_numel"] = sum(getattr(q, "ds_numel", q.numel()) for q in engine.module.parameters())
    engine.destroy()
    ps.destroy_model_parallel()
    disable_cpu_compat()
    return res


def _four(rank: int, world: int, root: str, plans: list) -> dict:
    out = {"rank": rank, "groups": [_groups(rank, world, 2), _groups(rank, world, 3)],
           "groups_tp2": [_groups(rank, world, 2, tp=2), _groups(rank, world, 3, tp=2)]}
    out.update(_runs(rank, world, root, plans))
    return out


def _close(a: list[float], b: list[float], min_len: int = 5) -> None:
    assert len(a) == len(b) >= min_len
    for x, y in zip(a, b):
        assert abs(x - y) <= RTOL * abs(y), (a, b)


@pytest.fixture(scope="module")
def cp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_cp2")
    full = [(False, None)]
    split = [(False, 3), (True, None)]
    plans = [("megatron", [], full), ("megatron_noaux", NO_AUX, full), ("megatron_nowd", NO_WD, full),
             ("zero0", DS + ["deepspeed.zero_stage=0"], full),
             ("zero1", DS + ["deepspeed.zero_stage=1"], full),
             ("zero2", DS + ["deepspeed.zero_stage=2"], split),
             # the load-balance loss is a function of each micro-batch's routing (not additive over
             # micro-batches), so accumulation is compared with it off
             ("zero2_gas", DS + ["deepspeed.zero_stage=2", "data.micro_batch=2"] + NO_AUX, full),
             ("zero3", DS + ["deepspeed.zero_stage=3"], split),
             # optimizer state on the host (torch AdamW steps the offloaded fp32 partition)
             ("zero3_offload", DS + ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu"], full)]
    res = run_ranks(_runs, 2, str(root), plans, timeout=900)
    return res, root


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero2_gas", "zero3", "zero3_offload"])
def test_cp2_zero_matches_megatron(cp2, name):
    res, _ = cp2
    ref = res[0]["megatron_noaux" if name == "zero2_gas" else "megatron"][0]
    assert res[1]["megatron"][0] == res[0]["megatron"][0]  # every rank reports the same global loss
    ours = [x for part in res[0][name] for x in part]
    _close(ours, ref)
    assert [x for part in res[1][name] for x in part] == ours
    assert ref[-1] < ref[0]


def test_weight_decay_is_visible_in_the_losses(cp2):
    """The equality tests above would not notice a dropped weight decay unless it changes the losses:
    at weight decay 0 the Megatron engine's losses differ well beyond the tolerance."""
    res, _ = cp2
    wd, nowd = res[0]["megatron"][0], res[0]["megatron_nowd"][0]
    assert max(abs(x - y) / abs(y) for x, y in zip(wd, nowd)) > 50 * RTOL, (wd, nowd)


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_resume_is_exact(cp2, name):
    res, root = cp2
    first, second = res[0][name]
    assert [len(first), len(second)] == [3, 2]
    _close(first + second, res[0]["megatron"][0])
    ck = root / name / "checkpoints"
    assert (ck / "latest").read_text() == "step_0000005"
    assert {p.name for p in ck.iterdir() if p.is_dir()} == {"step_0000003", "step_0000005"}  # no temp left
    files = {p.name for p in (ck / "step_0000005").iterdir()}
    assert {"manifest.json", "config.json", "rng"} <= files  # seqpar.train.integrity's manifest
    assert any(f.endswith("model_states.pt") for f in files)
    assert len([f for f in files if f.endswith("optim_states.pt")]) == 2  # ZeRO shards: one per DP x CP rank


def test_consolidated_fp32_state_dict(cp2):
    import torch

    from seqpar.deepspeed import consolidated_fp32_state_dict

    res, root = cp2
    for name in ("zero2", "zero3"):
        sd = consolidated_fp32_state_dict(root / name / "checkpoints")  # latest
        assert all(v.dtype == torch.float32 for v in sd.values())
        assert "embedding.word_embeddings.weight" in sd and "output_layer.weight" in sd
        assert sd["embedding.word_embeddings.weight"].shape == (64, 64)
        assert any(k.startswith("decoder.layers.3.self_attention.router") for k in sd)  # MoH layer
    sd0 = consolidated_fp32_state_dict(root / "zero0" / "checkpoints" / "step_0000005")
    assert set(sd0) >= set(sd)
    manifest = root / "zero2" / "checkpoints" / "step_0000005" / "mp_rank_00_model_states.pt"
    manifest.write_bytes(manifest.read_bytes() + b"x")  # tampered file: refused before DeepSpeed unpickles
    with pytest.raises(ValueError, match="corrupt: mp_rank_00_model_states.pt: grown"):
        consolidated_fp32_state_dict(root / "zero2" / "checkpoints")


def test_corrupt_latest_falls_back_to_the_newest_intact(cp2, tmp_path):
    """--resume with a corrupt newest checkpoint (train.on_corrupt_checkpoint=fallback, as the Megatron
    engine): a warning naming the file, then the newest intact one (step 3) resumes with the losses of the
    uninterrupted run."""
    import shutil

    res, root = cp2
    shutil.copytree(root / "zero2", tmp_path / "zero2")  # a copy: other tests read the fixture's folder
    bad = tmp_path / "zero2" / "checkpoints" / "step_0000005" / "mp_rank_00_model_states.pt"
    bad.write_bytes(b"x" + bad.read_bytes()[1:])
    resumed = run_ranks(_runs, 2, str(tmp_path), [("zero2", DS + ["deepspeed.zero_stage=2",
                                                                  "train.on_corrupt_checkpoint=fallback"],
                                                   [(True, 1)])], timeout=600)
    _close(resumed[0]["zero2"][0], [x for part in res[0]["zero2"] for x in part][3:4], min_len=1)
    assert (tmp_path / "zero2" / "checkpoints" / "latest").read_text() == "step_0000004"


def test_dp2_cp2_four_ranks(tmp_path):
    full = [(False, None)]
    # the DP=2 -> DP=1 resume runs without the MoH load-balance loss: it is a function of each DP rank's
    # routing, so the same global batch on one DP rank has another one (in either engine)
    plans = [("megatron", [], full)] + [(f"zero{z}", DS + [f"deepspeed.zero_stage={z}"], full) for z in (0, 1, 2, 3)] + [
        ("zero2_noaux", DS + ["deepspeed.zero_stage=2", "train.save_every=3"] + NO_AUX, full)]
    res = run_ranks(_four, 4, str(tmp_path), plans, timeout=900)
    ref = res[0]["megatron"][0]
    for name in ("zero0", "zero1", "zero2", "zero3"):
        _close(res[0][name][0], ref)
        assert all(res[r][name][0] == res[0][name][0] for r in range(4))
    for r in res:
        for g in r["groups"]:
            assert g["dp"] == g["ours_dp"] and len(g["dp"]) == 2  # DeepSpeed's DP group is our DP group
            assert g["zero"] == g["ours_dpcp"] and len(g["zero"]) == 4  # ZeRO shards / reduces over DP x CP
            assert g["dp_world"] == 2 and g["mp_world"] == 1 and g["micro"] == 2
            # each rank keeps 1/(DP x CP) = 1/4 of the fp32 master weights (up to DeepSpeed's alignment padding)
            assert 0 <= 4 * g["fp32_numel"] - g["model_numel"] < 4 * 64, (g["fp32_numel"], g["model_numel"])
        assert r["groups"][1]["params"] == r["groups"][1]["ours_dpcp"]  # ZeRO-3 parameter partitions too
        for g in r["groups_tp2"]:  # TP=2 x CP=2 x DP=1: ZeRO over the CP ranks of this TP rank, never TP
            assert g["zero"] == g["ours_dpcp"] == g["ours_cp"] and len(g["zero"]) == 2
            assert set(g["zero"]) & set(g["ours_tp"]) == {r["rank"]} and len(g["ours_tp"]) == 2
            assert g["dp"] == g["ours_dp"] and len(g["dp"]) == 1
            assert g["dp_world"] == 1 and g["mp_world"] == 2 and g["micro"] == 4
            assert 0 <= 2 * g["fp32_numel"] - g["model_numel"] < 2 * 64, (g["fp32_numel"], g["model_numel"])
        assert r["groups_tp2"][1]["params"] == r["groups_tp2"][1]["ours_cp"]
    # the DP=2 checkpoint of step 3 resumes at DP=1 (universal conversion) with the same losses
    ck = tmp_path / "zero2_noaux" / "checkpoints"
    (ck / "latest").write_text("step_0000003")
    resumed = run_ranks(_runs, 2, str(tmp_path), [("zero2_noaux", DS + ["deepspeed.zero_stage=2"] + NO_AUX,
                                                   [(True, None)])], timeout=600)
    _close(resumed[0]["zero2_noaux"][0], res[0]["zero2_noaux"][0][3:], min_len=2)
    assert (ck / "step_0000003.universal" / "zero").is_dir()
