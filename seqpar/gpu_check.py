"""The first GPU run, as one script: ``make gpu-check`` (``python -m seqpar.gpu_check``, from a checkout).

Runs, in order, the phases of :data:`PHASES` — toolchain and versions (plus one compiled Triton
launch), ``tests/gpu`` kernels at d128 bf16, the one-GPU training steps of every recipe, the
long-context launches, the host-sync detector, then the benchmark harness's ``s2``, ``lightning``
and ``moh`` suites (``python -m seqpar.bench``) — each in its own process group with its own
timeout, inside one global budget (default 540 s, so the whole run stays under 10 minutes on one
H100), and writes after every phase:

- ``OUT/gpu_check.json``: per phase the status (``pass`` / ``fail`` / ``timeout`` / ``skipped``),
  duration, the command, key numbers (test counts, failing tests, slowest tests; the benchmark's own
  JSON rows) and the end of its output; the host's GPU, driver and package versions;
- ``OUT/gpu_check.md``: the same as tables;
- ``OUT/gpu_check.log``: every phase's full output.

A failing phase does not stop the others. A pytest phase passes only if at least one test ran and
none failed (all skipped is a failure: the GPU was not used). Phases are pytest selections or
commands in one table, easy to adjust. ``SEQPAR_GPU_DRYRUN=1`` (or ``--dry-run``) runs the same
phases on CPU at tiny shapes (Triton interpreter, gloo; ``tests/gpu`` shrinks its shapes itself,
the benchmarks get small arguments) to check the script, not the GPU. Exit status: 0 when every phase
passed, 1 otherwise.

    python -m seqpar.gpu_check --out runs/gpu_check               # on a GPU host
    python -m seqpar.gpu_check --list                             # the phases and what each selects
    SEQPAR_GPU_DRYRUN=1 python -m seqpar.gpu_check --phases toolchain,syncs --out /tmp/gc
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import pathlib
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEMA = "seqpar.gpu_check/1"
STATUSES = ("pass", "fail", "timeout", "skipped")
DEFAULT_BUDGET_S = 540.0


@dataclass(frozen=True)
class Phase:
    """One step of the check: a pytest selection (``pytest``) or a command (``argv``, run with this
    interpreter; ``{json}`` is replaced by a file the command writes its results to)."""

    name: str
    title: str
    timeout_s: float
    pytest: tuple[str, ...] = ()
    argv: tuple[str, ...] = ()
    dry_argv: Optional[tuple[str, ...]] = None  # the command's arguments in the CPU dry run (small shapes)
    workers: int = 0  # pytest-xdist workers on a GPU host (Triton compiles in parallel; 16 cores there)
    env: dict[str, str] = field(default_factory=dict)
    # a selection known to match nothing yet, and why: the phase then reports "skipped" with this reason;
    # tests/test_gpu_check.py fails once the selection matches something, so the note cannot go stale
    awaiting: str = ""

    def command(self, dry: bool, json_path: str, xml_path: str, workers: Optional[int]) -> list[str]:
        if self.pytest:
            n = self.workers if workers is None else workers
            return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                    f"--junitxml={xml_path}", *(["-n", str(n)] if n > 0 else []), *self.pytest]
        args = self.dry_argv if (dry and self.dry_argv is not None) else self.argv
        return [sys.executable, *(a.replace("{json}", json_path) for a in args)]


# The table. Selections follow today's tests/gpu; adjust them here (one place).
PHASES: tuple[Phase, ...] = (
    Phase("toolchain", "toolchain and versions, one compiled Triton launch", 120,
          argv=("-m", "seqpar.gpu_check", "--toolchain-phase", "{json}")),
    Phase("kernels", "tests/gpu kernels at d128 bf16 (S2, flash, Lightning, MoH fwd + bwd vs fp64)", 180,
          pytest=("tests/gpu", "-m", "kernels_d128_bf16"), workers=4),
    Phase("train", "one-GPU training steps of every recipe (its engine: Megatron or DeepSpeed), NCCL; both "
          "engines' model on the GPU (== the CPU-initialised model), distributed-optimizer resume", 180,
          pytest=("tests/gpu/test_gpu_train.py", "tests/gpu/test_gpu_engine.py"), workers=4),
    Phase("long_context", "long-context launches: 64K and 128K tokens per call, Lightning, flash, S2, MoH", 240,
          pytest=("tests/gpu", "-m", "long_context")),
    Phase("syncs", "sync detector: steady-state steps (packed documents too) under torch.cuda.set_sync_debug_mode"
          "('error') and cp.count_host_syncs", 150, pytest=("tests/gpu", "-m", "syncs")),
    # the benchmark harness's kernel suites (python -m seqpar.bench, docs/bench.md), each with a time budget
    # inside its phase's timeout (the rest of a suite is skipped and noted); fwd and fwd+bwd, GPU shapes
    Phase("bench_kernels", "seqpar.bench s2: S2 vs seqpar flash vs SDPA vs flex_attention (same BlockMask)", 120,
          argv=("-m", "seqpar.bench", "--suites", "s2", "--seqs", "8192", "32768", "--budget-s", "85",
                "--json", "{json}"),
          dry_argv=("-m", "seqpar.bench", "--suites", "s2", "--size", "smoke", "--json", "{json}")),
    Phase("bench_lightning", "seqpar.bench lightning: Lightning vs SDPA vs flash vs fla chunk_simple_gla", 75,
          argv=("-m", "seqpar.bench", "--suites", "lightning", "--seqs", "8192", "16384", "32768", "--budget-s", "55",
                "--json", "{json}"),
          dry_argv=("-m", "seqpar.bench", "--suites", "lightning", "--size", "smoke", "--json", "{json}")),
    Phase("bench_moh", "seqpar.bench moh: MoH at 25/50/75/100 % active pairs vs masked SDPA", 75,
          argv=("-m", "seqpar.bench", "--suites", "moh", "--budget-s", "55", "--json", "{json}"),
          dry_argv=("-m", "seqpar.bench", "--suites", "moh", "--size", "smoke", "--json", "{json}")),
)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------- toolchain phase
def toolchain_phase(path: str) -> int:
    """Versions, GPU, compiler / headers / libcuda (seqpar.toolchain) and one Triton kernel compiled and
    launched (interpreted in the dry run); writes them to ``path``; exit 1 when anything is missing."""
    from importlib import metadata

    from seqpar import toolchain

    out: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                           "platform": platform.platform()}
    for dist in ("torch", "triton", "numpy", "megatron-core", "deepspeed", "pydantic", "transformers", "pytest",
                 "pytest-xdist"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    problems: list[str] = []
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - reported as the phase's failure
        problems.append(f"import torch failed: {type(e).__name__}: {e}")
        torch = None
    cuda = bool(torch is not None and torch.cuda.is_available())
    out["cuda_available"] = cuda
    if torch is not None:
        out["torch_file"] = torch.__file__
        out["torch_cuda"] = torch.version.cuda
        if cuda:
            props = torch.cuda.get_device_properties(0)
            out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                       memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
            try:
                smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=30)
                out["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout else None
            except (OSError, subprocess.TimeoutExpired):
                out["driver"] = None
        elif not _dry_run():
            problems.append("torch sees no GPU (torch.cuda.is_available() is False): a CPU build of torch, or no "
                            "driver visible; the CPU dry run is SEQPAR_GPU_DRYRUN=1")
    tc = toolchain.report()
    out["toolchain"] = tc
    needed = cuda or not _dry_run()   # the CPU dry run builds no launcher stub: notes only
    for p in tc["problems"]:
        print(f"seqpar.toolchain: {'error' if needed else 'note'}: {p}", file=sys.stderr)
    if needed:
        problems += tc["problems"]
    if torch is not None and (cuda or _dry_run()):
        try:
            out["triton_first_launch_ms"] = round(_triton_probe(torch, "cuda" if cuda else "cpu"), 1)
        except Exception as e:  # noqa: BLE001 - reported as the phase's failure
            problems.append(f"a one-line Triton kernel failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    out["problems"] = problems
    pathlib.Path(path).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, indent=1, default=str))
    return 1 if problems else 0


def _triton_probe(torch: Any, device: str) -> float:
    """Compile and launch ``y = x + 1`` with Triton; the wall time of the first launch (compilation and
    the launcher stub build included) in ms. Raises if the result is wrong."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)

    x = torch.arange(1000, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t0 = time.perf_counter()
    add_one[(triton.cdiv(1000, 256),)](x, y, 1000, BLOCK=256)
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    if not torch.equal(y, x + 1):
        raise RuntimeError("wrong result")
    return ms


def _dry_run() -> bool:
    return os.environ.get("SEQPAR_GPU_DRYRUN") == "1"


# ----------------------------------------------------------------------------------------- running
def _run(cmd: Sequence[str], env: dict, timeout: float, log: pathlib.Path) -> tuple[Optional[int], float]:
    """Run ``cmd`` in its own session (so a timeout ends it and every child: pytest-xdist workers,
    torchrun's ranks); returns (exit status or None on timeout, seconds)."""
    t0 = time.monotonic()
    with log.open("wb") as f:
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc: Optional[int] = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            rc = None
            _kill_group(proc)
    return rc, time.monotonic() - t0


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _junit(path: pathlib.Path) -> dict:
    """Counts, failing tests (first line of each message) and the slowest tests of a junit xml."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    cases = [c for s in suites for c in s.iter("testcase")]
    failed, errors, skipped, passed = [], 0, 0, 0
    for c in cases:
        name = f"{c.get('classname', '')}::{c.get('name', '')}".lstrip(":")
        bad = c.find("failure") if c.find("failure") is not None else c.find("error")
        if bad is not None:
            errors += c.find("error") is not None
            msg = (bad.get("message") or bad.text or "").strip().splitlines()
            failed.append({"test": name, "message": (msg[0] if msg else "")[:400]})
        elif c.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    slow = sorted(cases, key=lambda c: -float(c.get("time") or 0))[:5]
    return {"passed": passed, "failed": len(failed) - errors, "errors": errors, "skipped": skipped,
            "failures": failed[:20],
            "slowest": [{"test": f"{c.get('classname', '')}::{c.get('name', '')}".lstrip(":"),
                         "s": round(float(c.get("time") or 0), 2)} for c in slow]}


def _tail(path: pathlib.Path, chars: int = 3000) -> str:
    data = path.read_bytes()[-chars:] if path.exists() else b""
    return data.decode(errors="replace")


def run_phase(phase: Phase, *, dry: bool, timeout: float, work: pathlib.Path, workers: Optional[int]) -> dict:
    """Run one phase with ``timeout`` seconds; its entry of the summary."""
    jpath, xpath, log = work / f"{phase.name}.json", work / f"{phase.name}.xml", work / f"{phase.name}.log"
    for p in (jpath, xpath):
        p.unlink(missing_ok=True)
    cmd = phase.command(dry, str(jpath), str(xpath), workers)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **phase.env)
    env.setdefault("OMP_NUM_THREADS", "1" if dry else "4")   # as make test / make test-gpu
    if dry:
        env.update(SEQPAR_GPU_DRYRUN="1", TRITON_INTERPRET="1")
    else:
        env.pop("TRITON_INTERPRET", None)   # compiled Triton on the GPU
    entry: dict[str, Any] = {"name": phase.name, "title": phase.title, "command": shlex.join(cmd),
                             "timeout_s": round(timeout, 1), "started": _now()}
    print(f"== gpu-check {phase.name}: {phase.title} (timeout {timeout:.0f} s)\n   {entry['command']}", flush=True)
    rc, secs = _run(cmd, env, timeout, log)
    entry.update(returncode=rc, duration_s=round(secs, 1), numbers={})
    status, reason = "pass", ""
    if rc is None:
        status, reason = "timeout", f"stopped after {timeout:.0f} s"
    if phase.pytest:
        if xpath.exists():
            counts = _junit(xpath)
            entry["numbers"] = counts
            ran = counts["passed"] + counts["failed"] + counts["errors"]
            if status == "pass":
                if counts["failed"] or counts["errors"]:
                    status, reason = "fail", f"{counts['failed']} failed, {counts['errors']} errors"
                elif rc == 5 and phase.awaiting:
                    status, reason = "skipped", f"no test selected: {phase.awaiting}"
                elif rc == 5:
                    status, reason = "fail", "no test selected"
                elif rc != 0:
                    status, reason = "fail", f"pytest exit status {rc}"
                elif ran == 0:
                    status, reason = "fail", f"no test ran ({counts['skipped']} skipped; see the log for the reasons)"
        elif status == "pass":
            status, reason = "fail", f"pytest exit status {rc} and no report (collection or start-up failed)"
    else:
        if jpath.exists():
            try:
                entry["numbers"] = json.loads(jpath.read_text())
            except json.JSONDecodeError as e:
                entry["numbers"] = {"unreadable_json": str(e)}
        if status == "pass" and rc != 0:
            status, reason = "fail", f"exit status {rc}"
        elif status == "pass" and not jpath.exists():
            status, reason = "fail", "the command wrote no results file"
    entry.update(status=status, reason=reason, log_tail=_tail(log))
    print(f"   -> {status}{': ' + reason if reason else ''} ({secs:.1f} s)", flush=True)
    return entry


def _git() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if sha.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def run(phases: Sequence[Phase], out: pathlib.Path, *, budget_s: float = DEFAULT_BUDGET_S, dry: bool = False,
        floor_s: float = 20.0, timeout_scale: float = 1.0, workers: Optional[int] = None) -> dict:
    """Run ``phases`` in order within ``budget_s`` seconds, writing the summary after each phase. A phase
    gets ``min(timeout_s * timeout_scale, what is left of the budget after keeping floor_s for each
    later phase)``; one that would get less than ``floor_s`` is skipped. After a toolchain phase that
    finds no GPU (not in the dry run), the rest are skipped."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    summary: dict[str, Any] = {"schema": SCHEMA, "started": _now(), "finished": None, "dry_run": dry,
                               "budget_s": budget_s, "duration_s": 0.0, "ok": False, "host": {},
                               "git": _git(), "argv": sys.argv, "phases": []}
    t0 = time.monotonic()
    stop_reason = ""
    with tempfile.TemporaryDirectory(prefix="seqpar_gpu_check_") as tmp:
        work = pathlib.Path(tmp)
        log_all = (out / "gpu_check.log").open("w")
        try:
            for i, phase in enumerate(phases):
                left = deadline - time.monotonic() - floor_s * (len(phases) - i - 1)
                timeout = min(phase.timeout_s * timeout_scale, left)
                if stop_reason or timeout < floor_s:
                    reason = stop_reason or f"budget: {max(left, 0):.0f} s left for it (< {floor_s:.0f} s)"
                    entry = {"name": phase.name, "title": phase.title, "status": "skipped", "reason": reason,
                             "duration_s": 0.0, "timeout_s": 0.0, "numbers": {}, "returncode": None,
                             "command": "", "log_tail": ""}
                    print(f"== gpu-check {phase.name}: skipped ({reason})", flush=True)
                else:
                    entry = run_phase(phase, dry=dry, timeout=timeout, work=work, workers=workers)
                    log_all.write(f"\n===== {phase.name}: {entry['status']} {entry['reason']} ({entry['duration_s']} s)\n"
                                  f"$ {entry['command']}\n")
                    log_all.write((work / f"{phase.name}.log").read_text(errors="replace"))
                    log_all.flush()
                    if phase.name == "toolchain":
                        summary["host"] = entry["numbers"]
                        if not dry and entry["numbers"].get("cuda_available") is False:
                            stop_reason = "torch sees no GPU (toolchain phase); SEQPAR_GPU_DRYRUN=1 is the CPU dry run"
                summary["phases"].append(entry)
                summary["duration_s"] = round(time.monotonic() - t0, 1)
                _write(out, summary)
        finally:
            log_all.close()
    summary["finished"] = _now()
    summary["ok"] = bool(summary["phases"]) and all(p["status"] == "pass" for p in summary["phases"])
    summary["duration_s"] = round(time.monotonic() - t0, 1)
    _write(out, summary)
    return summary


def _write(out: pathlib.Path, summary: dict) -> None:
    for name, text in (("gpu_check.json", json.dumps(summary, indent=1, default=str) + "\n"),
                       ("gpu_check.md", markdown(summary))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


# ---------------------------------------------------------------------------------------- markdown
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _key_numbers(p: dict) -> str:
    n = p.get("numbers") or {}
    if "passed" in n:
        s = f"{n['passed']} passed, {n['failed']} failed, {n['errors']} errors, {n['skipped']} skipped"
        if n.get("slowest"):
            s += f"; slowest {n['slowest'][0]['s']} s"
        return s
    if p["name"] == "toolchain" and n:
        bits = [n.get("gpu") or "no GPU", f"torch {n.get('torch')}", f"triton {n.get('triton')}"]
        if "triton_first_launch_ms" in n:
            bits.append(f"first Triton launch {n['triton_first_launch_ms']} ms")
        return ", ".join(bits)
    if "ratio_50_vs_100" in n:
        return "; ".join(f"{k}: " + ", ".join(f"{m} {_fmt(v)}" for m, v in r.items())
                         for k, r in n["ratio_50_vs_100"].items())
    if n.get("rows"):
        return f"{len(n['rows'])} rows (below)"
    return ""


def markdown(summary: dict) -> str:
    """The summary as markdown: a header, one row per phase, then failures and benchmark tables."""
    h = summary.get("host") or {}
    lines = [f"# seqpar gpu-check{' (CPU dry run: not GPU coverage)' if summary['dry_run'] else ''}", "",
             f"- started {summary['started']}, {summary['duration_s']} s of a {summary['budget_s']:.0f} s budget; "
             f"{'all phases passed' if summary['ok'] else 'NOT all phases passed'}",
             f"- GPU: {h.get('gpu', '-')} (sm {h.get('capability', '-')}, {h.get('sms', '-')} SMs, "
             f"{h.get('memory_gib', '-')} GiB), driver {h.get('driver', '-')}",
             f"- Python {h.get('python', '-')}, torch {h.get('torch', '-')} (CUDA {h.get('torch_cuda', '-')}), "
             f"triton {h.get('triton', '-')}, megatron-core {h.get('megatron-core', '-')}, "
             f"deepspeed {h.get('deepspeed', '-')}",
             f"- commit {summary['git'].get('commit') or '-'}{' (dirty)' if summary['git'].get('dirty') else ''}",
             "", "| phase | status | s | key numbers |", "|---|---|---|---|"]
    for p in summary["phases"]:
        status = p["status"] + (f": {p['reason']}" if p.get("reason") else "")
        lines.append(f"| {p['name']} | {status.replace('|', '/')} | {p['duration_s']} | "
                     f"{_key_numbers(p).replace('|', '/')} |")
    for p in summary["phases"]:
        n = p.get("numbers") or {}
        if n.get("failures"):
            lines += ["", f"## {p['name']}: failures", ""]
            lines += [f"- `{f['test']}`: {f['message']}" for f in n["failures"]]
        rows = n.get("rows")
        if rows and isinstance(rows, list) and isinstance(rows[0], dict):
            cols = list(rows[0].keys())
            lines += ["", f"## {p['name']}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows[:24]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- CLI
def select(names: str) -> list[Phase]:
    """The phases named in a comma-separated list (all for ''), in table order."""
    if not names:
        return list(PHASES)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {p.name for p in PHASES}
    bad = [n for n in wanted if n not in known]
    if bad:
        raise SystemExit(f"--phases: unknown {', '.join(bad)}; known: {', '.join(p.name for p in PHASES)}")
    return [p for p in PHASES if p.name in wanted]


def collect(phase: Phase) -> int:
    """How many tests a pytest phase selects (0 for a command phase), by pytest's own collection."""
    if not phase.pytest:
        return 0
    import pytest

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), *phase.pytest])
    m = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", buf.getvalue())
    return int(m.group(1)) if m else 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m seqpar.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "runs" / "gpu_check",
                    help="folder for gpu_check.json / .md / .log (default runs/gpu_check)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"global time budget in seconds (default {DEFAULT_BUDGET_S:.0f}; dry run 4x)")
    ap.add_argument("--phases", default="", help="comma-separated subset of the phases, in table order")
    ap.add_argument("--workers", type=int, default=None, help="pytest-xdist workers for every pytest phase "
                    "(default: the table's on a GPU, 2 in the dry run)")
    ap.add_argument("--dry-run", action="store_true", help="= SEQPAR_GPU_DRYRUN=1: CPU, tiny shapes")
    ap.add_argument("--list", action="store_true", help="print the phases and how many tests each selects")
    ap.add_argument("--toolchain-phase", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.toolchain_phase:
        return toolchain_phase(args.toolchain_phase)
    if not (ROOT / "tests" / "gpu").is_dir() or not (ROOT / "benchmarks").is_dir():
        print(f"seqpar.gpu_check: error: {ROOT} is not a seqpar checkout (no tests/gpu, benchmarks/): run it from "
              f"one, installed editable (make install, or make install TORCH=system)", file=sys.stderr)
        return 2
    dry = args.dry_run or _dry_run()
    if dry:
        os.environ["SEQPAR_GPU_DRYRUN"] = "1"
    phases = select(args.phases)
    if args.list:
        for p in phases:
            what = shlex.join(["pytest", *p.pytest]) if p.pytest else shlex.join(p.argv)
            count = f"{collect(p)} tests" if p.pytest else "command"
            print(f"{p.name:16s} {p.timeout_s:5.0f} s  {count:10s} {what}{'  [awaiting: ' + p.awaiting + ']' if p.awaiting else ''}")
        return 0
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET_S * (4 if dry else 1)
    workers = args.workers if args.workers is not None else (min(2, os.cpu_count() or 1) if dry else None)
    summary = run(phases, args.out, budget_s=budget, dry=dry, timeout_scale=4.0 if dry else 1.0, workers=workers)
    print(f"gpu-check: {'all phases passed' if summary['ok'] else 'NOT all phases passed'} in {summary['duration_s']} s; "
          f"{args.out / 'gpu_check.md'}")
    for p in summary["phases"]:
        print(f"  {p['name']:16s} {p['status']:8s} {p['duration_s']:7.1f} s  {p.get('reason', '')}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
