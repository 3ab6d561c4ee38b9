"""Interrupts of a real torchrun run of the tiny hybrid (CP=2, 2 ranks, launchers/torchrun.sh):

- SIGUSR1 to torchrun mid-run -> checkpoint at the next step boundary on every rank, a message that
  says so, interrupted.json, non-zero exit; ``--resume auto`` continues with the losses of an
  uninterrupted run;
- SIGTERM to a single-process run -> exit code 75 (EXIT_INTERRUPTED) after the checkpoint;
- SIGKILL of the torchrun agent -> its workers exit instead of training on as orphans;
- ``MAX_RESTARTS=1`` and a SIGKILLed rank -> torchrun restarts the workers, which resume from the
  latest checkpoint by themselves and finish with the uninterrupted losses (or, killed before the
  first checkpoint, start over with one clean tensorboard curve).
"""

from __future__ import annotations

import json
import re
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from netns_harness import RECIPE, ROOT, SHRINK, kill_group, spawn, tb_losses, train_env, wait_for

from seqpar.train.signals import EXIT_INTERRUPTED, MARKER

STEPS = 8
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """Losses of the uninterrupted run."""
    out = tmp_path_factory.mktemp("ref")
    r = subprocess.run(_cmd(out, "--set", f"train.steps={STEPS}"), cwd=ROOT, env=train_env(cache, NPROC="2"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = tb_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.fixture
def procs():
    started: list = []
    yield started
    for p in started:
        kill_group(p)


def _cmd(out: pathlib.Path, *args: str) -> list[str]:
    return ["bash", str(ROOT / "launchers" / "torchrun.sh"), str(RECIPE), *SHRINK,
            "--set", f"train.out_dir={out}", *args]


def _workers(pid: int) -> list[int]:
    r = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()]


def _latest(out: pathlib.Path) -> bool:
    return (out / "checkpoints" / "latest").exists()


def test_sigusr1_checkpoints_and_resume_is_exact(cache, reference, procs, tmp_path):
    out = tmp_path / "run"
    p = spawn(_cmd(out, "--set", f"train.steps={STEPS}", "--set", "train.save_every=2"), tmp_path / "log",
              train_env(cache, NPROC="2"), procs)
    wait_for(lambda: _latest(out), 240, "the first checkpoint", p)
    os.kill(p.pid, signal.SIGUSR1)  # p is torchrun itself (the launcher execs it)
    p.wait(120)
    log = (tmp_path / "log").read_text()
    # the launcher ends with one line and the workers' code, torchrun's traceback kept in a log file
    assert p.returncode == EXIT_INTERRUPTED, log[-3000:]
    assert "seqpar torchrun: stopped by SIGUSR1; the workers wrote a checkpoint" in log, log[-3000:]
    assert "Traceback" not in log and "SignalException" not in log, log[-3000:]
    marker = json.loads((out / MARKER).read_text())
    step = marker["step"]
    assert marker["signal"] == "SIGUSR1" and 2 <= step < STEPS, marker
    assert f"stopped by SIGUSR1: checkpoint written at step {step}" in log, log[-3000:]
    assert f"exiting with code {EXIT_INTERRUPTED}" in log
    assert log.count("SIGUSR1 received") >= 2  # both ranks got it (torchrun forwards it)
    assert (out / "checkpoints" / "latest").read_text() == f"step_{step:07d}"
    again = subprocess.run(_cmd(out, "--set", f"train.steps={STEPS}", "--resume", "auto"), cwd=ROOT,
                           env=train_env(cache, NPROC="2"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"steps {step}->{STEPS}" in again.stdout
    assert not (out / MARKER).exists()
    got = tb_losses(out)
    assert set(range(step + 1, STEPS + 1)) <= set(got)
    assert {s: got[s] for s in got} == {s: reference[s] for s in got}  # identical losses


def test_sigterm_single_process_exit_code(cache, tmp_path):
    out = tmp_path / "run"
    env = train_env(cache)
    args = [sys.executable, "-m", "seqpar.train", str(RECIPE), *SHRINK, "--set", "parallel.context_parallel=1",
            "--set", f"train.out_dir={out}", "--set", "train.steps=1000", "--set", "train.save_every=1"]
    with open(tmp_path / "log", "w") as fh:
        p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: _latest(out), 240, "the first checkpoint", p)
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == EXIT_INTERRUPTED, (tmp_path / "log").read_text()[-3000:]
        step = json.loads((out / MARKER).read_text())["step"]
        assert (out / "checkpoints" / "latest").read_text() == f"step_{step:07d}"
        assert "stopped by SIGTERM: checkpoint written" in (tmp_path / "log").read_text()
    finally:
        kill_group(p)


def test_workers_exit_when_the_agent_dies(cache, procs, tmp_path):
    out = tmp_path / "run"
    p = spawn(_cmd(out, "--set", "train.steps=100000", "--set", "train.save_every=1"), tmp_path / "log",
              train_env(cache, NPROC="2"), procs)
    wait_for(lambda: _latest(out), 240, "the first checkpoint", p)
    workers = _workers(p.pid)
    assert len(workers) == 2, workers
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    t0 = time.monotonic()
    wait_for(lambda: not any(pathlib.Path(f"/proc/{w}").exists() for w in workers), 10, "the orphaned workers to exit")
    assert time.monotonic() - t0 < 10
    log = (tmp_path / "log").read_text()
    assert log.count(f"the torchrun agent (pid {p.pid}) died") == 2, log[-3000:]


def test_max_restarts_resumes_from_latest(cache, reference, procs, tmp_path):
    out = tmp_path / "run"
    p = spawn(_cmd(out, "--set", f"train.steps={STEPS}", "--set", "train.save_every=2"), tmp_path / "log",
              train_env(cache, NPROC="2", MAX_RESTARTS="1"), procs)
    wait_for(lambda: _latest(out), 240, "the first checkpoint", p)
    rank1 = next(w for w in _workers(p.pid)
                 if b"RANK=1" in pathlib.Path(f"/proc/{w}/environ").read_bytes().split(b"\0"))
    os.kill(rank1, signal.SIGKILL)
    assert p.wait(300) == 0, (tmp_path / "log").read_text()[-3000:]
    log = (tmp_path / "log").read_text()
    summaries = re.findall(rf"steps (\d+)->{STEPS}", log)
    assert len(summaries) == 1 and int(summaries[0]) >= 2, log[-3000:]  # the restarted workers resumed
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:07d}"
    got = tb_losses(out)
    assert set(got) >= {STEPS} and {s: got[s] for s in got} == {s: reference[s] for s in got}


def test_max_restarts_before_the_first_checkpoint_starts_over(cache, reference, procs, tmp_path):
    """A rank killed before any checkpoint exists: the restarted workers (implied ``--resume auto``)
    find nothing to resume, drop the dead attempt's tensorboard events and train from step 0."""
    out = tmp_path / "run"
    p = spawn(_cmd(out, "--set", f"train.steps={STEPS}", "--set", f"train.save_every={STEPS}"), tmp_path / "log",
              train_env(cache, NPROC="2", MAX_RESTARTS="1"), procs)
    wait_for(lambda: any((out / "tb").glob("events.out.tfevents.*")), 240, "the first attempt's tensorboard events", p)
    assert not _latest(out)
    rank1 = next(w for w in _workers(p.pid)
                 if b"RANK=1" in pathlib.Path(f"/proc/{w}/environ").read_bytes().split(b"\0"))
    os.kill(rank1, signal.SIGKILL)
    assert p.wait(300) == 0, (tmp_path / "log").read_text()[-3000:]
    log = (tmp_path / "log").read_text()
    assert "removed the events of a run that never wrote a checkpoint" in log, log[-3000:]
    assert re.findall(rf"steps (\d+)->{STEPS}", log) == ["0"], log[-3000:]  # started over, once
    got = tb_losses(out)
    assert got == reference  # one curve, no mix with the dead attempt's events


def test_launcher_rejects_a_bad_recipe_before_torchrun(cache, tmp_path):
    r = subprocess.run(_cmd(tmp_path / "run", "--set", "train.steps=2.5"), cwd=ROOT,
                       env=train_env(cache, NPROC="2", CHECK="1"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "train.steps: got 2.5" in r.stderr and "torch.distributed.run" not in r.stdout + r.stderr


@pytest.mark.parametrize("arg,restart,exists,want", [
    (None, "0", True, False), (None, "0", False, False),
    ("latest", "0", True, True), (True, "0", False, True),     # plain --resume: load (or fail loudly)
    ("auto", "0", True, True), ("auto", "0", False, False),      # auto: only if there is a checkpoint
    (None, "1", True, True), (None, "1", False, False),          # a torchrun restart / Slurm requeue = auto
])
def test_resume_mode(tmp_path, monkeypatch, arg, restart, exists, want):
    from seqpar.train.signals import resume_mode

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    if exists:
        (tmp_path / "latest").write_text("step_0000002")
    assert resume_mode(arg, tmp_path) is want
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", restart)
    assert resume_mode(arg, tmp_path) is want

