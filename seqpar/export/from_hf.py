"""``python -m seqpar.export.from_hf HF_DIR OUT_RUN`` (also ``seqpar-import``): a Llama-architecture
Hugging Face model to a seqpar run folder that training continues from.

OUT_RUN gets ``checkpoints/step_0000000`` (model weights; AdamW moments at zero and step 0, i.e. a
fresh optimizer), ``tokenizer/`` (the HF folder's own tokenizer: ``tokenizer.json`` + its config, or
``tokenizer.model``; also pinned in the checkpoint) and ``recipe.yaml`` (``train.out_dir`` = OUT_RUN,
``data.tokenizer`` = OUT_RUN/tokenizer, ``data.vocab_size`` = the model's), so continued pretraining
encodes text into the ids the imported embeddings were trained on::

    python -m seqpar.train OUT_RUN/recipe.yaml --resume --set train.steps=1000

Any Llama shape (a size preset when one matches, else ``model.num_layers`` / ``hidden_size`` /
``num_attention_heads`` / ``num_kv_heads`` / ``ffn_hidden_size`` in the recipe); it must use RMSNorm
eps 1e-5, default RoPE with theta 10000, a SiLU MLP and no biases (else the function would change).

**Converting layers** (``--pattern``, letters tiled over the layers, default all ``A``): ``S``
layers keep the softmax layer's q/k/v/o weights and attend only to the S2 layout's blocks
(``--set model.s2_block_size=...`` etc.); ``L`` layers become Lightning layers with the same
q/k/v/o weights, the output gate projection at zero (gate 0.5 everywhere) and the per-head output
norm at one — the linearisation recipe of papers that turn pretrained softmax models into linear
ones (reuse the projections, add the new parts neutrally, then continue training). ``H`` (MoH) is
not offered: a router cannot be added without changing which heads run.

HF -> seqpar -> HF (``python -m seqpar.export.hf``) is bit-exact for the softmax case.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Optional

import torch

from seqpar.export.convert import ROPE_THETA, ModelSpec, hf_to_megatron
from seqpar.export.output import check_out_dir, install
from seqpar.export.reader import ExportError

TOOL = "seqpar.export.from_hf"


def _read_hf(hf_dir: pathlib.Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_file = hf_dir / "config.json"
    if not cfg_file.is_file():
        raise ExportError(f"{hf_dir} has no config.json; pass a Hugging Face model folder")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type") not in ("llama", "mistral"):
        raise ExportError(f"{hf_dir}: model_type {cfg.get('model_type')!r} is not supported; import takes "
                          f"Llama-architecture models (model_type 'llama', or 'mistral': Llama's weights with a "
                          f"sliding window, imported as model.softmax_window)")
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{hf_dir} has no *.safetensors weights (pytorch_model.bin is not read: it is a pickle)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return cfg, tensors


def _check_llama(cfg: dict) -> None:
    rope = cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": cfg.get("rope_theta", ROPE_THETA)}
    checks = [("hidden_act", cfg.get("hidden_act", "silu") == "silu", "silu"),
              ("attention_bias", not cfg.get("attention_bias", False), "false"),
              ("mlp_bias", not cfg.get("mlp_bias", False), "false"),
              ("rms_norm_eps", abs(float(cfg.get("rms_norm_eps", 1e-6)) - 1e-5) < 1e-12, "1e-05 (megatron-core's)"),
              ("rope_parameters.rope_type", rope.get("rope_type", "default") == "default", "default"),
              ("rope_parameters.rope_theta", float(rope.get("rope_theta", ROPE_THETA)) == ROPE_THETA, str(ROPE_THETA))]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    checks.append(("head_dim", head_dim * cfg["num_attention_heads"] == cfg["hidden_size"],
                   "hidden_size / num_attention_heads"))
    for name, ok, want in checks:
        if not ok:
            raise ExportError(f"HF config {name} must be {want} for a seqpar model; this model cannot be imported "
                              f"without changing its function")


def _shape(cfg: dict) -> dict:
    """The recipe's model section for this HF shape: a size preset when one matches, else the
    tiny preset with every shape field overridden."""
    from seqpar.models import SIZES

    shape = {"num_layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
             "num_attention_heads": cfg["num_attention_heads"],
             "num_kv_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
             "ffn_hidden_size": cfg["intermediate_size"]}
    for name, p in SIZES.items():
        if (p.num_layers, p.hidden_size, p.num_attention_heads, p.num_query_groups, p.ffn_hidden_size) == \
                tuple(shape.values()):
            return {"preset": f"{name}-dense"}
    return {"preset": "tiny-dense", **shape}


def convert_layers(hf: dict[str, torch.Tensor], pattern: str, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Add the parameters that ``L`` layers have and softmax layers lack (see the module docstring)."""
    out = dict(hf)
    for i, c in enumerate(pattern):
        if c == "L":
            h = f"model.layers.{i}.self_attn."
            out[h + "g_proj.weight"] = torch.zeros_like(hf[h + "q_proj.weight"])
            out[h + "norm_weight"] = torch.ones(spec.num_heads * spec.head_dim, dtype=hf[h + "q_proj.weight"].dtype)
    return out


def _to_param_names(meg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint keys (megatron's sharded keys) -> GPTModel parameter names at TP=1."""
    out: dict[str, torch.Tensor] = {}
    qkvg: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in meg.items():
        if k.endswith("self_attention.linear_qkv.layer_norm_weight"):
            out[k.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")] = v
        elif k.endswith("mlp.linear_fc1.layer_norm_weight"):
            out[k.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")] = v
        elif ".linear_qkvg.weight." in k:
            base, part = k.rsplit(".", 1)
            qkvg.setdefault(base, {})[part] = v
        else:
            out[k] = v
    for base, parts in qkvg.items():
        out[base] = torch.cat([parts["q"], parts["k"], parts["v"], parts["gate"]])
    return out


def _write_checkpoint(cfg, weights: dict[str, torch.Tensor], tokenizer, ckpt_dir: pathlib.Path) -> pathlib.Path:
    """Build the recipe's model in a one-process group of its own (``seqpar.megatron.init_parallel``
    with a file rendezvous; call this in a process without one, as the CLI does), load ``weights``,
    save step 0."""
    from megatron.core import parallel_state

    from seqpar.megatron import init_parallel
    from seqpar.megatron.cpu_compat import cpu_compat_enabled, disable_cpu_compat
    from seqpar.megatron.parallel import destroy_parallel
    from seqpar.train import checkpoint
    from seqpar.train.loop import _rng_state
    from seqpar.train.megatron_engine import build_optimizer, wrap_ddp
    from seqpar.train.runtime import build_model

    if parallel_state.model_parallel_is_initialized():
        raise ExportError("import writes its checkpoint from a one-process group of its own; run it in a process "
                          "without megatron process groups (python -m seqpar.export.from_hf)")
    rdv = tempfile.mkdtemp(prefix="seqpar_import_")
    compat_before = cpu_compat_enabled()
    try:
        init_parallel(1, 1, seed=cfg.train.seed, init_method=f"file://{rdv}/rdv", rank=0, world_size=1)
        chunks = build_model(cfg, cfg.data.vocab_size)
        params = dict(chunks[0].named_parameters())
        if set(params) != set(weights):
            raise ExportError(f"converted weights do not fit the seqpar model: missing "
                              f"{sorted(set(params) - set(weights))[:4]}, extra {sorted(set(weights) - set(params))[:4]}")
        with torch.no_grad():
            for n, p in params.items():
                if p.shape != weights[n].shape:
                    raise ExportError(f"{n}: HF tensor shape {tuple(weights[n].shape)} != model {tuple(p.shape)}")
                p.copy_(weights[n])
        # the weights go in before the optimizer copies them into its fp32 main weights
        model = wrap_ddp(cfg, chunks)
        opt, _ = build_optimizer(cfg, model)
        checkpoint.init_optimizer_state(opt)  # a fresh optimizer, written out: zero moments at step 0
        path = checkpoint.save(ckpt_dir, 0, model, opt,
                               rng=_rng_state(), config=cfg.to_dict(), tokenizer=tokenizer)
        return path
    finally:
        destroy_parallel()
        if not compat_before:  # leave the process as it was (import_hf is also called in-process)
            disable_cpu_compat()
        shutil.rmtree(rdv, ignore_errors=True)


def _hf_tokenizer(hf_dir: pathlib.Path, vocab: int):
    """The HF folder's tokenizer (``tokenizer.json`` + config, or ``tokenizer.model``) as a
    ``seqpar.data.Tokenizer``, or None when the folder has none (training then trains one, whose ids
    do not match the imported embeddings: a warning says so)."""
    from seqpar.data.tokenizer import HF_FILES, SP_MODEL, Tokenizer, TokenizerError

    if not ((hf_dir / HF_FILES[0]).is_file() or (hf_dir / SP_MODEL).is_file()):
        print(f"[seqpar.export] warning: {hf_dir} has no tokenizer ({HF_FILES[0]} or {SP_MODEL}); continued training "
              f"trains a new one, whose ids do not match the imported embeddings", file=sys.stderr)
        return None
    try:
        tok = Tokenizer.load(hf_dir, field="the HF folder's tokenizer")
        tok.require_eod("the HF folder's tokenizer")
    except TokenizerError as e:
        raise ExportError(str(e)) from None
    if tok.vocab_size > vocab:
        raise ExportError(f"{hf_dir}: the tokenizer has {tok.vocab_size} ids, more than the model's vocab_size {vocab}")
    return tok


def import_hf(hf_dir: str | pathlib.Path, out_run: str | pathlib.Path, *, pattern: str = "A",
              overrides: Optional[list[str]] = None, force: bool = False) -> pathlib.Path:
    """Write a seqpar run folder (checkpoint step 0 + recipe.yaml) for the HF model in ``hf_dir``.

    Args:
        hf_dir: Hugging Face folder of a ``LlamaForCausalLM`` or ``MistralForCausalLM`` (safetensors
            weights; Mistral's ``sliding_window`` becomes the recipe's ``model.softmax_window``).
        out_run: destination run folder (must not exist unless ``force``); written atomically.
        pattern: layer kinds, tiled (A keep softmax, S convert to S2, L convert to Lightning).
        overrides: extra recipe ``section.field=value`` settings (e.g. ``data.seq_len=256``).

    Returns the step folder.
    """
    import yaml

    from seqpar.megatron.config import layer_pattern
    from seqpar.train.config import from_dict

    hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(out_run).absolute()
    check_out_dir(out, force=force, tool=TOOL)  # --force: only an earlier import that was not trained on
    bad = sorted(set(pattern) - {"A", "S", "L"})
    if bad:
        raise ExportError(f"--pattern {pattern!r}: import converts softmax layers to A (keep), S (S2) or L "
                          f"(Lightning); {bad} cannot be added to a pretrained model")
    cfg_hf, hf = _read_hf(hf_dir)
    _check_llama(cfg_hf)
    vocab = int(cfg_hf["vocab_size"])
    tok = _hf_tokenizer(hf_dir, vocab)
    if "lm_head.weight" not in hf:  # tied embeddings: seqpar keeps an untied output layer, same values
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"].clone()
    tree: dict = {"model": {**_shape(cfg_hf), "pattern": pattern,
                            "dtype": "bf16" if cfg_hf.get("dtype", cfg_hf.get("torch_dtype")) == "bfloat16" else "fp32"},
                  "data": {"vocab_size": vocab, **({"tokenizer": str(out / "tokenizer")} if tok else {})},
                  "parallel": {"context_parallel": 1},
                  "train": {"out_dir": str(out), "steps": 1}}
    if cfg_hf.get("model_type") == "mistral" and cfg_hf.get("sliding_window") is not None:
        tree["model"]["softmax_window"] = int(cfg_hf["sliding_window"])  # keys i - W < j <= i, as Mistral's
    for item in overrides or []:
        if "=" not in item:
            raise ExportError(f"--set expects section.field=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    tree["train"]["out_dir"] = str(out)
    try:
        cfg = from_dict(tree)
    except ValueError as e:
        raise ExportError(f"recipe for the imported model: {e}") from e
    full = layer_pattern(cfg.model.pattern or "A", cfg_hf["num_hidden_layers"])
    spec = ModelSpec(num_layers=cfg_hf["num_hidden_layers"], hidden_size=cfg_hf["hidden_size"],
                     num_heads=cfg_hf["num_attention_heads"],
                     num_kv_heads=cfg_hf.get("num_key_value_heads") or cfg_hf["num_attention_heads"],
                     ffn_hidden_size=cfg_hf["intermediate_size"], pattern=full, vocab_size=vocab,
                     max_position_embeddings=cfg_hf.get("max_position_embeddings", 2048))
    weights = _to_param_names(hf_to_megatron(convert_layers(hf, full, spec), spec))
    dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
    weights = {k: v.to(dtype) for k, v in weights.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp_import_{out.name}_", dir=out.parent))
    try:
        if tok is not None:
            tok.save(tmp / "tokenizer")
        step = _write_checkpoint(cfg, weights, tok, tmp / "checkpoints")
        (tmp / "recipe.yaml").write_text(
            f"# imported from {hf_dir.absolute()} by python -m seqpar.export.from_hf; continue with\n"
            f"#   python -m seqpar.train {out / 'recipe.yaml'} --resume --set train.steps=N\n"
            + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        install(tmp, out, TOOL)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "checkpoints" / step.name


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m seqpar.export.from_hf",
                                 description="Import a Llama-architecture Hugging Face model as a seqpar run.")
    ap.add_argument("hf_dir", help="Hugging Face model folder (config.json + *.safetensors)")
    ap.add_argument("out_run", help="destination seqpar run folder (checkpoints/ + recipe.yaml)")
    ap.add_argument("--pattern", default="A", help="layer kinds, tiled: A keep softmax, S to S2, L to Lightning")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="recipe field for the imported run (repeatable)")
    ap.add_argument("--force", action="store_true",
                    help="replace OUT_RUN if it holds an earlier import (not trained on since)")
    args = ap.parse_args(argv)
    try:
        step = import_hf(args.hf_dir, args.out_run, pattern=args.pattern, overrides=args.overrides, force=args.force)
    except ExportError as e:
        print(f"seqpar.export.from_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"[seqpar.export] wrote {step}\n  continue training: python -m seqpar.train "
          f"{step.parent.parent / 'recipe.yaml'} --resume --set train.steps=N")
    return 0


if __name__ == "__main__":
    sys.exit(main())
