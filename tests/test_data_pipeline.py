"""seqpar.data on real files (made here; no downloads): preprocess round trip into megatron-core's
.bin/.idx (sentencepiece and Hugging Face tokenizers, JSON Lines / parquet / text inputs, workers),
blends that follow their weights, splits that hold disjoint documents, a training stream that is a
function of (step, seed) only, the batch contract (document boundaries in position_ids) for every
source, the Hugging Face datasets source, caches built once across ranks with no collective waiting
on them, and the bad-input table (one line naming the field or file and the fix)."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
import torch

from data_corpus import documents, hf_tokenizer, sentencepiece_model, write_jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from seqpar.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("corpus")
    a, b = documents(150, seed=1), documents(100, seed=2)
    a_with_empty = a[:7] + [""] + a[7:]   # one empty document: skipped and counted
    write_jsonl(root / "a.jsonl", a_with_empty)
    write_jsonl(root / "b.jsonl", b)
    sp = sentencepiece_model(root, a + b)
    hf = hf_tokenizer(root / "hf", a + b)
    cache = root / "cache"
    sums = {name: preprocess([str(root / f"{src}.jsonl")], str(tok), str(root / name), seq_len=32,
                             progress=False, cache_dir=str(cache))
            for name, src, tok in (("a", "a", sp), ("b", "b", sp), ("a_hf", "a", hf))}
    return {"root": root, "a": a, "b": b, "sp": sp, "hf": hf, "cache": cache, "summaries": sums}


def _tok(path, cache):
    from seqpar.data import Tokenizer

    return Tokenizer.load(path, cache)


def _cfg(corpus, steps=20, **data):
    from seqpar.train.config import from_dict

    d = {"dataset": "indexed", "tokenizer": str(corpus["sp"]), "seq_len": 32, "global_batch": 8,
         "cache_dir": str(corpus["cache"]), **data}
    return from_dict({"data": d, "train": {"steps": steps, "seed": 7}}, check_files=True)


def _sources(cfg):
    from seqpar.data import build_sources, prepare

    prepare(cfg)  # no process group here: the caches are built in this process
    return build_sources(cfg)


def test_preprocess_round_trip(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from seqpar.data.preprocess import preprocess

    for name, tokenizer in (("a", corpus["sp"]), ("a_hf", corpus["hf"])):
        tok = _tok(tokenizer, corpus["cache"])
        ds = IndexedDataset(str(corpus["root"] / name))   # megatron-core's own reader
        assert len(ds) == len(corpus["a"]) and ds[0].dtype == np.uint16   # the empty document is not written
        for i, doc in enumerate(corpus["a"]):
            assert ds[i].tolist() == tok.encode(doc) + [tok.eod], (name, i)
        s = corpus["summaries"][name]
        lengths = [len(tok.encode(d)) + 1 for d in corpus["a"]]
        assert (s.documents, s.empty, s.tokens, s.longest) == (len(lengths), 1, sum(lengths), max(lengths))
        assert s.over_seq_len == sum(n > 33 for n in lengths) > 0   # long documents counted, none dropped
        assert s.bytes_out == os.path.getsize(corpus["root"] / f"{name}.bin") == 2 * s.tokens
    # workers, parquet and plain-text inputs give the same sequences
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": corpus["a"]}), tmp_path / "a.parquet")
    (tmp_path / "one.txt").write_text(corpus["b"][0])
    preprocess([str(tmp_path / "a.parquet"), str(tmp_path / "one.txt")], str(corpus["sp"]), str(tmp_path / "p"),
               json_key="body", workers=2, progress=False, cache_dir=str(corpus["cache"]))
    p, a = IndexedDataset(str(tmp_path / "p")), IndexedDataset(str(corpus["root"] / "a"))
    assert len(p) == len(a) + 1 and all(np.array_equal(p[i], a[i]) for i in range(len(a)))
    tok = _tok(corpus["sp"], corpus["cache"])
    assert p[len(a)].tolist() == tok.encode(corpus["b"][0]) + [tok.eod]


def test_preprocess_command_line_errors(corpus, tmp_path, capsys):
    from seqpar.data.preprocess import main

    root = corpus["root"]
    args = ["--tokenizer", str(corpus["sp"]), "--output-prefix", str(tmp_path / "x"), "--quiet"]
    assert main(["--input", str(root / "a.jsonl"), *args]) == 0
    assert "150 documents" in capsys.readouterr().out
    (tmp_path / "nokey.jsonl").write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    no_eos = sentencepiece_model(tmp_path, corpus["a"], name="noeos", eos=False)
    for argv, want in (([str(tmp_path / "nokey.jsonl"), "--force"], f"{tmp_path / 'nokey.jsonl'}:2: no key 'text'"),
                       ([str(root / "a.jsonl"), "--force", "--json-key", "body"], "no key 'body'"),
                       ([str(root / "a.jsonl"), "--force", "--tokenizer", str(no_eos)], "no EOS"),
                       ([str(root / "a.jsonl")], "exists; pass --force"),
                       ([str(tmp_path / "missing.jsonl"), "--force"], "is not a file")):
        assert main(["--input", *argv[:1], *args, *argv[1:]]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert want in err and "\n" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("x")) == ["x.bin", "x.idx"]  # no temps


def _segments(sample: dict) -> list[tuple[int, ...]]:
    """The whole documents of one window: token runs bounded by an EOD on both sides."""
    toks = torch.cat([sample["tokens"], sample["labels"][-1:]]).tolist()
    eods = [i for i, t in enumerate(toks) if t == 3]
    return [tuple(toks[s + 1:e + 1]) for s, e in zip(eods, eods[1:])]


def test_blend_split_and_stream(corpus):
    tok = _tok(corpus["sp"], corpus["cache"])
    ids = {tuple(tok.encode(d) + [3]): (src, i) for src in ("a", "b") for i, d in enumerate(corpus[src])}
    cfg = _cfg(corpus, blend=[0.7, str(corpus["root"] / "a"), 0.3, str(corpus["root"] / "b")], split="80,20,0")
    src = _sources(cfg)
    assert src.test is None and src.valid is not None and src.tokenizer.fingerprint == tok.fingerprint
    # the blend follows its weights (megatron's BlendedDataset: within one sample of 0.7 n at every n)
    n = cfg.train.steps * cfg.data.global_batch
    from_a = np.cumsum([int(src.train.sample(i)["dataset_id"]) == 0 for i in range(n)])
    assert np.abs(from_a - 0.7 * np.arange(1, n + 1)).max() <= 1.0
    # splits hold disjoint documents: whole documents of train windows are in the first 80 % of each source
    seen = {"train": set(), "valid": set()}
    for split, source in (("train", src.train), ("valid", src.valid)):
        for i in range(source.num_samples):
            for seg in _segments(source.sample(i)):
                s, k = ids[seg]
                seen[split].add((s, k))
                cut = round(0.8 * len(corpus[s]))
                assert (k < cut) == (split == "train"), (split, s, k)
    assert len(seen["train"]) > 20 and len(seen["valid"]) > 5 and not seen["train"] & seen["valid"]
    assert any("documents longer than a window" in line for line in src.report)
    # the batch of a step depends on (step, seed) only: not on train.steps (more steps = more blocks)
    longer = _sources(_cfg(corpus, steps=150, blend=cfg.data.blend, split="80,20,0"))
    e = longer.train.num_samples
    assert 150 * 8 > 2 * e
    for step in (0, 7, 19):
        assert torch.equal(longer.batch(step, 8).tokens, src.batch(step, 8).tokens)
    first = torch.stack([longer.train.sample(i)["tokens"] for i in range(e)])
    second = torch.stack([longer.train.sample(e + i)["tokens"] for i in range(e)])
    assert not torch.equal(first, second)   # the next block is another shuffle, not a replay
    assert sorted(map(tuple, first.tolist())) != sorted(map(tuple, second.tolist()))
    other_seed = _sources(_cfg(corpus, blend=cfg.data.blend, split="80,20,0").model_copy(
        update={"train": cfg.train.model_copy(update={"seed": 8})}))
    assert not torch.equal(other_seed.batch(0, 8).tokens, src.batch(0, 8).tokens)
    # DP ranks partition the global batch
    full = src.batch(5, 8)
    for r in range(2):
        part = src.batch(5, 8, r, 2)
        assert torch.equal(part.tokens, full.tokens[r::2]) and torch.equal(part.position_ids, full.position_ids[r::2])


def test_per_split_blends(corpus):
    tok = _tok(corpus["sp"], corpus["cache"])
    ids = {tuple(tok.encode(d) + [3]): src for src in ("a", "b") for d in corpus[src]}
    src = _sources(_cfg(corpus, train_blend=[str(corpus["root"] / "a")], valid_blend=[str(corpus["root"] / "b")]))
    assert src.test is None and src.valid.num_samples > 0
    for source, want in ((src.train, "a"), (src.valid, "b")):
        found = [ids[seg] for i in range(source.num_samples) for seg in _segments(source.sample(i))]
        assert found and set(found) == {want}


def _check_contract(batch, eod):
    """position_ids restart exactly after every EOD (and at the row start); cu_seqlens agrees."""
    starts = torch.zeros_like(batch.tokens, dtype=torch.bool)
    starts[:, 0] = True
    if eod is not None:
        starts[:, 1:] = batch.tokens[:, :-1] == eod
    assert torch.equal(batch.position_ids == 0, starts)
    doc = batch.document_ids()
    pos = torch.arange(batch.tokens.shape[1]).expand_as(doc)
    first = torch.zeros_like(pos)
    for r in range(pos.shape[0]):  # positions count up from each document's first column
        for d in range(int(doc[r].max()) + 1):
            first[r, doc[r] == d] = int(torch.nonzero(doc[r] == d)[0])
    assert torch.equal(batch.position_ids, pos - first)
    cu, longest = batch.cu_seqlens()
    assert cu.dtype == torch.int32 and int(cu[0]) == 0 and int(cu[-1]) == batch.tokens.numel()
    assert len(cu) - 1 == int(starts.sum()) and longest == int((cu[1:] - cu[:-1]).max())
    assert torch.equal(torch.nonzero(starts.reshape(-1)).flatten().int(), cu[:-1])


def test_batch_contract_for_every_source(corpus, tmp_path):
    from seqpar.data import MQARDataset, PackedTextDataset

    src = _sources(_cfg(corpus, blend=[str(corpus["root"] / "a")], split="1"))
    b = src.batch(2, 8)
    assert b.tokens.shape == (8, 32) and b.loss_mask.dtype == torch.float32 and bool((b.loss_mask == 1).all())
    assert int((b.tokens == 3).sum()) > 0
    _check_contract(b, 3)
    # the HF datasets source (local parquet, offline) tokenizes into the cache: the same stream as preprocess
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [""] + corpus["a"]}), tmp_path / "a.parquet")
    for files, key in (([str(tmp_path / "a.parquet")], "body"), ([str(corpus["root"] / "a.jsonl")], "text")):
        hf = _sources(_cfg(corpus, dataset="hf", files=files, json_key=key, split="1"))
        assert torch.equal(hf.batch(2, 8).tokens, b.tokens) and torch.equal(hf.batch(2, 8).position_ids, b.position_ids)
    tok = _tok(corpus["sp"], corpus["cache"])
    text = PackedTextDataset.from_documents(tok, corpus["b"], 32, seed=1).batch(0, 8)
    _check_contract(text, 3)
    mqar = MQARDataset(64, 40, 4, 4).batch(0, 3)
    _check_contract(mqar, None)
    tokens, labels, mask = b   # the (tokens, labels, loss_mask) triple engines take today
    assert tokens is b.tokens and torch.equal(labels[:, :-1], tokens[:, 1:])


def test_bad_input_table(corpus, tmp_path):
    from seqpar.train.config import RecipeError

    root = corpus["root"]
    no_eos = sentencepiece_model(tmp_path, corpus["a"], name="noeos", eos=False)
    missing = str(tmp_path / "nowhere" / "corpus")
    table = [
        ({"blend": [missing]}, f"data.blend: {missing}.bin not found; make it with: python -m seqpar.data.preprocess"),
        ({"blend": [str(root / "a")], "vocab_size": 256}, "set data.vocab_size >= 300"),
        ({"blend": [str(root / "a")], "tokenizer": str(no_eos)}, "has no EOS / end-of-document token"),
        ({"blend": [0.0, str(root / "a"), 1.0, str(root / "b")]}, "data.blend: weight 0.0 must be a finite number > 0"),
        ({"blend": [-1, str(root / "a")]}, "weight -1.0 must be a finite number > 0"),
        ({"blend": [0.5, str(root / "a"), str(root / "b")]}, "a number before every prefix"),
        ({"blend": [str(root / "a")], "split": "90;10"}, "data.split='90;10' does not parse"),
        ({"blend": [str(root / "a")], "split": "0,1,0"}, "the train share must be > 0"),
        ({"dataset": "hf", "files": [str(root / "a.jsonl")], "json_key": ""}, "data.json_key is empty"),
        ({"dataset": "hf", "files": [str(tmp_path / "none.jsonl")]}, "data.files: "),
        ({"blend": [str(root / "a")], "tokenizer": str(tmp_path / "none.model")}, "does not exist"),
        ({"blend": [str(root / "a")], "tokenizer": "train"}, "data.tokenizer='train' trains on the text dataset only"),
        ({"dataset": "text", "blend": [str(root / "a")], "tokenizer": "train"}, "data.blend is not used by"),
        ({"blend": [str(root / "a")], "train_blend": [str(root / "b")]}, "not both"),
    ]
    for data, want in table:
        with pytest.raises(RecipeError) as e:
            _cfg(corpus, **data)
        msg = str(e.value)
        assert want in msg and "\n" not in msg, (data, msg)
    # a split share that leaves a split without one window: named when the splits are measured
    from seqpar.data import prepare
    from seqpar.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.split='99.9,0.1,0'.*e.g. data.split='98,2,0'") as e:
        prepare(_cfg(corpus, blend=[str(root / "a")], split="99.9,0.1,0"), build=False)
    assert "\n" not in str(e.value) and "the valid split of" in str(e.value)


def _two_ranks_build(rank: int, world: int, cfg_json: str):
    """Both ranks build the sources with every cache missing; returns the wall-clock intervals of every
    collective this rank entered and of the cache build it ran (if any), and its batches."""
    import time

    import torch.distributed as dist

    from seqpar.data import build_sources, sources
    from seqpar.train.config import from_dict

    log = {"collectives": [], "builds": []}

    def timed(fn, key):
        def wrapper(*a, **kw):
            t0 = time.time()
            try:
                return fn(*a, **kw)
            finally:
                log[key].append((t0, time.time()))
        return wrapper

    for name in ("barrier", "all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list"):
        setattr(dist, name, timed(getattr(dist, name), "collectives"))
    sources._build_in_child = timed(sources._build_in_child, "builds")
    src = build_sources(from_dict(json.loads(cfg_json)))
    rows = src.batch(3, 8, rank, world).tokens
    every = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(every, rows)
    return log, torch.stack(every, 1).reshape(8, -1), src.batch(3, 8).tokens


def test_caches_built_once_across_ranks_with_no_collective_pending(corpus, tmp_path):
    from cp_harness import run_ranks

    cfg = _cfg(corpus, steps=100, blend=[str(corpus["root"] / "a")], split="95,5,0",
               cache_dir=str(tmp_path / "cache"))
    results = run_ranks(_two_ranks_build, 2, json.dumps(cfg.to_dict()), timeout=600)
    builds = [b for log, _, _ in results for b in log["builds"]]
    assert len(builds) == 1   # one rank built every cache (in a child process), the other waited on the lock
    (b0, b1), = builds
    for log, _, _ in results:   # no collective of either rank was pending while the caches were built
        assert log["collectives"] and all(e <= b0 or s >= b1 for s, e in log["collectives"]), (log, builds)
    gathered, full = results[0][1], results[0][2]
    assert torch.equal(gathered, full) and torch.equal(results[1][2], full)
    ref = _sources(_cfg(corpus, steps=100, blend=cfg.data.blend, split="95,5,0", cache_dir=str(tmp_path / "ref")))
    assert torch.equal(full, ref.batch(3, 8).tokens)
    blocks = sorted(p.name for p in (tmp_path / "cache" / "index").iterdir())
    assert len(blocks) == len(ref.train.datasets) >= 2 and not [b for b in blocks if b.startswith(".tmp")]


def test_unsafe_index_cache_is_refused(corpus, tmp_path):
    from seqpar.data import build_sources
    from seqpar.data.sources import UnsafeCacheError

    cfg = _cfg(corpus, blend=[str(corpus["root"] / "a")], split="1", cache_dir=str(tmp_path / "c"))
    _sources(cfg)
    victim = next((tmp_path / "c" / "index").glob("*/*shuffle_index.npy"))
    np.save(victim, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafeCacheError, match="holds Python objects"):
        build_sources(cfg)


def test_recipes_name_the_missing_corpus_and_the_commands(monkeypatch, tmp_path):
    from seqpar.train.config import RecipeError, load_recipe

    root = pathlib.Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)   # no data/ here
    for name in ("125m_s2_cp4", "7b_lightning_cp8"):
        recipe = root / "recipes" / f"{name}.yaml"
        assert load_recipe(recipe).data.dataset == "indexed"   # the schema alone does not look at files
        with pytest.raises(RecipeError) as e:
            load_recipe(recipe, check_files=True)
        lines = e.value.lines[0].splitlines()
        assert lines == [
            "data.blend: data/corpus.bin not found; make it with: python -m seqpar.data.preprocess --input "
            "corpus.jsonl --json-key text --tokenizer data/tokenizer.model --output-prefix data/corpus",
            "data.tokenizer='data/tokenizer.model' does not exist; give a sentencepiece .model file or a Hugging "
            "Face tokenizer folder (tokenizer.json), e.g. one trained on your corpus with: python -m "
            "seqpar.data.tokenizer --input corpus.jsonl --vocab-size 32000 --output data/tokenizer.model"], lines
