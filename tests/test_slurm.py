"""Real Slurm (Debian slurm-wlm): slurmctld + two slurmd, one per network namespace (NodeName n1 / n2
with their NodeAddr on the veth pair), a test-owned slurm.conf (auth/none, cred/none,
proctrack/linuxproc, task/none) in a temp dir, daemons stopped by pid.

- ``sbatch --nodes=2 launchers/slurm.sbatch RECIPE ...`` trains the tiny hybrid (CP=2, one rank per
  node): the job reaches COMPLETED, tensorboard events, checkpoints and per-node logs are written;
- preemption: ``scancel --signal=USR1`` mid-run -> checkpoint -> the script requeues the job
  (REQUEUE=1) -> the requeued job resumes by itself and finishes with the uninterrupted run's losses.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import time

import pytest

from netns_harness import RECIPE, ROOT, SHRINK, SlurmCluster, TwoHosts, require_root_and, tb_losses, train_env, wait_for

# the preempted job must still be training when scancel's USR1 reaches it: on the torch paths a step is
# ~0.15 s, so 12 steps leave ~10 steps (~3 s with its saves) after the first checkpoint; 6 left ~1 s
STEPS = 12
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_root_and("ip", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
    hosts = TwoHosts(f"sp15s{os.getpid() % 10000}").up()
    c = SlurmCluster(hosts, tmp_path_factory.mktemp("slurm"))
    try:
        c.up()
        yield c
    finally:
        c.down()
        hosts.down()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


def _submit(cluster: SlurmCluster, out: pathlib.Path, cache: pathlib.Path, *args: str, **env: str) -> str:
    r = cluster.run("sbatch", "--parsable", "--nodes=2", "-o", str(out.parent / f"{out.name}-%j.out"),
                    "launchers/slurm.sbatch", str(RECIPE), *SHRINK, "--set", f"train.out_dir={out}",
                    "--set", f"train.steps={STEPS}", "--set", "parallel.distributed_timeout_s=30", *args,
                    # sbatch exports this environment to the job: train_env's (no TRITON_INTERPRET from
                    # conftest: the job trains on the torch paths, as a CPU user's would), but CHECK=1: the
                    # batch script's pre-flight check runs in the real allocation (its world from Slurm)
                    base=train_env(cache, CHECK="1", **env))
    return r.stdout.strip().split(";")[0]


def _wait_done(cluster: SlurmCluster, job: str, timeout: float) -> dict[str, str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = cluster.job(job)
        if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(1)
    raise AssertionError(f"job {job} still {cluster.job(job)['JobState']} after {timeout} s\n{cluster.logs()}")


def _job_output(out: pathlib.Path, job: str) -> str:
    f = out.parent / f"{out.name}-{job}.out"
    logs = "\n".join(f"== {p}\n{p.read_text()}" for p in sorted(out.glob("logs/*/node*.log")))  # whole: a few KB
    return (f.read_text() if f.exists() else "(no job output)") + "\n" + logs


@pytest.fixture(scope="module")
def completed(cluster, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "plain"
    job = _submit(cluster, out, cache, "--set", "train.save_every=3")
    info = _wait_done(cluster, job, 400)
    return out, job, info


def test_sbatch_two_nodes_completes(completed):
    out, job, info = completed
    text = _job_output(out, job)
    assert info["JobState"] == "COMPLETED", text + "\n" + str(info)
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    # the plan the script prints: rendezvous on the first host's NodeAddr, one task per node
    assert "2 node(s) [n1 n2] x 1 process(es)" in text and "c10d at 10.150.0.1:29500" in text
    # per-node logs (node<SLURM_NODEID>_<hostname>; both namespaces share the machine's hostname)
    logs = {p.name.split("_")[0]: p.read_text() for p in out.glob(f"logs/job_{job}_0/node*.log")}
    assert set(logs) == {"node0", "node1"}, text
    assert "GLOO_SOCKET_IFNAME=veth0" in logs["node0"] and "GLOO_SOCKET_IFNAME=veth1" in logs["node1"]
    assert sorted(tb_losses(out)) == list(range(1, STEPS + 1))
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:07d}"
    assert (out / "checkpoints" / "step_0000003").is_dir()


def test_preempted_job_requeues_and_resumes_exactly(cluster, cache, completed, tmp_path):
    ref_out, _, ref_info = completed
    assert ref_info["JobState"] == "COMPLETED"
    out = tmp_path / "pre"
    job = _submit(cluster, out, cache, "--set", "train.save_every=2", REQUEUE="1")
    wait_for(lambda: (out / "checkpoints" / "latest").exists(), 300, "the first checkpoint")
    cluster.run("scancel", "--signal=USR1", job)
    # the requeued job starts once its revoked credential lapses (cred_expire=5 in the test's slurm.conf;
    # forcing StartTime=now before that fails it with "Job credential revoked")
    info = _wait_done(cluster, job, 500)
    text = _job_output(out, job)
    assert info["JobState"] == "COMPLETED", text + "\n" + str(info)
    assert info["Restarts"] == "1", info
    assert "stopped by SIGUSR1: checkpoint written at step" in text, text
    assert "scontrol requeue" in text and "requeued: resumes from" in text, text
    step = int(text.split("checkpoint written at step ")[1].split()[0])
    assert 2 <= step < STEPS
    assert f"steps {step}->{STEPS}" in text  # the requeued job resumed, it did not start over
    assert not (out / "interrupted.json").exists()
    got, want = tb_losses(out), tb_losses(ref_out)
    assert set(range(step + 1, STEPS + 1)) <= set(got)
    assert {s: got[s] for s in got} == {s: want[s] for s in got}  # identical losses
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:07d}"


def test_dry_run_prints_the_plan(tmp_path):
    """No cluster needed: slurm.sh --dry-run prints the sbatch line and the per-node plan. (No module
    fixture either, so make test's loadgroup runs it on whichever worker is free, not in the cluster's group.)"""
    env = {k: v for k, v in train_env(tmp_path / "cache").items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(ROOT / "launchers" / "slurm.sh"), "--dry-run", "--nodes", "4", "--gpus-per-node", "8",
                        "--time", "01:00:00", str(RECIPE), "--set", "train.out_dir=/tmp/seqpar-plan"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"+ sbatch --nodes=4 --gpus-per-node=8 --time 01:00:00 launchers/slurm.sbatch {RECIPE}" in out
    assert "4 node(s)" in out and "x 8 process(es)" in out and "c10d at node1:29500" in out
    assert "srun --nodes=4 --ntasks=4 --ntasks-per-node=1" in out and "NPROC=8" in out
    assert "/tmp/seqpar-plan/logs/job_DRYRUN_0/node<i>_<host>.log" in out
    assert "(dry run: nothing launched)" in out
