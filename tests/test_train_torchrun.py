"""2-rank torchrun smoke run of the demo recipe (CP=2, all four kinds) through launchers/torchrun.sh:
a few steps, tensorboard events (each documented in README), the corpus summary, a checkpoint, a second
launch without --resume refused by the pre-flight (what `make demo` run twice does), and a --resume that
continues from it."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, SEQPAR_CACHE=str(tmp / "cache"), NPROC="2", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # CPU training runs the torch paths
    return subprocess.run(["bash", str(ROOT / "launchers" / "torchrun.sh"), str(ROOT / "recipes" / "tiny_hybrid_cp2.yaml"),
                           "--set", f"train.out_dir={tmp / 'run'}", "--set", "train.steps=6", "--set", "data.seq_len=64",
                           "--set", "data.global_batch=4", "--set", "data.max_bytes=300000", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def test_torchrun_two_ranks_demo_recipe(tmp_path):
    first = _run(["--set", "train.save_every=3"], tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "+ " in first.stdout and "--nproc-per-node 2" in first.stdout  # the launcher prints its command
    assert "tensorboard --logdir" in first.stdout
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text() == "step_0000006"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/aux_loss"} <= tags
    assert {f"attention_fwd_ms/{k}" for k in ("softmax", "s2", "lightning", "moh")} <= tags
    assert len(ea.Scalars("train/loss")) == 6
    # README's Monitoring section names every scalar the run logs (issue 21, item 14)
    readme = (ROOT / "README.md").read_text()
    assert not [t for t in tags if t.startswith("train/") and f"`{t}`" not in readme], sorted(tags)
    # megatron's known warnings (non-leaf .grad read of the distributed optimizer, deprecated collectives) are
    # filtered once (seqpar.known_warnings); CP=2 runs the distributed optimizer
    assert "not a leaf Tensor" not in first.stderr and "FutureWarning" not in first.stderr, first.stderr[-3000:]
    # the start-up line: model, parameter count (README quotes this one), layout
    assert "model tiny-hybrid, layers ASLH (4), hidden 64" in first.stdout and "218,112 parameters (0.22 M)" in \
        first.stdout, first.stdout[-3000:]
    assert "layout TP=1 x CP=2 x PP=1 x DP=1 = 2 rank(s), engine megatron" in first.stdout
    # own text is never cut silently: the corpus, what data.max_bytes lets in and what it leaves out
    assert "[seqpar.data] corpus: the Python standard library's" in first.stdout
    assert "data.max_bytes=300,000 leaves out" in first.stdout
    # `make demo` twice: the launcher's pre-flight stops the second run at once, one line, exit 2
    twice = _run([], tmp_path)
    assert twice.returncode == 2, twice.stdout[-3000:] + twice.stderr[-3000:]
    assert f"train.out_dir='{run}' already holds a run" in twice.stderr and "pass --resume" in twice.stderr
    assert "Traceback" not in twice.stderr and "seqpar.train.torchrun" not in twice.stdout  # nothing started
    again = _run(["--set", "train.steps=8", "--resume"], tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "steps 6->8" in again.stdout
    assert (run / "checkpoints" / "latest").read_text() == "step_0000008"
