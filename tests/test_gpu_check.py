"""make gpu-check (seqpar.gpu_check): the runner's rules and the summary's schema, on CPU.

The GPU phases themselves run only on a GPU; here: a failing phase does not stop the others, a timeout
ends the phase's whole process group, the global budget skips what no longer fits, a pytest phase
passes only when tests ran and none failed, the table's selections match tests (or say why not), and
the real toolchain phase runs in the CPU dry run and fills the summary's host fields.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

from seqpar import gpu_check
from seqpar.gpu_check import PHASES, STATUSES, Phase

PHASE_KEYS = {"name", "title", "status", "reason", "duration_s", "timeout_s", "numbers", "returncode", "command",
              "log_tail"}
TOP_KEYS = {"schema", "started", "finished", "dry_run", "budget_s", "duration_s", "ok", "host", "git", "argv",
            "phases"}


def _check_schema(summary: dict, names: list[str]) -> None:
    assert TOP_KEYS <= set(summary) and summary["schema"] == gpu_check.SCHEMA
    assert [p["name"] for p in summary["phases"]] == names
    for p in summary["phases"]:
        assert PHASE_KEYS <= set(p), p["name"]
        assert p["status"] in STATUSES
        assert isinstance(p["duration_s"], float) and isinstance(p["numbers"], dict)


def _py(code: str) -> tuple[str, ...]:
    return ("-c", textwrap.dedent(code))


def test_runner_continues_after_failures_kills_timeouts_and_keeps_the_budget(tmp_path):
    pidfile = tmp_path / "child.pid"
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_mixed.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2, 'one is not two'\n")
    (tests / "test_skips.py").write_text("import pytest\n\n@pytest.mark.skip(reason='no GPU')\ndef test_s():\n    pass\n")
    phases = [
        Phase("writes", "a command that writes its results", 60,
              argv=_py("import json, sys; json.dump({'rows': [{'seq': 1, 'ms': 2.5}]}, open(sys.argv[1], 'w'))")
              + ("{json}",)),
        Phase("crashes", "a command that fails", 60, argv=_py("raise SystemExit(3)")),
        Phase("hangs", "a command whose child outlives the timeout", 1.5,
              argv=_py(f"""
                  import subprocess, sys, time
                  child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
                  open({str(pidfile)!r}, 'w').write(str(child.pid))
                  time.sleep(120)""")),
        Phase("mixed", "pytest: one pass, one failure", 120, pytest=(str(tests / "test_mixed.py"),)),
        Phase("all_skipped", "pytest: everything skipped", 120, pytest=(str(tests / "test_skips.py"),)),
        Phase("awaited", "pytest: a selection awaiting its tests", 120,
              pytest=(str(tests / "test_mixed.py"), "-k", "no_such_test"), awaiting="tests to come"),
        Phase("empty", "pytest: a selection that matches nothing", 120,
              pytest=(str(tests / "test_mixed.py"), "-k", "no_such_test")),
    ]
    out = tmp_path / "out"
    t0 = time.monotonic()
    summary = gpu_check.run(phases, out, budget_s=600, floor_s=1.0)
    assert time.monotonic() - t0 < 120
    _check_schema(summary, [p.name for p in phases])
    got = {p["name"]: p for p in summary["phases"]}
    assert got["writes"]["status"] == "pass" and got["writes"]["numbers"]["rows"] == [{"seq": 1, "ms": 2.5}]
    assert got["crashes"]["status"] == "fail" and got["crashes"]["reason"] == "exit status 3"
    assert got["hangs"]["status"] == "timeout" and got["hangs"]["returncode"] is None
    assert got["hangs"]["duration_s"] < 15
    child = int(pidfile.read_text())
    for _ in range(50):   # the child (same process group) was ended too
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        raise AssertionError("the timed-out phase's child process survived")
    mixed = got["mixed"]
    assert mixed["status"] == "fail" and (mixed["numbers"]["passed"], mixed["numbers"]["failed"]) == (1, 1)
    assert mixed["numbers"]["failures"][0]["test"].endswith("test_bad")
    assert "one is not two" in mixed["numbers"]["failures"][0]["message"]
    assert got["all_skipped"]["status"] == "fail" and "no test ran (1 skipped" in got["all_skipped"]["reason"]
    assert got["awaited"]["status"] == "skipped" and "tests to come" in got["awaited"]["reason"]
    assert got["empty"]["status"] == "fail" and got["empty"]["reason"] == "no test selected"
    assert summary["ok"] is False
    # the files: json (as returned), markdown with a row per phase and the failures, one log of everything
    assert json.loads((out / "gpu_check.json").read_text()) == summary
    md = (out / "gpu_check.md").read_text()
    assert all(f"| {p.name} | " in md for p in phases) and "one is not two" in md and "| seq | ms |" in md
    log = (out / "gpu_check.log").read_text()
    assert all(f"===== {p.name}: " in log for p in phases)
    # the budget: a phase that cannot get floor_s seconds is skipped, and never started
    summary = gpu_check.run(phases[:1], tmp_path / "out2", budget_s=0.5, floor_s=1.0)
    (p,) = summary["phases"]
    assert p["status"] == "skipped" and p["reason"].startswith("budget:") and p["command"] == ""


def test_table_selections_match_tests_or_say_why_not():
    """Every pytest phase of the table selects tests in tests/gpu; a phase marked ``awaiting`` selects
    none yet (when its tests arrive this fails: drop the note)."""
    proc = subprocess.run([sys.executable, "-m", "seqpar.gpu_check", "--list"], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, SEQPAR_GPU_DRYRUN="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = {}
    for line in proc.stdout.splitlines():
        name, _, _, count, unit, *_ = line.split()
        counts[name] = int(count) if unit == "tests" else None
    assert list(counts) == [p.name for p in PHASES]
    for p in PHASES:
        if not p.pytest:
            assert counts[p.name] is None and p.argv, p.name
        elif p.awaiting:
            assert counts[p.name] == 0, f"{p.name} now selects {counts[p.name]} tests: remove its awaiting note"
        else:
            assert counts[p.name] >= 1, f"{p.name}: {' '.join(p.pytest)} selects no test"
    names = [p.name for p in PHASES]
    assert names[0] == "toolchain" and names[-3:] == ["bench_kernels", "bench_lightning", "bench_moh"]
    assert sum(p.timeout_s for p in PHASES) >= gpu_check.DEFAULT_BUDGET_S   # the budget, not the sum, binds


def test_dry_run_toolchain_phase_fills_the_summary(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run([sys.executable, "-m", "seqpar.gpu_check", "--dry-run", "--phases", "toolchain",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    _check_schema(summary, ["toolchain"])
    assert summary["ok"] is True and summary["dry_run"] is True and summary["finished"]
    host = summary["host"]
    import torch
    import triton

    assert host["torch"] == torch.__version__.split("+")[0] or host["torch"] == torch.__version__
    assert host["triton"] == triton.__version__ and host["cuda_available"] is False
    assert host["triton_first_launch_ms"] > 0 and host["toolchain"]["problems"] == []
    assert "CPU dry run" in (out / "gpu_check.md").read_text()
