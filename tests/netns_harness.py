"""Two real hosts on one machine for the multi-node tests: two network namespaces joined by a veth
pair (addresses exist inside those namespaces only), plus helpers shared by test_multinode.py,
test_signals.py and test_slurm.py.

Nothing outside loopback and the test's own namespaces is contacted. Every process a test starts
is recorded and killed by pid (its process group) in ``down()``; the namespaces are deleted there.
Tests skip (with the reason) when not root or a tool is missing; with ``CI=true`` (set by .ci/run)
the same condition is a failure, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_hybrid_cp2.yaml"
# the tiny hybrid (A softmax, S s2, L lightning, H moh) with CP=2, shrunk to keep the tests fast
SHRINK = ["--set", "data.seq_len=64", "--set", "data.global_batch=4", "--set", "data.max_bytes=300000",
          "--set", "train.progress=false"]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(ok: bool, reason: str) -> None:
    """Skip (locally) or fail (CI=true) when a precondition of a real-component test is missing."""
    if not ok:
        if in_ci():
            pytest.fail(f"CI must run this test, but: {reason} (.ci/run installs and starts everything)")
        pytest.skip(reason)


def require_root_and(*tools: str) -> None:
    require(hasattr(os, "geteuid") and os.geteuid() == 0, "needs root (network namespaces)")
    missing = [t for t in tools if shutil.which(t) is None and not pathlib.Path("/usr/sbin", t).exists()]
    require(not missing, f"missing tools {missing} (apt-get install iproute2 slurm-wlm)")


def train_env(cache: pathlib.Path, **extra: str) -> dict[str, str]:
    # CHECK=0: the launcher's --check pre-flight costs a Python start per launch; tested on its own
    env = dict(os.environ, **{"PYTHON": sys.executable, "SEQPAR_CACHE": str(cache), "OMP_NUM_THREADS": "1",
                              "CHECK": "0", **extra})
    env.pop("TRITON_INTERPRET", None)  # CPU training runs the torch paths
    for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "SOCKET_IFNAME", "NNODES", "NODE_RANK",
              "MASTER_ADDR", "MASTER_PORT", "RDZV_ENDPOINT", "RDZV_ID", "RDZV_IS_HOST"):
        if k not in extra:
            env.pop(k, None)
    return env


def tb_losses(run_dir: pathlib.Path) -> dict[int, float]:
    """step -> train/loss from rank 0's tensorboard events (after resumes: the surviving curve)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars("train/loss")}


def wait_for(cond, timeout: float, what: str, proc: Optional[subprocess.Popen] = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{_out(proc)}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _out(proc: subprocess.Popen) -> str:
    path = getattr(proc, "log_path", None)
    return pathlib.Path(path).read_text()[-4000:] if path and pathlib.Path(path).exists() else ""


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group a test started (start_new_session) and reap its leader."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def spawn(cmd: list[str], log: pathlib.Path, env: dict[str, str], procs: list) -> subprocess.Popen:
    """Start ``cmd`` in its own session with stdout+stderr to ``log``; recorded in ``procs``."""
    fh = open(log, "w")
    p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    fh.close()
    p.log_path = str(log)  # type: ignore[attr-defined]
    procs.append(p)
    return p


class TwoHosts:
    """Namespaces ``<tag>0`` / ``<tag>1`` with a veth pair 10.150.0.1/24 <-> 10.150.0.2/24."""

    ADDRS = ("10.150.0.1", "10.150.0.2")

    def __init__(self, tag: str) -> None:
        self.ns = (f"{tag}0", f"{tag}1")
        self.procs: list[subprocess.Popen] = []

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def up(self) -> "TwoHosts":
        a, b = self.ns
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # a leftover of a killed run
            self._ip("netns", "add", ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        # the pair is created directly inside the namespaces: nothing appears in the host's namespace
        self._ip("link", "add", "veth0", "netns", a, "type", "veth", "peer", "name", "veth1", "netns", b)
        for ns, dev, addr in ((a, "veth0", self.ADDRS[0]), (b, "veth1", self.ADDRS[1])):
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            self._ip("-n", ns, "link", "set", dev, "up")
        return self

    def cmd(self, host: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *argv]

    def pids(self, host: int) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.ns[host]], capture_output=True, text=True)
        return [int(x) for x in r.stdout.split()]

    def kill_host(self, host: int) -> list[int]:
        """SIGKILL every process of a host (all processes in its namespace) — a node dying."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def down(self) -> None:
        for p in self.procs:
            kill_group(p)
        for host in (0, 1):
            self.kill_host(host)
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


SLURM_CONF = """\
# test-owned cluster: two nodes, one per network namespace; controller on node n1's namespace
ClusterName=seqpar-test
SlurmctldHost={hostname}({ctl_addr})
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# a requeued job waits cred_expire seconds (default 120) for its revoked credential to lapse;
# starting it earlier fails it ("Job credential revoked"). 5 s: Slurm accepts it (requeue -> restart
# measured 5.7 s; 10 gave 11 s); a value it rejects logs "AuthInfo=cred_expire=N invalid" and means 120
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
# the main scheduling loop every 2 s (default 60): a requeued job (and any job not started at submit)
# starts as soon as it may, instead of up to a minute later
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=30
InactiveLimit=0
SlurmdTimeout=120
SlurmctldTimeout=120
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=n1 NodeAddr={a0} CPUs=2 RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeAddr={a1} CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class SlurmCluster:
    """slurmctld + one slurmd per namespace (``slurmd -N n1`` in host 0, ``-N n2`` in host 1), with a
    slurm.conf in ``d``; started and stopped by pid. Slurm commands run inside host 0's namespace."""

    def __init__(self, hosts: TwoHosts, d: pathlib.Path) -> None:
        self.hosts, self.d = hosts, d
        self.conf = d / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []

    def env(self, base: Optional[dict[str, str]] = None, **extra: str) -> dict[str, str]:
        """``base`` (default os.environ) + the cluster's SLURM_CONF + ``extra``, no outer SLURM_* variable.
        sbatch exports this environment to the job: pass ``base=train_env(...)`` for a training job."""
        env = dict(os.environ if base is None else base, SLURM_CONF=str(self.conf), **extra)
        for k in list(env):
            if k.startswith("SLURM_") and k != "SLURM_CONF":
                env.pop(k)  # never inherit an outer allocation
        return env

    def up(self) -> "SlurmCluster":
        import socket

        (self.d / "state").mkdir(parents=True, exist_ok=True)
        for n in ("n1", "n2"):
            (self.d / "spool" / n).mkdir(parents=True, exist_ok=True)
        # slurmd initialises a cgroup plugin even with proctrack/linuxproc + task/none; name it explicitly
        # (autodetection fails on hosts where /sys/fs/cgroup is a tmpfs of v1 controllers)
        (self.d / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n")
        self.conf.write_text(SLURM_CONF.format(hostname=socket.gethostname(), ctl_addr=TwoHosts.ADDRS[0],
                                               d=self.d, a0=TwoHosts.ADDRS[0], a1=TwoHosts.ADDRS[1]))
        env = self.env()
        self.daemons.append(spawn(self.hosts.cmd(0, ["slurmctld", "-D", "-i", "-f", str(self.conf)]),
                                  self.d / "slurmctld.out", env, self.hosts.procs))
        for host, name in ((0, "n1"), (1, "n2")):
            self.daemons.append(spawn(self.hosts.cmd(host, ["slurmd", "-D", "-N", name, "-f", str(self.conf)]),
                                      self.d / f"slurmd-{name}.out", env, self.hosts.procs))
        wait_for(self._nodes_idle, 60, "both slurmd to register idle", self.daemons[0])
        return self

    def run(self, *argv: str, check: bool = True, timeout: float = 30, base: Optional[dict[str, str]] = None,
            **extra: str) -> subprocess.CompletedProcess:
        r = subprocess.run(self.hosts.cmd(0, list(argv)), env=self.env(base, **extra), cwd=ROOT, capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {r.returncode}\n{r.stdout}\n{r.stderr}\n{self.logs()}")
        return r

    def _nodes_idle(self) -> bool:
        r = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return states.get("n1") == "idle" and states.get("n2") == "idle"

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def logs(self) -> str:
        parts = []
        for f in sorted(self.d.glob("*.log")):
            parts.append(f"== {f.name}\n" + f.read_text()[-2000:])
        return "\n".join(parts)

    def down(self) -> None:
        for p in self.daemons:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.daemons:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                kill_group(p)
