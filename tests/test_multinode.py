"""Two real hosts (network namespaces joined by a veth pair): the tiny hybrid recipe with CP=2 as a
2-node torchrun job through launchers/torchrun.sh, one rank per node, over TCP/gloo across the veth.

- the launcher picks the interface that routes to MASTER_ADDR (printed) and the losses equal the
  single-host CP=2 run exactly;
- a node dying (SIGKILL of every process in its namespace) or a SIGKILLed rank makes every other
  process exit non-zero within the recipe's process-group timeout + slack, naming the failed rank / host.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time

import pytest

from netns_harness import (RECIPE, ROOT, SHRINK, TwoHosts, kill_group, require_root_and, spawn, tb_losses, train_env,
                           wait_for)

TIMEOUT_S = 10  # parallel.distributed_timeout_s in these tests
SLACK_S = 15    # torchrun's own teardown on top of it (2 loaded cores)
STEPS = 5
pytestmark = pytest.mark.slow


@pytest.fixture
def hosts():
    require_root_and("ip")
    h = TwoHosts(f"sp15m{os.getpid() % 10000}").up()
    yield h
    h.down()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


def _launch(hosts: TwoHosts, host: int, out: pathlib.Path, cache: pathlib.Path, log: pathlib.Path,
            *args: str) -> subprocess.Popen:
    env = train_env(cache, NNODES="2", NODE_RANK=str(host), MASTER_ADDR=TwoHosts.ADDRS[0], MASTER_PORT="29500",
                    NPROC="1")
    cmd = hosts.cmd(host, ["bash", str(ROOT / "launchers" / "torchrun.sh"), str(RECIPE), *SHRINK,
                           "--set", f"train.out_dir={out}",
                           "--set", f"parallel.distributed_timeout_s={TIMEOUT_S}", *args])
    return spawn(cmd, log, env, hosts.procs)


def test_two_nodes_equal_single_host(hosts, cache, tmp_path):
    # the reference: the same recipe on one host, 2 ranks
    env = train_env(cache, NPROC="2")
    ref = subprocess.run(["bash", str(ROOT / "launchers" / "torchrun.sh"), str(RECIPE), *SHRINK,
                          "--set", f"train.out_dir={tmp_path / 'ref'}", "--set", f"train.steps={STEPS}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    out = tmp_path / "two"
    procs = [_launch(hosts, h, out, cache, tmp_path / f"node{h}.log", "--set", f"train.steps={STEPS}")
             for h in (0, 1)]
    for p in procs:
        p.wait(300)
    logs = [(tmp_path / f"node{h}.log").read_text() for h in (0, 1)]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    # the interface that routes to MASTER_ADDR, chosen and printed by the launcher
    assert "GLOO_SOCKET_IFNAME=veth0 NCCL_SOCKET_IFNAME=veth0 (routes to 10.150.0.1" in logs[0]
    assert "GLOO_SOCKET_IFNAME=veth1 NCCL_SOCKET_IFNAME=veth1 (routes to 10.150.0.1" in logs[1]
    want, got = tb_losses(tmp_path / "ref"), tb_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want  # bitwise: same reduction order on 2 ranks
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:07d}"


def _running(out: pathlib.Path) -> bool:
    return (out / "checkpoints" / "latest").exists()


@pytest.mark.parametrize("dead,how", [(1, "kill"), (0, "kill"), (1, "stop")],
                         ids=["kill-node1", "kill-node0-store-host", "hang-node1"])
def test_node_failure_ends_every_rank(hosts, cache, tmp_path, dead, how):
    """SIGKILL (a node dies: peers see the connection drop) or SIGSTOP (a node hangs: only the
    process-group timeout can end the wait) every process of one node."""
    out = tmp_path / "run"
    procs = [_launch(hosts, h, out, cache, tmp_path / f"node{h}.log", "--set", "train.steps=100000",
                     "--set", "train.save_every=1") for h in (0, 1)]
    wait_for(lambda: _running(out), 240, "the first checkpoint", procs[0])
    time.sleep(1.0)  # mid-step
    if how == "kill":
        assert hosts.kill_host(dead), "no process in the namespace"
    else:
        for pid in hosts.pids(dead):
            os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    alive = procs[1 - dead]
    alive.wait(TIMEOUT_S + SLACK_S)
    took = time.monotonic() - t0
    log = (tmp_path / f"node{1 - dead}.log").read_text()
    assert alive.returncode != 0, log[-3000:]
    assert took < TIMEOUT_S + SLACK_S, took
    if how == "stop":  # nothing but the recipe's timeout could have ended it (gloo's default is 30 min)
        assert took > TIMEOUT_S - 1, took
    # no worker of the surviving node is left behind
    wait_for(lambda: hosts.pids(1 - dead) == [], 5, "the surviving node's processes to exit")
    # the message names the failed rank and host
    if dead == 1:
        assert "peer failure: rank 1 on" in log and "10.150.0.2" in log, log[-3000:]
    else:  # the rendezvous store lived on node 0
        assert "peer failure: the rendezvous store at 10.150.0.1:29500 is unreachable" in log, log[-3000:]
    assert "Exiting with code 77" in log, log[-3000:]


def test_killed_rank_ends_every_rank(cache, tmp_path):
    """One host, 2 ranks: SIGKILL rank 1 -> rank 0 and torchrun exit non-zero within the timeout."""
    require_root_and()  # (no root needed; same skip policy)
    out = tmp_path / "run"
    env = train_env(cache, NPROC="2")
    procs: list = []
    p = spawn(["bash", str(ROOT / "launchers" / "torchrun.sh"), str(RECIPE), *SHRINK, "--set", f"train.out_dir={out}",
               "--set", "train.steps=100000", "--set", "train.save_every=1",
               "--set", f"parallel.distributed_timeout_s={TIMEOUT_S}"], tmp_path / "log", env, procs)
    try:
        wait_for(lambda: _running(out), 240, "the first checkpoint", p)
        workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        ranks = {}
        for w in map(int, workers):
            env_w = pathlib.Path(f"/proc/{w}/environ").read_bytes().split(b"\0")
            ranks[int(next(e for e in env_w if e.startswith(b"RANK=")).split(b"=")[1])] = w
        time.sleep(1.0)
        os.kill(ranks[1], signal.SIGKILL)
        t0 = time.monotonic()
        p.wait(TIMEOUT_S + SLACK_S)
        took = time.monotonic() - t0
        log = (tmp_path / "log").read_text()
        assert p.returncode != 0 and took < TIMEOUT_S + SLACK_S, (took, log[-3000:])
        wait_for(lambda: not pathlib.Path(f"/proc/{ranks[0]}").exists(), 5, "rank 0 to exit")
        # the torchrun wrapper's one line names the killed rank (torchrun's own report is in its log file)
        assert "rank 1 on" in log and "exited with code -9 (SIGKILL)" in log, log[-3000:]
    finally:
        for q in procs:
            kill_group(q)
