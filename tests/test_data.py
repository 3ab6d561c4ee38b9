"""seqpar.data: tokenizer trained once on local text and cached; packed windows addressed by step
(DP ranks partition the global batch); MQAR answers are the values bound earlier."""

from __future__ import annotations

import pytest
import torch

from seqpar.data import MQARDataset, PackedTextDataset, get_tokenizer, load_text, stdlib_corpus


def test_tokenizer_trained_once_and_cached(tmp_path):
    text = stdlib_corpus(200_000)
    assert len(text) == 200_000
    sp = get_tokenizer(512, text, tmp_path)
    models = list(tmp_path.glob("spm_512_*.model"))
    assert len(models) == 1 and sp.vocab_size() == 512
    mtime = models[0].stat().st_mtime_ns
    sp2 = get_tokenizer(512, text, tmp_path)
    assert models[0].stat().st_mtime_ns == mtime  # loaded, not retrained
    sample = "def f(x):\n    return x + 1  # ünïcode"
    assert sp2.decode(sp2.encode(sample)) == sample  # byte fallback: lossless
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no temp folder left


def test_load_text_from_files(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world\n" * 10)
    assert load_text([str(f)], 30) == ("hello world\n" * 10)[:30]
    with pytest.raises(ValueError, match="text_files"):
        load_text([str(tmp_path / "missing.txt")], 10)


def test_packed_windows_by_step_and_rank():
    ids = torch.arange(1000)
    ds = PackedTextDataset(ids, seq_len=15, seed=1)
    tok, lab, mask = ds.batch(step=3, global_batch=4)
    assert tok.shape == (4, 15) and torch.equal(lab[:, :-1], tok[:, 1:]) and torch.equal(lab[:, -1], tok[:, -1] + 1)
    assert mask.sum() == 60
    assert all(int(t[0]) % 15 == 0 for t in tok)  # whole windows
    r0, r1 = ds.batch(3, 4, rank=0, ranks=2).tokens, ds.batch(3, 4, rank=1, ranks=2).tokens
    assert torch.equal(torch.stack([r0[0], r1[0], r0[1], r1[1]]), tok)
    assert torch.equal(ds.batch(3, 4).tokens, tok)  # deterministic
    assert not torch.equal(ds.batch(4, 4).tokens, tok)
    # one epoch visits every window once
    seen = torch.cat([ds.batch(s, 6).tokens[:, 0] for s in range(ds.num_windows // 6)])
    assert len(set(seen.tolist())) == len(seen)
    with pytest.raises(ValueError, match="seq_len"):
        PackedTextDataset(torch.arange(10), seq_len=10)


def test_mqar_answers_are_bound_values():
    ds = MQARDataset(vocab_size=64, seq_len=40, num_pairs=6, num_queries=5, seed=2)
    tok, lab, mask = ds.batch(0, 3)
    assert tok.shape == lab.shape == mask.shape == (3, 40)
    assert mask.sum() == 15
    for t, l, m in zip(tok, lab, mask):
        bound = {int(t[2 * i]): int(t[2 * i + 1]) for i in range(6)}
        assert len(bound) == 6 and all(4 <= k < 32 <= v < 64 for k, v in bound.items())
        for pos in torch.nonzero(m).flatten().tolist():
            assert int(l[pos]) == bound[int(t[pos])]
    assert torch.equal(ds.batch(0, 3).tokens, tok)
    assert torch.equal(ds.batch(0, 3).position_ids, torch.arange(40).expand(3, 40))  # one document per row
    with pytest.raises(ValueError, match="seq_len"):
        MQARDataset(64, 10, num_pairs=6, num_queries=5)


def test_documents_joined_by_eos(tmp_path):
    # issue 10 item 10: the stream is documented as documents joined by EOS; none was inserted
    from seqpar.data import encode_documents, load_documents

    files = []
    for i, text in enumerate(("alpha beta\n", "gamma\n", "delta epsilon zeta\n")):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(text)
    docs = load_documents([str(f) for f in files], 1000)
    assert docs == ["alpha beta\n", "gamma\n", "delta epsilon zeta\n"]
    assert load_documents([str(f) for f in files], 14) == ["alpha beta\n", "gam"]   # max_bytes total
    from seqpar.data import Tokenizer

    sp = get_tokenizer(512, stdlib_corpus(200_000), tmp_path / "tok")
    tok = Tokenizer({"tokenizer.model": sp.serialized_model_proto()}, "test", tmp_path / "tok")
    ids = encode_documents(tok, docs)
    eos = sp.eos_id()
    ends = torch.nonzero(ids == eos).flatten().tolist()
    assert len(ends) == 3 and ends[-1] == len(ids) - 1
    pieces = torch.tensor_split(ids, [e + 1 for e in ends[:-1]])
    assert [sp.decode(p[:-1].tolist()) for p in pieces] == docs   # each document, then one EOS
    ds = PackedTextDataset.from_documents(tok, docs, seq_len=4)
    assert torch.equal(ds.ids, ids)
    # positions restart after every EOS (the EOS is its document's last token)
    b = ds.batch(0, ds.num_windows)
    starts = torch.zeros_like(b.tokens, dtype=torch.bool)
    starts[:, 1:] = b.tokens[:, :-1] == eos
    starts[:, 0] = True
    assert torch.equal(b.position_ids == 0, starts)
    stdlib_docs = load_documents(None, 50_000)
    assert len(stdlib_docs) > 1 and sum(map(len, stdlib_docs)) == 50_000


def test_build_data_stream_has_an_eos_after_every_document(tmp_path, monkeypatch):
    import torch.distributed as dist

    from seqpar.train import loop
    from seqpar.train.config import from_dict

    text = stdlib_corpus(90_000)
    for i in range(3):   # three documents, enough text for a 512-piece tokenizer
        (tmp_path / f"d{i}.txt").write_text(text[i * 30_000:(i + 1) * 30_000])
    cfg = from_dict({"data": {"dataset": "text", "vocab_size": 512, "seq_len": 16, "global_batch": 2,
                              "text_files": [str(tmp_path / f"d{i}.txt") for i in range(3)],
                              "cache_dir": str(tmp_path / "cache")}})
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    monkeypatch.setattr(dist, "barrier", lambda *a: None)
    data, vocab = loop.build_data(cfg)
    ds = data.train
    assert vocab == 512 and int((ds.ids == 3).sum()) == 3 and int(ds.ids[-1]) == 3   # sentencepiece eos_id=3
    assert data.tokenizer.kind == "sentencepiece" and data.tokenizer.eod == 3 and data.valid is None
