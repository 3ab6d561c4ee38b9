"""The real `deepspeed` launcher through launchers/deepspeed.sh runs the DeepSpeed recipe end to end on
2 CPU ranks (--module seqpar.train, --local_rank=N accepted): exit 0, the printed command, tensorboard
events, a verified checkpoint. The wrapper's command lines (single host, hostfile, per-node) are checked
with DEEPSPEED=echo."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_hybrid_zero2_cp2.yaml"


def _launch(args: list[str], tmp: pathlib.Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, SEQPAR_CACHE=str(tmp / "cache"), NPROC="2", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", **env_extra)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(ROOT / "launchers" / "deepspeed.sh"), str(RECIPE), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=500)


def test_wrapper_command_lines(tmp_path):
    # CHECK=0: the recipe pre-flight (a Python start per call) is tested in tests/test_launchers.py
    res = _launch(["--dry-run", "--set", "train.steps=2"], tmp_path, DEEPSPEED="echo", CHECK="0")
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.splitlines()[0]
    assert cmd.startswith("+ echo --num_nodes 1 --num_gpus 2 --no_ssh_check --master_addr 127.0.0.1 --master_port ")
    assert cmd.endswith(f"--module seqpar.train {RECIPE} --dry-run --set train.steps=2")
    res = _launch([], tmp_path, DEEPSPEED="echo", HOSTFILE="hosts", MASTER_ADDR="10.0.0.1", NODE_RANK="1", CHECK="0")
    assert "--hostfile hosts --master_addr 10.0.0.1 --master_port 29500 --no_ssh --node_rank 1 --module" in res.stdout
    res = _launch([], tmp_path, DEEPSPEED="echo", HOSTFILE="hosts", CHECK="0")
    assert res.returncode != 0 and "MASTER_ADDR" in res.stderr


def test_deepspeed_cli_runs_the_recipe(tmp_path):
    run = tmp_path / "run"
    res = _launch(["--set", f"train.out_dir={run}", "--set", "train.steps=4", "--set", "train.save_every=2",
                   "--set", "data.seq_len=64", "--set", "data.global_batch=4", "--set", "data.max_bytes=300000"],
                  tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.startswith("+ ") and "--module seqpar.train" in res.stdout.splitlines()[0]
    assert "--local_rank=0" in res.stdout + res.stderr  # what the launcher passed to the trainer
    assert "ZeRO-2, steps 0->4" in res.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/aux_loss"} <= set(ea.Tags()["scalars"])
    assert len(ea.Scalars("train/loss")) == 4
    ck = run / "checkpoints"
    assert (ck / "latest").read_text() == "step_0000004"
    from seqpar.deepspeed.checkpoint import verify

    assert verify(ck / "step_0000004")["zero_stage"] == 2


def test_deepspeed_cli_bad_ds_config_fails_fast(tmp_path):
    """A bad value in the user's ds_config, through the real launcher: every rank stops before any process
    group with one clear error naming the key and the file (no traceback), and the launcher exits non-zero."""
    import json
    import time

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": -5}}))
    run = tmp_path / "run"
    t0 = time.monotonic()
    res = _launch(["--set", f"deepspeed.config={bad}", "--set", f"train.out_dir={run}"], tmp_path)
    assert res.returncode != 0, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.stdout + res.stderr
    assert "invalid recipe" in err and "reduce_bucket_size" in err and str(bad) in err and "greater than 0" in err
    assert "Traceback" not in err
    assert not run.exists()  # nothing started
    assert time.monotonic() - t0 < 120
