"""The benchmark harness (issue #24, #20 item 12): its output schema at minimal size, the timing
discipline (interleaving, >= 5 repetitions, min / median / max, the noise flag, failing cases and
suites reported while the rest runs), the FLOP counts, and `make bench` running every benchmark on
its own. No assertion here depends on how fast anything ran."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from seqpar.bench import schema
from seqpar.bench.timing import MIN_REPS, Case, PeakTensorBytes, Stats, measure
from seqpar.kernels import S2Layout
from seqpar.kernels.flops import attention_flops, causal_pairs, s2_pairs

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The harness at minimal size, every suite, as `make bench` runs it (a subprocess)."""
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "seqpar.bench", "--size", "smoke", "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    return p, out


def test_smoke_report_is_schema_valid_and_complete(smoke):
    p, out = smoke
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    payload = json.loads((out / "bench.json").read_text())
    rep = schema.validate(payload)
    assert [s.name for s in rep.suites] == ["s2", "lightning", "moh", "cp", "e2e"]
    st = rep.stamp
    assert st.size == "smoke" and st.device_type == "cpu" and st.threads == 1 and st.torch == torch.__version__
    assert st.load_avg is None or len(st.load_avg) == 6  # at start and at the end
    for s in rep.suites:
        assert s.status == "ok", (s.name, s.error)
        assert s.results, s.name
        for r in s.results:
            assert r.status == "ok" and r.ms.reps >= MIN_REPS and r.ms.min <= r.ms.median <= r.ms.max, (s.name, r)
            assert r.peak_mem_mib is not None and r.peak_mem_mib > 0, (s.name, r.impl)
        for plot in s.plots:
            assert (out / plot).read_bytes()[:8] == PNG
        assert s.plots, s.name
    by = {s.name: s for s in rep.suites}
    # both modes of each kernel suite; the compared baselines are there or said missing, with the reason
    for name in ("s2", "lightning", "moh"):
        assert {r.mode for r in by[name].results} == {"fwd", "fwd+bwd"}
    assert {"sdpa", "seqpar flash", "seqpar s2 vs2"} <= {r.impl for r in by["s2"].results}
    assert any(m.impl == "flex_attention" and "smoke" in m.reason for m in by["s2"].missing)
    assert any(m.impl == "fla chunk_simple_gla" for m in by["lightning"].missing)
    assert "missing baseline: fla chunk_simple_gla" in p.stdout
    assert {r.params["active"] for r in by["moh"].results} == {0.25, 0.5, 0.75, 1.0}
    assert all(r.tflops and r.flops for s in ("s2", "lightning", "moh") for r in by[s].results)
    model = next(v for k, v in by["cp"].tables.items() if k.startswith("modelled"))
    assert {r["scheme"] for r in model} >= {"LASP-2", "LASP-1", "ring attention", "s2 exchange", "all-gather K/V"}
    assert all(r.metrics["tokens_per_s"] > 0 for r in by["e2e"].results)
    assert all(r.tflops > 0 and "mfu" not in r.metrics for r in by["e2e"].results)  # model FLOPs; no CPU peak
    md = (out / "bench.md").read_text()
    assert st.date in md and st.device in md and all(s.title in md for s in rep.suites)


def test_replot_draws_a_reports_pngs_again(smoke, tmp_path):
    from seqpar.bench import replot

    made = replot(smoke[1] / "bench.json", tmp_path)
    assert sorted(p.name for p in made) == ["cp.png", "e2e.png", "lightning.png", "moh.png", "s2.png"]
    assert all(p.read_bytes()[:8] == PNG for p in made)
    schema.validate(json.loads((tmp_path / "bench.json").read_text()))


def test_schema_rejects_what_it_should():
    good = {"schema_version": 1, "stamp": {"date": "d", "device": "cpu", "device_type": "cpu", "size": "smoke",
                                           "threads": 1, "python": "3", "torch": "2", "triton": None, "seqpar": "0",
                                           "fla": None, "load_avg": None},
            "suites": [{"name": "x", "title": "x", "status": "ok", "seconds": 1.0, "results": [
                {"group": "g", "impl": "i", "mode": "fwd", "params": {}, "status": "ok",
                 "ms": {"min": 1, "median": 1, "max": 1, "reps": 5, "inner": 1, "spread": 1, "noisy": False}}]}]}
    schema.validate(good)
    few = json.loads(json.dumps(good))
    few["suites"][0]["results"][0]["ms"]["reps"] = 3
    extra = json.loads(json.dumps(good))
    extra["stamp"]["gpu_hours"] = 1
    for bad in (few, extra):
        with pytest.raises(Exception, match="reps|gpu_hours"):
            schema.validate(bad)


def test_cases_are_interleaved_and_a_failing_case_is_reported():
    calls: list[str] = []

    def case(name, fail_at=None):
        n = [0]

        def fn():
            n[0] += 1
            calls.append(name)
            if fail_at is not None and n[0] >= fail_at:
                raise RuntimeError(f"{name} broke")
        return Case(name, fn)

    cases = measure([case("a"), case("b"), case("c"), case("boom", fail_at=1)], torch.device("cpu"), reps=5,
                    memory=False)
    a, b, c, boom = cases
    assert boom.error and "RuntimeError: boom broke" in boom.error and boom.stats is None
    assert all(x.stats.reps == 5 and x.error is None for x in (a, b, c))
    timed = [x for x in calls if x != "boom"][6:]  # after 3 warm-up calls + 3 inner-calibration calls
    reps = [timed[i:i + 3] for i in range(0, 15, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in reps)  # every repetition runs each case once
    assert len({tuple(r) for r in reps}) == 3  # in rotated orders
    with pytest.raises(ValueError, match="reps must be >= 5"):
        measure([case("a")], torch.device("cpu"), reps=3)
    late = measure([case("late", fail_at=4), case("ok")], torch.device("cpu"), reps=5, memory=False)
    assert late[0].error and late[0].stats is None and late[1].stats.reps == 5


def test_stats_and_noise_flag():
    steady = Stats.of([1.0, 1.1, 1.0, 1.05, 1.2])
    assert (steady.min, steady.median, steady.max, steady.reps) == (1.0, 1.05, 1.2, 5) and not steady.noisy
    busy = Stats.of([1.0, 2.0, 2.1, 2.2, 1.9])
    assert busy.noisy and busy.as_dict()["noisy"] and busy.spread == pytest.approx(2.0)


def test_peak_tensor_bytes_counts_live_storages():
    with PeakTensorBytes() as m:
        for _ in range(10):
            y = torch.empty(1000)  # one alive at a time (plus the next one being made)
    assert m.peak == 2 * 4000
    with PeakTensorBytes() as m:
        keep = [torch.empty(1000) for _ in range(10)]
        view = keep[0][:10]  # a view shares its storage: not counted again
    assert m.peak == 10 * 4000 and m.current == 10 * 4000
    del keep, view, y
    assert m.current == 0


def test_a_failing_suite_is_reported_and_the_others_run(tmp_path, monkeypatch, capsys):
    import seqpar.bench as bench
    from seqpar.bench.common import SuiteResult

    mod = type(sys)("fake_suites")

    def broken(ctx):
        raise RuntimeError("suite exploded")

    def fine(ctx):
        res = SuiteResult("fine suite")
        from seqpar.bench.common import Impl, time_group

        res.results = time_group(ctx, "g", "fwd", [Impl("x", lambda: torch.ones(3).sum(), 6.0)], {"n": 3})
        return res

    mod.broken, mod.fine = broken, fine
    monkeypatch.setitem(sys.modules, "fake_suites", mod)
    monkeypatch.setattr(bench, "SUITES", {"broken": "fake_suites:broken", "fine": "fake_suites:fine"})
    rep = bench.run(["broken", "fine"], size="smoke", out=tmp_path)
    broken_s, fine_s = rep["suites"]
    assert broken_s["status"] == "failed" and "suite exploded" in broken_s["error"]
    assert fine_s["status"] == "ok" and fine_s["results"][0]["ms"]["reps"] == 5
    schema.validate(json.loads((tmp_path / "bench.json").read_text()))
    assert "suite broken FAILED" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown suite"):
        bench.run(["nope"], out=tmp_path)


def test_a_spent_budget_skips_the_rest_of_a_kernel_suite_and_says_so(tmp_path, capsys):
    """--budget-s (what make gpu-check gives each bench phase): checked before each timed group; a
    spent budget skips the rest, printed and noted, and the report is still written and valid."""
    import seqpar.bench as bench

    rep = bench.run(["lightning", "moh"], size="smoke", out=tmp_path, seqs=[64, 128], budget_s=0.0)
    printed = capsys.readouterr().out
    for s, first in zip(rep["suites"], ("Lightning seq 64 fwd", "MoH fwd")):
        note = f"time budget of 0 s spent: skipped {first} and the rest"
        assert s["status"] == "ok" and s["results"] == [] and note in s["notes"] and note in printed, s
    schema.validate(json.loads((tmp_path / "bench.json").read_text()))
    assert "time budget of 0 s spent" in (tmp_path / "bench.md").read_text()


def test_json_rows_are_kept_after_every_group_so_a_stopped_run_keeps_its_numbers(tmp_path, monkeypatch):
    """--json (make gpu-check's phases, which stop a phase at its timeout): the flat rows are rewritten
    after every timed group, so a run stopped mid-suite leaves what it measured and says so; a
    finished run leaves the full rows."""
    import seqpar.bench as bench
    from seqpar.bench.__main__ import main
    from seqpar.bench.common import Impl, SuiteResult, time_group

    flat = tmp_path / "rows.json"
    mod = type(sys)("fake_progress_suites")

    def stopped(ctx):
        res = SuiteResult("stopped suite")
        res.results += time_group(ctx, "first", "fwd", [Impl("x", lambda: torch.ones(3).sum())], {})
        raise KeyboardInterrupt  # as a phase timeout's signal would stop it

    def done(ctx):
        res = SuiteResult("done suite")
        for group in ("a", "b"):
            res.results += time_group(ctx, group, "fwd", [Impl("y", lambda: torch.ones(3).sum())], {})
        return res

    mod.stopped, mod.done = stopped, done
    monkeypatch.setitem(sys.modules, "fake_progress_suites", mod)
    monkeypatch.setattr(bench, "SUITES", {"stopped": "fake_progress_suites:stopped",
                                          "done": "fake_progress_suites:done"})
    monkeypatch.setattr("seqpar.bench.__main__.SUITES", bench.SUITES)
    with pytest.raises(KeyboardInterrupt):
        main(["--suites", "done", "stopped", "--size", "smoke", "--out", str(tmp_path / "r"), "--json", str(flat)])
    rows = json.loads(flat.read_text())["rows"]
    assert [(r["suite"], r["impl"]) for r in rows] == [("done", "y"), ("done", "y"), ("stopped", "x"),
                                                      ("stopped", "-")]
    assert "did not finish" in rows[-1]["ms median (min-max)"]
    assert main(["--suites", "done", "--size", "smoke", "--out", str(tmp_path / "r"), "--json", str(flat)]) == 0
    rows = json.loads(flat.read_text())["rows"]
    assert [(r["suite"], r["group"]) for r in rows] == [("done", "a"), ("done", "b")]
    assert not list(tmp_path.glob("*.tmp"))


def _brute_s2_pairs(layout, n, h, hkv):
    lay = layout.with_heads(h)
    nb = -(-n // layout.block_size)
    blocks = lay.block_mask(h, hkv, nb, nb)
    pos = torch.arange(n)
    qb = pos // layout.block_size
    return int((blocks[:, qb][:, :, qb] & (pos[:, None] >= pos[None, :])).sum())


@pytest.mark.parametrize("layout", [S2Layout(16, 2, 4), S2Layout(16, 3, 8, num_dense_heads=1),
                                    S2Layout(16, 1, 2, homo_head=True),
                                    S2Layout(16, 2, 4, head_sliding_offset=1, head_sliding_step=2)])
def test_s2_pairs_equal_the_masked_pairs(layout):
    for n in (16, 100, 333):
        for h, hkv in ((4, 2), (8, 8), (8, 2)):
            assert s2_pairs(layout, n, h, hkv) == _brute_s2_pairs(layout, n, h, hkv), (layout, n, h, hkv)


def test_attention_flops_conventions():
    kw = dict(batch=2, seq_len=100, heads=4, head_dim=8)
    dense = attention_flops("softmax", **kw)
    assert dense == 2 * 4 * causal_pairs(100) * 2 * (8 + 8)
    assert attention_flops("softmax", backward=True, **kw) == pytest.approx(3.5 * dense)  # FA2: bwd 2.5x fwd
    assert attention_flops("moh", active_fraction=0.25, **kw) == pytest.approx(dense / 4)
    lay = S2Layout(16, 1, 4)
    assert attention_flops("s2", kv_heads=2, layout=lay, **kw) == 2 * 2 * (8 + 8) * s2_pairs(lay, 100, 4, 2)
    lin = attention_flops("lightning", **kw)  # linear in N
    assert attention_flops("lightning", **{**kw, "seq_len": 200}) == pytest.approx(2 * lin)
    for bad, match in (({"kind": "relu"}, "kind"), ({"kind": "s2"}, "layout"),
                       ({"kind": "moh", "active_fraction": 2.0}, "active_fraction")):
        with pytest.raises(ValueError, match=match):
            attention_flops(**{**kw, **bad})


def test_flex_block_mask_is_the_s2_layout():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from seqpar.bench.kernels import _flex_block_mask

    lay = S2Layout(16, 2, 4)
    h, hkv, n = 4, 2, 160
    bm = _flex_block_mask(lay, h, hkv, n, "cpu")
    nb = n // 16
    want = lay.with_heads(h).block_mask(h, hkv, nb, nb)
    dense = bm.to_dense()[0].bool()  # [h, q blocks, kv blocks]: partial + full blocks
    assert torch.equal(dense, want)
    # token level: flex's mask (full blocks, causal diagonal) equals S2's visible pairs
    assert s2_pairs(lay, n, h, hkv) == _brute_s2_pairs(lay, n, h, hkv)


def test_make_bench_runs_every_benchmark_and_names_each_failure(tmp_path):
    """`make bench` with a stand-in interpreter whose harness run and one script fail: every other
    benchmark still runs, both failures are named, and make exits non-zero."""
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "ran.log"
    py = fake / "python"
    py.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\ncase \"$*\" in *seqpar.bench*|*export_cache*) exit 3;; esac\n")
    py.chmod(0o755)
    p = subprocess.run(["make", "-s", "-o", "install", "bench", f"BIN={fake}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    ran = log.read_text()
    assert p.returncode != 0
    for script in ("-m seqpar.bench", "benchmarks/engine_recompute.py", "benchmarks/export_cache.py",
                   "benchmarks/kernel_resources.py"):
        assert script in ran, (script, ran)
    assert "FAILED: seqpar.bench benchmarks/export_cache.py" in p.stdout, p.stdout


@pytest.mark.parametrize("script,suite", [("kernels.py", "s2"), ("moh.py", "moh")])
def test_old_script_names_run_their_suite(script, suite, tmp_path, monkeypatch):
    """benchmarks/kernels.py (--bwd, as make gpu-check calls it), moh.py, ...: the harness's suites."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, "--bwd", "--size", "smoke", "--seqs", "64", "--out", str(tmp_path)])
    if script != "kernels.py":
        sys.argv.remove("--bwd")
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
    assert exit_.value.code == 0
    rep = schema.validate(json.loads((tmp_path / "bench.json").read_text()))
    assert [s.name for s in rep.suites] == [suite]
    assert {r.mode for r in rep.suites[0].results} == {"fwd", "fwd+bwd"}
