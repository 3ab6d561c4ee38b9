"""Export parity: the Hugging Face model's logits equal the training model's (megatron-core GPTModel
with seqpar layers) on the same tokens, fp32 max abs diff <= 1e-4, for every preset variant
(dense -> stock LlamaForCausalLM, s2, lightning, moh, hybrid -> SeqparForCausalLM) and for a
checkpoint saved at TP=2 x CP=2 (4 gloo ranks; the reference logits are gathered over TP and
un-sharded over CP from the 4-rank model itself) and one saved at PP=2 (2 ranks; the reference is the
two pipeline stages run one after the other). DeepSpeed checkpoints: tests/test_deepspeed_checkpoint.py.

Also: the checkpoint carries its tokenizer (``step_N/tokenizer/tokenizer.model``) and the exported tokenizer
encodes like the training sentencepiece model with its BOS/EOS/pad ids; the torch and seqpar-kernel
paths of the HF model agree."""

from __future__ import annotations

import pathlib

import pytest
import torch

from cp_harness import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEQ = 96  # 6 S2 blocks of 16: local window (2) and stride (4) columns both matter
BASE = ["model.preset=tiny", "data.dataset=text", "data.global_batch=2", "data.vocab_size=512",
        "data.max_bytes=60000", "train.steps=1", "optim.warmup_steps=1", "train.progress=false",
        "train.time_attention=false", "parallel.backend=torch", "train.save_every=0"]


def _cfg(out: str, cache: str, variant: str, pattern: str | None, tp: int, cp: int, seq: int, extra=()):
    from seqpar.train.config import load_recipe

    ovr = BASE + [f"data.seq_len={seq}", f"train.out_dir={out}", f"data.cache_dir={cache}", f"model.preset=tiny-{variant}",
                  f"parallel.tensor_parallel={tp}", f"parallel.context_parallel={cp}"]
    if pattern:
        ovr.append(f"model.pattern={pattern}")
    ovr += list(extra)
    return load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", ovr)


def _logits(cfg, tokens: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits [b, s, vocab] of the checkpointed model at the recipe's TP x CP layout."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from seqpar import cp
    from seqpar.megatron import init_parallel
    from seqpar.train import checkpoint
    from seqpar.train.loop import build_data, build_model
    from seqpar.train.runtime import local_batch

    init_parallel(cfg.parallel.tensor_parallel, cfg.parallel.context_parallel, seed=cfg.train.seed)
    _, vocab = build_data(cfg)
    model = build_model(cfg, vocab)[0]
    checkpoint.load(checkpoint.latest(pathlib.Path(cfg.train.out_dir) / "checkpoints"), [model])  # model only
    model.eval()
    batch = local_batch(tokens, tokens, torch.ones_like(tokens, dtype=torch.float32))
    tok = batch["tokens"]
    with torch.no_grad():
        pos = torch.arange(tok.shape[1]).expand_as(tok)
        out = model(tok, pos, None)  # [b, s_local, vocab / tp]
        out = gather_from_tensor_model_parallel_region(out.contiguous())
        if cfg.parallel.context_parallel > 1:
            out = cp.unshard(out, parallel_state.get_context_parallel_group(), dim=1, balance="zigzag")
    parallel_state.destroy_model_parallel()
    return out


def _train_variants(rank: int, world: int, root: str, runs: list, tokens: torch.Tensor):
    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.loop import train

    out = {}
    for name, variant, pattern, tp, cp, *extra in runs:
        cfg = _cfg(f"{root}/{name}", f"{root}/spm", variant, pattern, tp, cp, tokens.shape[1], *extra)
        train(cfg)
        out[name] = _logits(cfg, tokens)
    disable_cpu_compat()
    return out


def _tokens(seq: int = SEQ) -> torch.Tensor:
    return torch.randint(4, 512, (2, seq), generator=torch.Generator().manual_seed(7))


VARIANTS = [("dense", "dense", None), ("s2", "s2", None), ("lightning", "lightning", None), ("moh", "moh", None),
            ("hybrid", "hybrid", None)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_parity")
    tokens = _tokens()
    runs = [(n, v, p, 1, 1) for n, v, p in VARIANTS]
    runs.append(("dense-window", "dense", None, 1, 1, ["model.softmax_window=24"]))  # below SEQ: the window matters
    runs.append(("hybrid-window", "hybrid", None, 1, 1, ["model.softmax_window=24"]))
    ref = run_ranks(_train_variants, 1, str(root), runs, tokens, timeout=600)[0]
    return root, tokens, ref


def _hf_logits(folder: pathlib.Path, tokens: torch.Tensor, **kw) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32, **kw)
    model.eval()
    with torch.no_grad():
        return model(tokens, use_cache=False).logits, model


@pytest.mark.parametrize("name", [v[0] for v in VARIANTS])
def test_variant_logits_match_training(trained, name, tmp_path):
    from seqpar.export.hf import export

    root, tokens, ref = trained
    out = export(root / name, tmp_path / "hf")  # the run folder
    logits, model = _hf_logits(out, tokens)
    assert type(model).__name__ == ("LlamaForCausalLM" if name == "dense" else "SeqparForCausalLM")
    assert (out / "modeling_seqpar.py").exists() == (name != "dense")
    diff = (logits - ref[name]).abs().max().item()
    assert diff <= 1e-4, (name, diff)


def test_windowed_softmax_exports_as_mistral(trained, tmp_path):
    """model.softmax_window on a pure-softmax model: stock MistralForCausalLM with that
    sliding_window, logits equal to the training model's (a Llama export would attend past the
    window and differ)."""
    from seqpar.export.hf import export

    root, tokens, ref = trained
    out = export(root / "dense-window", tmp_path / "hf")
    logits, model = _hf_logits(out, tokens)
    assert type(model).__name__ == "MistralForCausalLM" and model.config.sliding_window == 24
    assert (logits - ref["dense-window"]).abs().max().item() <= 1e-4


def test_windowed_hybrid_exports_as_seqpar_with_the_window(trained, tmp_path):
    """model.softmax_window on a hybrid model: SeqparForCausalLM with config.softmax_window; logits
    equal the training model's in the torch path and the seqpar-kernel path (the window matters:
    the hybrid model without it differs), and cached generation equals the full pass while the
    softmax layer's cache holds only the last W - 1 tokens; the window survives save / load."""
    from transformers import DynamicCache

    from seqpar.export.hf import export

    root, tokens, ref = trained
    out = export(root / "hybrid-window", tmp_path / "hf")
    logits, model = _hf_logits(out, tokens)
    assert type(model).__name__ == "SeqparForCausalLM" and model.config.softmax_window == 24
    assert (logits - ref["hybrid-window"]).abs().max().item() <= 1e-4
    assert (logits - _hf_logits(out, tokens, kernel_backend="seqpar")[0]).abs().max().item() <= 1e-4
    assert (logits - _hf_logits(out, tokens, softmax_window=None)[0]).abs().max().item() > 1e-3
    # a prefill of 40 tokens, then one token at a time past the window: the logits of the full pass
    cache, steps = DynamicCache(config=model.config), []
    with torch.no_grad():
        steps.append(model(tokens[:, :40], past_key_values=cache, use_cache=True).logits)
        for i in range(40, 70):
            steps.append(model(tokens[:, i:i + 1], past_key_values=cache, use_cache=True).logits)
    assert (torch.cat(steps, dim=1) - logits[:, :70]).abs().max().item() <= 1e-4
    a = model.config.layer_pattern.index("A")
    assert cache.layers[a].keys.shape[2] == 23 and cache.get_seq_length(a) == 70
    model.save_pretrained(tmp_path / "again")
    assert _hf_logits(tmp_path / "again", tokens)[1].config.softmax_window == 24


def test_kernel_path_and_sharded_weights(trained, tmp_path):
    """config.kernel_backend="seqpar" runs seqpar.kernels (torch backend on CPU) for full passes;
    a small --max-shard-size writes several safetensors files plus the index, loaded as one model."""
    from seqpar.export.hf import export

    root, tokens, ref = trained
    out = export(root / "hybrid" / "checkpoints" / "latest", tmp_path / "hf", max_shard_size="200KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    logits, _ = _hf_logits(out, tokens, kernel_backend="seqpar")
    assert (logits - ref["hybrid"]).abs().max().item() <= 1e-4


def test_checkpoint_carries_tokenizer_and_hf_tokenizer_matches(trained, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from seqpar.export.hf import export
    from seqpar.export.reader import resolve_step_dir

    root, _, _ = trained
    step = resolve_step_dir(root / "hybrid")
    assert (step / "tokenizer" / "tokenizer.model").is_file()
    sp = spm.SentencePieceProcessor(model_file=str(step / "tokenizer" / "tokenizer.model"))
    out = export(step, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "import os\n\ndef main(argv):\n    return len(argv)  # count\n"
    assert tok(text)["input_ids"] == sp.encode(text)  # no BOS added: training packs plain encodings
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (sp.bos_id(), sp.eos_id(), sp.pad_id())
    assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    import json

    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (sp.bos_id(), sp.eos_id(), sp.pad_id())
    card = (out / "README.md").read_text()
    assert "tokens seen: 192" in card and "final training loss: " in card and "not recorded" not in card


def test_tp2_cp2_checkpoint_exports_exactly(tmp_path):
    from seqpar.export.hf import export

    tokens = _tokens(128)  # S2 under CP=2: a multiple of 2 x CP x block = 64
    # MoH needs TP=1; S2 under TP x CP keeps the head stride exact only for vert_stride <= heads / TP
    runs = [("tp2cp2", "hybrid", "ASL", 2, 2, ["model.s2_vert_stride=2"])]
    res = run_ranks(_train_variants, 4, str(tmp_path), runs, tokens, timeout=600)
    ref = res[0]["tp2cp2"]
    for r in res[1:]:
        assert torch.equal(r["tp2cp2"], ref)
    from seqpar.export.reader import read_checkpoint

    ck = read_checkpoint(tmp_path / "tp2cp2", with_tensors=False)
    assert ck.layout["tensor_parallel"] == 2 and ck.layout["context_parallel"] == 2
    out = export(tmp_path / "tp2cp2", tmp_path / "hf")
    logits, _ = _hf_logits(out, tokens)
    assert (logits - ref).abs().max().item() <= 1e-4


def _pp_logits(cfg, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits [b, s, vocab] of the checkpointed model run as its two pipeline stages (PP=2, this rank's
    stage loaded from the checkpoint): stage 0's hidden states [s, b, h] are sent to stage 1, which
    returns the logits; None on stage 0."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from seqpar.megatron import init_parallel
    from seqpar.train import checkpoint
    from seqpar.train.loop import build_data, build_model

    init_parallel(1, 1, cfg.parallel.pipeline_parallel, seed=cfg.train.seed)
    _, vocab = build_data(cfg)
    model = build_model(cfg, vocab)[0]
    checkpoint.load(checkpoint.latest(pathlib.Path(cfg.train.out_dir) / "checkpoints"), [model])  # model only
    model.eval()
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    out = None
    with torch.no_grad():
        if parallel_state.is_pipeline_first_stage():
            dist.send(model(tokens, pos, None).contiguous(), dst=1)  # [s, b, h]
        else:
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
            dist.recv(hidden, src=0)
            model.set_input_tensor(hidden)
            out = model(tokens, pos, None)  # [b, s, vocab]
    parallel_state.destroy_model_parallel()
    return out


def _train_pp(rank: int, world: int, root: str, tokens: torch.Tensor):
    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.loop import train

    cfg = _cfg(f"{root}/pp2", f"{root}/spm", "hybrid", None, 1, 1, tokens.shape[1], ["parallel.pipeline_parallel=2"])
    train(cfg)
    out = _pp_logits(cfg, tokens)
    disable_cpu_compat()
    return out


def test_pp2_checkpoint_exports_exactly(tmp_path):
    """A checkpoint saved at PP=2 (2 ranks, two layers per stage) exports to the same logits as the two
    pipeline stages of the training model compute."""
    from seqpar.export.hf import export
    from seqpar.export.reader import read_checkpoint

    tokens = _tokens()
    res = run_ranks(_train_pp, 2, str(tmp_path), tokens, timeout=600)
    assert res[0] is None and res[1] is not None
    ck = read_checkpoint(tmp_path / "pp2", with_tensors=False)
    assert ck.layout["pipeline_parallel"] == 2
    out = export(tmp_path / "pp2", tmp_path / "hf")
    logits, _ = _hf_logits(out, tokens)
    assert (logits - res[1]).abs().max().item() <= 1e-4
