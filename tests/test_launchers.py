"""The launchers' pre-flight and their failure reports (issue 21, items 5, 6 and 7):

- every launcher checks the recipe for the world it will start before anything starts: the Slurm dry
  run and ``sbatch`` submission refuse a layout that does not fit nodes x processes, ``deepspeed.sh``
  refuses a recipe naming a missing file (one line, exit 2, nothing launched);
- ``seqpar.train.torchrun`` (what torchrun.sh runs) ends a failed run with one line and the failed
  worker's exit code; torchrun's ``ChildFailedError`` / ``SignalException`` traceback goes to
  ``<out_dir>/logs/torchrun_*.log``. Fake workers (plain Python scripts) keep these fast; the real
  trainer under torchrun.sh is covered by tests/test_train_torchrun.py and tests/test_signals.py.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIG = ROOT / "recipes" / "7b_lightning_cp8.yaml"  # TP=2 x CP=8: 16 ranks
# its layout on the demo text: its indexed corpus (data/corpus) is not here, and the data check speaks first
ON_TEXT = ["--set", "data.dataset=text", "--set", "data.tokenizer=train", "--set", "data.blend=[]", "--set",
           "data.split=null"]
DEMO = ROOT / "recipes" / "tiny_hybrid_cp2.yaml"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("NPROC", "NNODES", "WORLD_SIZE", "RANK", "MASTER_ADDR")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", CHECK="1", **extra)
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=180)


def test_slurm_dry_run_and_submission_check_the_world(tmp_path):
    # 1 node x 2 GPUs for a 16-rank layout: refused by the dry run, with nothing planned as launched
    r = _run(["bash", "launchers/slurm.sh", "--dry-run", "--nodes", "1", "--gpus-per-node", "2", str(BIG), *ON_TEXT])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "the world size 2 is not divisible by parallel.tensor_parallel x parallel.context_parallel" in r.stderr
    assert "the recipe does not fit 1 node(s) x 2 process(es)" in r.stderr
    assert "(dry run: nothing launched)" not in r.stdout and "Traceback" not in r.stderr
    # submission: the same check before sbatch; a stub sbatch records whether it was called
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'submitted'}\n")
    (stub / "sbatch").chmod(0o755)
    path = f"{stub}:{os.environ['PATH']}"
    r = _run(["bash", "launchers/slurm.sh", "--nodes", "1", "--gpus-per-node", "a100:2", str(BIG), *ON_TEXT],
             PATH=path)
    assert r.returncode == 2 and "the world size 2 is not divisible" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "submitted").exists()
    # a fitting one reaches sbatch with the batch script and the recipe's arguments
    r = _run(["bash", "launchers/slurm.sh", "--nodes", "1", "--gpus-per-node", "2", str(DEMO), "--set",
              "train.steps=3"], PATH=path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "submitted").read_text().split() == [
        "--nodes=1", "--gpus-per-node=2", "launchers/slurm.sbatch", str(DEMO), "--set", "train.steps=3"]


def test_deepspeed_launcher_checks_files_first(tmp_path):
    missing = tmp_path / "missing.txt"
    line = f"data.text_files[0]='{missing}': no such file; fix the path or remove the entry"
    r = _run(["bash", "launchers/deepspeed.sh", str(DEMO), "--set", f"data.text_files=[{missing}]"],
             NPROC="2", DEEPSPEED="echo")
    assert r.returncode == 2 and line in r.stderr, r.stdout + r.stderr
    assert "+ echo" not in r.stdout  # the deepspeed launcher never started
    # (torchrun.sh runs the same --check: tests/test_signals.py::test_launcher_rejects_a_bad_recipe_before_torchrun)


FAKE_WORKER = """
import json, os, pathlib, signal, sys, time
# a stand-in for seqpar.train: argv is RECIPE --set train.out_dir=OUT
out, mode = pathlib.Path(sys.argv[3].split("=", 1)[1]), os.environ["FAKE_MODE"]
if mode == "fail":
    print("seqpar-train: a clean one-line error", file=sys.stderr, flush=True)
    sys.exit(2)
def stop(signum, frame):
    if mode == "checkpoint":  # as seqpar.train: checkpoint, interrupted.json, exit 75
        out.mkdir(parents=True, exist_ok=True)
        (out / "interrupted.json").write_text(json.dumps({"step": 1}))
        sys.exit(75)
    sys.exit(1)
signal.signal(signal.SIGINT, stop)
(out / "ready").parent.mkdir(parents=True, exist_ok=True)
(out / "ready").write_text("")
time.sleep(120)
"""


def _torchrun(worker: pathlib.Path, out: pathlib.Path, mode: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "seqpar.train.torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "1",
           "--signals-to-handle", "SIGTERM,SIGINT", "--shutdown-timeout", "20", str(worker), str(DEMO),
           "--set", f"train.out_dir={out}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(FAKE_MODE=mode), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_torchrun_wrapper_ends_with_one_line_and_the_exit_code(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(FAKE_WORKER)
    out = tmp_path / "run"
    p = _torchrun(worker, out, "fail")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert "seqpar-train: a clean one-line error" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("seqpar torchrun: rank 0 on ") and "exited with code 2 (its message is above); exit 2" in last
    assert "Traceback" not in err and "ChildFailedError" not in err and "failed (exitcode" not in err, err
    logs = list((out / "logs").glob("torchrun_*.log"))
    assert len(logs) == 1 and str(logs[0]) in last
    assert "ChildFailedError" in logs[0].read_text() and "exitcode  : 2" in logs[0].read_text()
    # a signal to the launcher: the workers checkpoint (exit 75) -> 75, one line, no SignalException traceback
    # (without a checkpoint the code is 128 + the signal; not run here to keep the test short)
    for mode, code in (("checkpoint", 75),):
        out = tmp_path / mode
        p = _torchrun(worker, out, mode)
        deadline = time.monotonic() + 120
        while not (out / "ready").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert p.returncode == code, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("seqpar torchrun: stopped by SIGINT") and f"exit {code}" in last, err
        assert ("the workers wrote a checkpoint" in last) == (code == 75)
        assert "Traceback" not in err and "SignalException" not in err, err
        assert "SignalException" in next((out / "logs").glob("torchrun_*.log")).read_text()
