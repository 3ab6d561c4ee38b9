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
    assert ds["zero_optimization"] == {"stage": 3, "reduce_scatter": True, "offload_optimizer": {"device": "cpu"}}
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


def test_zero3_pins_reduce_scatter(tmp_path):
    """ZeRO-3's loss scale (seqpar.deepspeed.engine.grad_divisor) undoes the averaging of its reduce-scatter
    path: a user JSON that turns it off is refused, naming the reason."""
    from seqpar.deepspeed import build_ds_config

    assert build_ds_config(_cfg("deepspeed.zero_stage=3"), 1)["zero_optimization"]["reduce_scatter"] is True
    assert "reduce_scatter" not in build_ds_config(_cfg("deepspeed.zero_stage=2"), 1)["zero_optimization"]
    path = _user(tmp_path, {"zero_optimization": {"reduce_scatter": False}})
    with pytest.raises(ConfigError,
                       match=r"zero_optimization\.reduce_scatter=false .*deepspeed\.zero_stage=3.*grad_divisor"):
        build_ds_config(_cfg("deepspeed.zero_stage=3", f"deepspeed.config={path}"), 1)


# --dry-run of the DeepSpeed engine: (overrides of tiny_hybrid_zero2_cp2 (CP=2), world, user ds_config JSON or
# None) -> the stage that would run, N = DP x CP and (parameter, gradient, device optimizer state, offloaded)
# bytes per parameter per rank (README's ZeRO table; fp32: seqpar.train.memory's table)
DRY_RUNS = [
    (["deepspeed.zero_stage=0"], 2, None, 0, 2, (4, 4, 8, 0)),
    (["deepspeed.zero_stage=1"], 4, None, 1, 4, (4, 4, 3, 0)),  # fp32 ZeRO-1/2 clone the fp32 master
    (["deepspeed.zero_stage=2"], 2, None, 2, 2, (4, 2, 6, 0)),
    (["deepspeed.zero_stage=3"], 2, None, 3, 2, (2, 2, 4, 0)),  # fp32 ZeRO-3: the partition is the master
    (["deepspeed.zero_stage=0", "model.dtype=bf16"], 2, None, 0, 2, (2, 2, 12, 0)),  # README: 16
    (["deepspeed.zero_stage=1", "model.dtype=bf16"], 8, None, 1, 8, (2, 2, 1.5, 0)),  # 4 + 12/N
    (["deepspeed.zero_stage=2", "model.dtype=bf16"], 4, None, 2, 4, (2, 0.5, 3, 0)),  # 2 + 14/N
    (["deepspeed.zero_stage=3", "model.dtype=bf16"], 8, None, 3, 8, (0.25, 0.25, 1.5, 0)),  # 16/N
    (["deepspeed.zero_stage=2", "model.dtype=bf16", "deepspeed.offload_optimizer=cpu"], 2, None, 2, 2,
     (2, 1, 0, 6)),  # 2 + 2/N on the device
    (["deepspeed.zero_stage=3", "model.dtype=bf16", "deepspeed.offload_optimizer=cpu"], 4,
     {"zero_optimization": {"offload_param": {"device": "cpu"}}}, 3, 4, (0, 0.5, 0, 3.5)),
    (["deepspeed.zero_stage=3", "model.dtype=bf16", "parallel.context_parallel=1", "parallel.tensor_parallel=2",
      "model.pattern=ASL", "model.s2_vert_stride=2"], 4, None, 3, 2, (1, 1, 6, 0)),  # N = DP x CP, never TP
]


@pytest.mark.parametrize("overrides,world,user,stage,n,expect", DRY_RUNS)
def test_dry_run_reports_the_zero_stage_and_its_bytes(tmp_path, capsys, overrides, world, user, stage, n, expect):
    from seqpar.train.cli import dry_run
    from seqpar.train.memory import zero_bytes_per_param

    extra = [f"deepspeed.config={_user(tmp_path, user)}"] if user else []
    rep = dry_run(_cfg(*overrides, *extra), world)
    out = capsys.readouterr().out
    assert (rep["engine"], rep["zero_stage"], rep["zero_ranks"]) == ("deepspeed", stage, n)
    b = rep["bytes_per_param"]
    assert (b["param"], b["grad"], b["optimizer"], b["offloaded"]) == pytest.approx(expect)
    assert b["total"] == pytest.approx(sum(expect[:3]))
    assert tuple(zero_bytes_per_param(stage, "model.dtype=bf16" in overrides, n,
                                      offload_optimizer="deepspeed.offload_optimizer=cpu" in overrides,
                                      offload_param=user is not None)) == pytest.approx(expect)
    for s in rep["shards"]:
        p = s["params"]
        assert p == s["params_closed_form"] > 0
        assert (s["param_bytes"], s["grad_bytes"], s["optimizer_bytes"], s["offloaded_bytes"]) == tuple(
            round(p * x) for x in expect)
    assert rep["max_rank_bytes"] == max(s["total_bytes"] for s in rep["shards"])
    line = next(x for x in out.splitlines() if x.startswith("layout "))
    assert f"engine deepspeed ZeRO-{stage} (" in line and "distributed optimizer" not in line
    assert ("offloaded (cpu)" in line) == (expect[3] > 0)


def test_dry_run_megatron_engine_line(capsys):
    """The Megatron engine's dry run says so (and whether its distributed optimizer runs)."""
    from seqpar.train.cli import dry_run

    rep = dry_run(_cfg("train.engine=megatron", "model.dtype=bf16"), 4)
    assert (rep["engine"], rep["zero_stage"], rep["distributed_optimizer"]) == ("megatron", None, True)
    assert rep["bytes_per_param"] == {"param": 2, "grad": 4, "optimizer": 12 / 4, "offloaded": 0, "total": 9.0}
    assert "engine megatron, distributed optimizer: True" in capsys.readouterr().out


def test_readme_zero_table_is_the_closed_form():
    """README's "Which engine" table (bf16, N = DP x CP) evaluates to seqpar.train.memory's closed form."""
    import re

    from seqpar.train.memory import zero_bytes_per_param

    text = (ROOT / "README.md").read_text()
    rows = {int(m[1]): [c.strip() for c in m[2].split("|")]
            for m in re.finditer(r"^\| DeepSpeed ZeRO-(\d) \|(.*)\|$", text, re.M)}
    assert sorted(rows) == [0, 1, 2, 3]
    def ev(cell: str, n: int) -> float:
        assert re.fullmatch(r"[\d\sN+/]+", cell), cell  # plain arithmetic in N only
        return eval(cell.replace("N", str(n)), {"__builtins__": {}})

    for stage, cells in rows.items():
        for n in (2, 8):
            p, g, o, _ = zero_bytes_per_param(stage, True, n)
            assert [ev(c, n) for c in cells] == pytest.approx([p, g, o, p + g + o]), (stage, cells)
    off = re.search(r"^\| ZeRO 1-3 \+ `offload_optimizer: cpu` \|.*\| ([^|]*) \(ZeRO-2\) \|$", text, re.M)
    for n in (2, 8):
        p, g, o, host = zero_bytes_per_param(2, True, n, offload_optimizer=True)
        assert ev(off[1], n) == pytest.approx(p + g + o) and o == 0 and host == pytest.approx(12 / n)


def test_schedule_restores_the_step_and_follows_the_resuming_recipe():
    """The DeepSpeed engine's client LR schedule (seqpar.deepspeed.engine.Schedule) on a resume: DeepSpeed's
    load calls load_state_dict (megatron's would add the saved count to the current one: one step ahead),
    then ZeRO restores the optimizer's param groups (the checkpoint's LR), then train() calls at_step. The
    LR of every later step is the uninterrupted schedule's; with a raised train.steps, the new recipe's
    (as the Megatron engine: a fresh build_scheduler stepped to the resumed step)."""
    import torch

    from seqpar.deepspeed.engine import Schedule
    from seqpar.train.runtime import build_scheduler

    def opt():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)

    def megatron_lr(cfg, step: int) -> float:  # the Megatron engine's LR of optimizer step `step`
        sched = build_scheduler(cfg, opt())
        sched.step(step + 1)
        return sched.optimizer.param_groups[0]["lr"]

    cfg = _cfg("train.steps=12", "optim.warmup_steps=3")
    run = Schedule(cfg, opt())
    full = []
    for _ in range(12):
        full.append(run.get_lr()[0])
        run.step()
    assert full == [megatron_lr(cfg, k) for k in range(12)] and len(set(full)) == 12
    first = Schedule(cfg, opt())
    for _ in range(5):
        first.step()
    saved = first.state_dict()
    for new, want in ((cfg, full), (_cfg("train.steps=24", "optim.warmup_steps=3"), None)):
        resumed = Schedule(new, opt())
        resumed.load_state_dict(saved)  # DeepSpeed's load_checkpoint
        resumed.sched.optimizer.param_groups[0]["lr"] = 123.0  # ZeRO's optimizer load: the checkpoint's groups
        resumed.at_step(5)  # train(): the resumed step
        got = []
        for _ in range(7):
            got.append(resumed.get_lr()[0])
            resumed.step()
        assert got == (want[5:] if want else [megatron_lr(new, k) for k in range(5, 12)]), got
    assert got != full[5:]  # the longer run's cosine is really another one
