"""Import: ``python -m seqpar.export.from_hf`` turns a tiny ``LlamaForCausalLM`` (made here, no
download) into a seqpar run folder that training resumes from — its first training loss is the HF
model's loss on the same batch — and HF -> seqpar -> HF is bit-exact for softmax. Converting
softmax layers to S2 / Lightning keeps q/k/v/o (S2 equals softmax inside its local window)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from cp_harness import run_ranks

SET = ["--set", "data.seq_len=32", "--set", "data.global_batch=2", "--set", "data.max_bytes=40000",
       "--set", "train.progress=false", "--set", "parallel.backend=torch", "--set", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> pathlib.Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms away from 1 so a mixed-up norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("llama") / "src"
    model.save_pretrained(str(out))
    return out


def _import(src: pathlib.Path, run: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "seqpar.export.from_hf", str(src), str(run), *SET, *args],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _safetensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def _resume(rank: int, world: int, recipe: str, cache: str):
    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import build_data, train

    cfg = load_recipe(recipe, ["train.steps=2", f"data.cache_dir={cache}"])
    losses = train(cfg, resume=True)
    from seqpar.megatron import init_parallel
    from megatron.core import parallel_state

    init_parallel(1, 1)
    data, _ = build_data(cfg)
    tokens, labels, _ = data.batch(0, cfg.data.global_batch)
    parallel_state.destroy_model_parallel()
    disable_cpu_compat()
    return losses, tokens, labels


def test_roundtrip_bit_exact_and_trains_on(llama, tmp_path):
    from transformers import LlamaForCausalLM

    from seqpar.export.hf import export

    run = tmp_path / "run"
    res = _import(llama, run)
    assert "continue training" in res.stdout
    assert (run / "recipe.yaml").is_file() and (run / "checkpoints" / "latest").read_text() == "step_0000000"
    back = export(run, tmp_path / "back", allow_no_tokenizer=True)  # the tiny Llama ships no tokenizer
    src, dst = _safetensors(llama), _safetensors(back)
    assert sorted(src) == sorted(dst)
    for k in src:
        assert src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]), k
    assert not (back / "modeling_seqpar.py").exists()  # stock Llama, no custom code
    # continue pretraining: the first loss is the imported model's loss on that batch
    losses, tokens, labels = run_ranks(_resume, 1, str(run / "recipe.yaml"), str(tmp_path / "spm"), timeout=300)[0]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    hf = LlamaForCausalLM.from_pretrained(str(llama), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(tokens).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()
    assert abs(losses[0] - ref) <= 1e-4 * abs(ref), (losses[0], ref)
    assert losses[1] != losses[0]
    # the run was trained on: --force must not delete it (only an earlier import, untouched, is replaced)
    from seqpar.export import ExportError
    from seqpar.export.from_hf import import_hf

    with pytest.raises(ExportError, match=r"holds files that the earlier seqpar\.export\.from_hf did not write"):
        import_hf(llama, run, force=True)
    assert (run / "checkpoints" / "latest").read_text() == "step_0000002"


def test_convert_layers_to_s2_and_lightning(llama, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from seqpar.export.hf import export

    _import(llama, tmp_path / "sl", "--pattern", "SL")
    out = export(tmp_path / "sl", tmp_path / "sl_hf", allow_no_tokenizer=True)
    src, dst = _safetensors(llama), _safetensors(out)
    for i in range(4):
        for p in ("q", "k", "v", "o"):
            key = f"model.layers.{i}.self_attn.{p}_proj.weight"
            assert torch.equal(src[key], dst[key]), key
    assert torch.equal(dst["model.layers.1.self_attn.g_proj.weight"], torch.zeros(64, 64))
    assert torch.equal(dst["model.layers.1.self_attn.norm_weight"], torch.ones(64))
    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32)
    assert model.config.layer_pattern == "SLSL"
    # all-S2: inside the local window (2 blocks of 16) S2 reads every earlier token = softmax
    _import(llama, tmp_path / "s", "--pattern", "S")
    s2 = AutoModelForCausalLM.from_pretrained(str(export(tmp_path / "s", tmp_path / "s_hf", allow_no_tokenizer=True)), trust_remote_code=True,
                                              dtype=torch.float32).eval()
    ref = LlamaForCausalLM.from_pretrained(str(llama), dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (s2(ids).logits - ref(ids).logits).abs().max().item() <= 1e-4


def test_import_errors(llama, tmp_path):
    import json

    from seqpar.export import ExportError
    from seqpar.export.from_hf import import_hf

    with pytest.raises(ExportError, match="cannot be added"):
        import_hf(llama, tmp_path / "x", pattern="AH")
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((llama / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    (bad / "model.safetensors").write_bytes((llama / "model.safetensors").read_bytes())
    with pytest.raises(ExportError, match="Llama-architecture"):
        import_hf(bad, tmp_path / "x")
    # Mistral = Llama's weights + a sliding window: imported as the recipe's model.softmax_window
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral", "sliding_window": 24}))
    import_hf(bad, tmp_path / "mistral")
    assert "softmax_window: 24" in (tmp_path / "mistral" / "recipe.yaml").read_text()
    (bad / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6}))
    with pytest.raises(ExportError, match="rms_norm_eps"):
        import_hf(bad, tmp_path / "x")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ExportError, match="--force"):
        import_hf(llama, tmp_path / "exists")
    assert not (tmp_path / "x").exists()
