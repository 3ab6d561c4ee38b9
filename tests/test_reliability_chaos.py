"""Chaos run (issue #16): the tiny hybrid (A S L H layers) trains with CP=2 under torchrun for 200
steps while it is killed 6 times at random points — a rank (SIGKILL), the torchrun agent (SIGKILL),
a rank in the middle of a checkpoint save — and relaunched with --resume each time. The final
weights and optimizer state are bit-identical to an uninterrupted run's, and the tensorboard loss
curve has every step exactly once, with the uninterrupted run's values.

The model and sequence are shrunk with --set (hidden 32, MQAR, 64 tokens) so it stays a few minutes
on a loaded 2-core machine. Every process is started by the test and killed by pid."""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 200, 10
SETS = ["model.hidden_size=32", "model.ffn_hidden_size=64", "data.dataset=mqar", "data.seq_len=64",
        "data.global_batch=2", "data.vocab_size=64", "data.mqar_pairs=4", "data.mqar_queries=4",
        f"train.steps={STEPS}", f"train.save_every={SAVE_EVERY}", "train.keep_last=3", "train.progress=false",
        "train.time_attention=false", "parallel.backend=torch"]


def _sets(out: pathlib.Path, *extra: str) -> list[str]:
    return [a for s in SETS + [f"train.out_dir={out}", *extra] for a in ("--set", s)]


def _launch(out: pathlib.Path, log, *, resume: bool, extra: tuple = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "-m", "seqpar.train", str(ROOT / "recipes" / "tiny_hybrid_cp2.yaml"), *_sets(out, *extra)]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the torchrun agent's workers), from /proc."""
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            out += [int(x) for x in open(f"/proc/{pid}/task/{t}/children").read().split()]
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _workers(agent: subprocess.Popen, timeout: float = 120.0) -> list[int]:
    """The two worker pids (python processes running seqpar.train under the agent)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        kids = [p for p in _children(agent.pid) if _cmdline(p).count("seqpar.train")]
        if len(kids) >= 2:
            return kids
        assert agent.poll() is None, "torchrun exited before starting its workers"
        time.sleep(0.05)
    raise AssertionError("workers did not start")


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
    except OSError:
        return ""


def _latest(out: pathlib.Path) -> int:
    try:
        return int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return 0


def _wait_progress(out: pathlib.Path, agent: subprocess.Popen, target: int, timeout: float = 300.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _latest(out) >= target:
            return True
        if agent.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint {target} within {timeout}s")


def _wait_tmp(out: pathlib.Path, agent: subprocess.Popen, timeout: float = 300.0) -> bool:
    """Poll for a save in progress (a .tmp_step_N folder)."""
    ck = out / "checkpoints"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if any(n.startswith(".tmp_step_") for n in os.listdir(ck)):
                return True
        except OSError:
            pass
        if agent.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("no save seen")


def _reap(agent: subprocess.Popen, pids: list[int], grace: float) -> list[int]:
    """Wait for the agent and the given workers to exit; SIGKILL (by pid) what is left after ``grace``."""
    end = time.monotonic() + grace
    while time.monotonic() < end and (agent.poll() is None or any(_alive(p) for p in pids)):
        time.sleep(0.05)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    if agent.poll() is None:
        agent.kill()
    agent.wait(timeout=60)
    end = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    return left


def _model_and_optimizer(step_dir: pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint except the per-rank RNG states, assembled in one process."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from seqpar.train import integrity

    integrity.verify(step_dir)
    md = integrity.read_dcp_metadata(step_dir / ".metadata")
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
          if isinstance(m, TensorStorageMetadata)}
    dcp_load(sd, storage_reader=integrity.SafeFileSystemReader(step_dir), no_dist=True)
    return sd


def _tb_losses(out: pathlib.Path) -> list[tuple[int, float]]:
    """train/loss as TensorBoard shows it (all event files of the run, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


@pytest.mark.slow
def test_chaos_kills_resume_bit_identical(tmp_path):
    seed = int(os.environ.get("SEQPAR_CHAOS_SEED", random.SystemRandom().randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"chaos seed {seed} (SEQPAR_CHAOS_SEED={seed} replays it)")
    base, chaos = tmp_path / "base", tmp_path / "chaos"
    with open(tmp_path / "base.log", "wb") as log:
        # the reference saves only its last step (the one compared): its curve and weights must not depend
        # on the 19 saves the chaos run makes in between (nor on its kills)
        agent = _launch(base, log, resume=False, extra=("train.save_every=0",))
        assert agent.wait(timeout=900) == 0, (tmp_path / "base.log").read_text()[-4000:]

    plan = ["rank", "agent", "save", "rank", "agent", "save"]
    kills, orphans = [], []
    with open(tmp_path / "chaos.log", "wb") as log:
        for i, kind in enumerate(plan):
            start = _latest(chaos)
            agent = _launch(chaos, log, resume=start > 0, extra=() if start else ("train.overwrite=true",))
            workers = _workers(agent)
            # a random point: 1-2 checkpoints past where this launch started, then up to ~2 steps more
            target = start + SAVE_EVERY * rng.randint(1, 2)
            if target >= STEPS or not _wait_progress(chaos, agent, target):
                break
            if kind == "save":
                if not _wait_tmp(chaos, agent):
                    break
                victim = rng.choice(workers)
            else:
                time.sleep(rng.uniform(0.0, 0.5))
                victim = agent.pid if kind == "agent" else rng.choice(workers)
            if agent.poll() is not None:
                break
            os.kill(victim, signal.SIGKILL)
            kills.append((kind, _latest(chaos)))
            # a killed rank brings torchrun down; a killed agent must take its workers with it
            left = _reap(agent, workers, grace=5.0 if kind == "agent" else 60.0)
            if left:
                orphans.append((kind, left))
        assert len(kills) >= 5, (seed, kills)
        assert _latest(chaos) < STEPS, (seed, kills, "a killed launch ran to the end")
        agent = _launch(chaos, log, resume=True)
        rc = agent.wait(timeout=900)
        text = (tmp_path / "chaos.log").read_text(errors="replace")
        assert rc == 0, text[-4000:]
    print("kills (kind, latest checkpoint then):", kills, "orphans killed by pid:", orphans)
    assert {k for k, _ in kills} == {"rank", "agent", "save"}, kills

    a = _model_and_optimizer(base / "checkpoints" / f"step_{STEPS:07d}")
    b = _model_and_optimizer(chaos / "checkpoints" / f"step_{STEPS:07d}")
    keys = sorted(k for k in a if not k.startswith("rng."))
    assert keys == sorted(k for k in b if not k.startswith("rng.")) and any(k.startswith("optimizer.") for k in keys)
    for k in keys:
        assert torch.equal(a[k], b[k]), (seed, k)
    # keep_last=3: only the newest three checkpoints are left
    assert len(list((chaos / "checkpoints").glob("step_*"))) == 3

    curve, ref = _tb_losses(chaos), _tb_losses(base)
    assert [s for s, _ in curve] == list(range(1, STEPS + 1)), (seed, [s for s, _ in curve])
    assert curve == ref, seed
