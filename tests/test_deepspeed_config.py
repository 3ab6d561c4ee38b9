"""The ds_config built from a recipe, the user-JSON merge (conflicts name both places), DeepSpeed's own
validation surfacing as one clear error, refused combinations, the recipe fields, and the CLI's
--local_rank and fail-fast on a bad ds_config (exit 2 before any process group). No process group."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from seqpar.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_hybrid_zero2_cp2.yaml"


@pytest.fixture(autouse=True)
def _cpu_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def _cfg(*overrides: str):
    from seqpar.train.config import load_recipe

    return load_recipe(RECIPE, list(overrides))


def _user(tmp_path, tree) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(tree))
    return str(path)


def test_recipe_maps_to_ds_config():
    from seqpar.deepspeed import build_ds_config

    ds = build_ds_config(_cfg("optim.grad_clip=0.5", "optim.weight_decay=0.05", "data.global_batch=8"), 2)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    opt = ds["optimizer"]
    assert opt["type"] == "AdamW"
    assert opt["params"] == {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.05, "torch_adam": True}
    assert "scheduler" not in ds  # the recipe's lr_at is the client scheduler
    ds = build_ds_config(_cfg("data.micro_batch=1", "model.dtype=bf16", "deepspeed.zero_stage=3",
                              "optim.weight_decay=0", "deepspeed.offload_optimizer=cpu"), 2)
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert ds["zero_force_ds_cpu_optimizer"] is False


def test_user_json_adds_keys_and_conflicts_name_both(tmp_path):
    from seqpar.deepspeed import build_ds_config

    path = _user(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000000}, "wall_clock_breakdown": False})
    ds = build_ds_config(_cfg(f"deepspeed.config={path}"), 1)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000000}  # equal values agree
    assert ds["wall_clock_breakdown"] is False
    path = _user(tmp_path, {"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError) as e:
        build_ds_config(_cfg(f"deepspeed.config={path}"), 1)
    msg = str(e.value)
    assert "zero_optimization.stage=3" in msg and "deepspeed.zero_stage" in msg and "zero_optimization.stage=2" in msg
    assert path in msg
    path = _user(tmp_path, {"optimizer": {"params": {"lr": 1.0}}})
    with pytest.raises(ConfigError, match=r"optimizer\.params\.lr=1\.0 .*optim\.lr"):
        build_ds_config(_cfg(f"deepspeed.config={path}"), 1)
    path = _user(tmp_path, {"scheduler": {"type": "WarmupLR"}})
    with pytest.raises(ConfigError, match="LR schedule comes from the recipe"):
        build_ds_config(_cfg(f"deepspeed.config={path}"), 1)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_ds_config(_cfg(f"deepspeed.config={tmp_path / 'broken.json'}"), 1)


def test_bad_ds_config_value_is_one_clear_error(tmp_path):
    from seqpar.deepspeed import build_ds_config

    path = _user(tmp_path, {"zero_optimization": {"reduce_bucket_size": -5}})
    with pytest.raises(ConfigError) as e:
        build_ds_config(_cfg(f"deepspeed.config={path}"), 1)
    msg = str(e.value)
    assert path in msg and "reduce_bucket_size" in msg and "greater than 0" in msg
    path = _user(tmp_path, {"zero_optimization": {"overlap_comm": "maybe"}})
    with pytest.raises(ConfigError, match="overlap_comm"):
        build_ds_config(_cfg(f"deepspeed.config={path}"), 1)


def test_refused_combinations_and_recipe_fields(tmp_path):
    from seqpar.deepspeed import build_ds_config
    from seqpar.train.config import RecipeError

    # ZeRO-3 with weight decay is supported (tests/test_deepspeed_engine.py compares its losses)
    ds = build_ds_config(_cfg("deepspeed.zero_stage=3", "optim.weight_decay=0.1"), 1)
    assert ds["optimizer"]["params"]["weight_decay"] == 0.1 and ds["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match=r"parallel\.pipeline_parallel=2 is not supported with train\.engine='deepspeed'"):
        build_ds_config(_cfg("parallel.pipeline_parallel=2"), 1)
    with pytest.raises(ConfigError, match="train.skip_nonfinite_steps"):
        build_ds_config(_cfg("train.skip_nonfinite_steps=2"), 1)
    with pytest.raises(ConfigError, match="data.micro_batch"):
        build_ds_config(_cfg("data.micro_batch=3"), 1)
    for bad, field in [("train.engine=torch", "train.engine"), ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
                       ("deepspeed.offload_optimizer=nvme", "deepspeed.offload_optimizer"),
                       (f"deepspeed.config={tmp_path / 'missing.json'}", "deepspeed.config")]:
        with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
            _cfg(bad)
    with pytest.raises(RecipeError, match="zero_stage >= 1"):
        _cfg("deepspeed.zero_stage=0", "deepspeed.offload_optimizer=cpu")


def test_pipeline_parallel_refused_before_any_process_group(tmp_path):
    """PP > 1 with the DeepSpeed engine: one ConfigError naming the field, raised by train() itself (the
    engine's check) before it makes a process group (the CLI checks the same before its own, see below)."""
    import torch.distributed as dist

    from seqpar.train.loop import train

    cfg = _cfg("parallel.pipeline_parallel=2", f"train.out_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=r"parallel\.pipeline_parallel=2 .*set parallel\.pipeline_parallel=1"):
        train(cfg)
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


def test_cli_accepts_local_rank():
    from seqpar.train.cli import parse_args

    args = parse_args(["--local_rank=3", str(RECIPE), "--set", "train.steps=2"])
    assert args.local_rank == 3 and args.recipe == str(RECIPE) and args.overrides == ["train.steps=2"]
    assert parse_args([str(RECIPE)]).local_rank is None


def test_cli_bad_ds_config_fails_fast(tmp_path):
    path = _user(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": -5}})
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR")}
    env.update(DS_ACCELERATOR="cpu", WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")  # as a launched rank 0 sees it
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "seqpar.train", "--local_rank=0", str(RECIPE), "--set",
                          f"deepspeed.config={path}", "--set", f"train.out_dir={tmp_path / 'run'}"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "reduce_bucket_size" in res.stderr and path in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()  # nothing started
    assert time.monotonic() - t0 < 60
