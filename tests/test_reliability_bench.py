"""Benchmark timings (issue #16): every timing is a median over repetitions with its best one, and a
spread too wide to mean anything (a loaded machine) is reported on stderr instead of printed as fact."""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))


def test_median_min_and_spread_warning(capsys):
    import _util

    delays = iter([0.0, 0.002, 0.002, 0.002, 0.002, 0.002])  # warm-up, then 5 steady repetitions
    t = _util.bench(lambda: time.sleep(next(delays)), reps=5, label="steady")
    assert t.reps == 5 and 1.5 < t.min <= float(t) and t.spread >= 1.0
    capsys.readouterr()

    delays = iter([0.0, 0.001, 0.001, 0.02, 0.02, 0.02])  # the machine got busy half-way
    t = _util.bench(lambda: time.sleep(next(delays)), reps=5, label="s2 fwd 512")
    err = capsys.readouterr().err
    assert t.spread > _util.SPREAD_WARN and "s2 fwd 512" in err and "too noisy" in err
    assert f"{t.min:.3g}" in err

    _util.print_table([{"case": "x", "ms": t}])
    out = capsys.readouterr().out
    assert f"{float(t):.3g} (min {t.min:.3g})" in out
