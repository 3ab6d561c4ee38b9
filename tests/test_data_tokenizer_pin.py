"""The tokenizer is pinned to the checkpoint: a Llama imported from a Hugging Face folder with its own
tokenizer (made here, no download) continues training on data tokenized with that tokenizer — the same
ids as Hugging Face's, its first loss the HF model's loss on that batch — and export writes the same
tokenizer back. Resuming with another tokenizer is refused naming data.tokenizer; changing the blend or
the split of a run past step 0 is refused naming the field."""

from __future__ import annotations

import pytest
import torch

from data_corpus import documents, hf_tokenizer, sentencepiece_model, write_jsonl

SET = ["data.seq_len=64", "data.global_batch=4", "train.progress=false", "parallel.backend=torch",
       "optim.warmup_steps=1", "data.split='90,10,0'"]


def _import_and_continue(rank: int, world: int, src: str, run: str, sets: list, other_tokenizer: str, rdv: str):
    """seqpar-import (in this process, without the harness's process group: import makes its own),
    prepare the data (no process group), then continue training on a fresh one-rank group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from seqpar.data import prepare
    from seqpar.export.from_hf import main as import_main
    from seqpar.megatron import disable_cpu_compat, init_parallel
    from seqpar.train.checkpoint import ResumeError
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import build_data, train

    dist.destroy_process_group()
    assert import_main([src, run, *[a for s in sets for a in ("--set", s)]]) == 0
    disable_cpu_compat()
    recipe = f"{run}/recipe.yaml"
    cfg = load_recipe(recipe, ["train.steps=2"], check_files=True)
    prepare(cfg, check=False)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=0, world_size=1)
    losses = train(cfg, resume=True)
    init_parallel(1, 1)
    data, _ = build_data(cfg)
    batch = data.batch(0, cfg.data.global_batch)
    parallel_state.destroy_model_parallel()
    # the same run resumed with another tokenizer (on text data, so no dataset is built): refused
    other = load_recipe(recipe, ["train.steps=3", "data.dataset=text", "data.blend=[]", "data.split=null",
                                 "data.max_bytes=20000", f"data.tokenizer={other_tokenizer}"])
    try:
        train(other, resume=True)
        refused = None
    except ResumeError as e:
        refused = str(e)
    disable_cpu_compat()
    return losses, batch.tokens, batch.labels, batch.position_ids, refused


def test_hf_import_train_export_keeps_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from seqpar.data import Tokenizer
    from seqpar.data.preprocess import preprocess
    from seqpar.export.hf import export
    from seqpar.train import checkpoint
    from seqpar.train.config import load_recipe

    docs = documents(120, seed=3)
    src = tmp_path / "llama"
    hf_tokenizer(src, docs)
    hf_tok = AutoTokenizer.from_pretrained(str(src))
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                      eos_token_id=hf_tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(src))
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    prefix = tmp_path / "corpus"
    preprocess([str(tmp_path / "corpus.jsonl")], str(src), str(prefix), progress=False, cache_dir=str(tmp_path / "c"))
    run = tmp_path / "run"
    sets = [*SET, "data.dataset=indexed", f"data.blend=[{prefix}]", f"data.cache_dir={tmp_path / 'c'}"]
    sp = sentencepiece_model(tmp_path, docs)
    from cp_harness import run_ranks

    losses, tokens, labels, positions, refused = run_ranks(_import_and_continue, 1, str(src), str(run), sets, str(sp),
                                                str(tmp_path / "rdv"), timeout=600)[0]
    step0 = run / "checkpoints" / "step_0000000"
    for name in ("tokenizer.json", "tokenizer_config.json"):   # pinned in the run folder and the checkpoint
        assert (run / "tokenizer" / name).read_bytes() == (src / name).read_bytes()
        assert (step0 / "tokenizer" / name).read_bytes() == (src / name).read_bytes()
    recipe = load_recipe(run / "recipe.yaml", ["train.steps=2"], check_files=True)
    assert recipe.data.tokenizer == str(run / "tokenizer") and recipe.data.vocab_size == 320
    tok = Tokenizer.load(recipe.data.tokenizer, tmp_path / "c")
    assert all(tok.encode(d) == hf_tok.encode(d, add_special_tokens=False) for d in docs)   # ids identical
    # continued training reads HF ids: the first loss is the imported model's loss on that batch, each
    # packed document run alone (document masking: position_ids restart at every document)
    hf = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = torch.cat([hf(row[None, a:b]).logits[0] for row, pos in zip(tokens, positions)
                            for starts in [(pos == 0).nonzero().flatten().tolist() + [len(row)]]
                            for a, b in zip(starts[:-1], starts[1:])])
    ref = torch.nn.functional.cross_entropy(logits, labels.reshape(-1)).item()
    assert len(losses) == 2 and abs(losses[0] - ref) <= 1e-4 * abs(ref), (losses, ref)
    whole = {tuple(hf_tok.encode(d, add_special_tokens=False) + [hf_tok.eos_token_id]) for d in docs}
    segs = []   # the whole documents inside each packed row (bounded by EOS on both sides)
    for row in tokens.tolist():
        eods = [i for i, t in enumerate(row) if t == hf_tok.eos_token_id]
        segs += [tuple(row[s + 1:e + 1]) for s, e in zip(eods, eods[1:])]
    assert segs and all(s in whole for s in segs)
    assert refused is not None and "data.tokenizer" in refused and "set data.tokenizer=" in refused, refused
    # export ships the same tokenizer
    out = export(run, tmp_path / "hf")
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    back = AutoTokenizer.from_pretrained(str(out))
    assert all(back.encode(d, add_special_tokens=False) == hf_tok.encode(d, add_special_tokens=False) for d in docs)
    assert LlamaConfig.from_pretrained(str(out)).eos_token_id == hf_tok.eos_token_id
    # resume refusals (checked before anything is loaded)
    step2 = checkpoint.latest(run / "checkpoints")
    with pytest.raises(checkpoint.ResumeError, match="data.tokenizer"):
        checkpoint.check_tokenizer(step2, Tokenizer.load(sp, tmp_path / "c"))
    checkpoint.check_tokenizer(step2, tok)
    saved = recipe.to_dict()
    saved["train"]["steps"] = 4
    for field, value in (("blend", [1.0, str(prefix), 1.0, str(tmp_path / "other")]), ("split", "80,20,0")):
        changed = {**saved, "data": {**saved["data"], field: value}}
        with pytest.raises(checkpoint.ConfigMismatchError, match=f"data stream differs.*\n  data.{field}"):
            checkpoint.check_resume(step2, changed)
        checkpoint.check_resume(step0, changed)   # step 0 (the import) may start on any data
