"""``python -m seqpar.export.hf CHECKPOINT OUT_DIR`` (also ``seqpar-export``): a training checkpoint
to a Hugging Face folder.

CHECKPOINT is a ``step_N`` folder, ``<run>/checkpoints/latest`` or the run folder of either engine:
a Megatron checkpoint saved at any TP / CP / PP / DP layout, or a DeepSpeed one (ZeRO 0-3, any TP / CP /
DP; TP shards merged by the split recorded at save time) — one process, no process group, no optimizer
state read. OUT_DIR gets:

- ``config.json`` + ``model.safetensors`` (sharded with ``model.safetensors.index.json`` above
  ``--max-shard-size``) + ``generation_config.json``;
- pure-softmax models: stock ``LlamaForCausalLM`` (no custom code; with ``model.softmax_window``
  stock ``MistralForCausalLM`` with that ``sliding_window``); otherwise
  ``SeqparForCausalLM`` with ``configuration_seqpar.py`` / ``modeling_seqpar.py`` and ``auto_map``
  (load with ``trust_remote_code=True``; ``model.softmax_window`` becomes its ``softmax_window``, the
  same sliding window on the softmax layers in every attention path and in the generation cache);
- the run's tokenizer (the files pinned in the checkpoint's ``tokenizer/``): a sentencepiece model as a
  ``LlamaTokenizer`` (``tokenizer.json``, ``tokenizer_config.json``, ``tokenizer.model``), a Hugging Face
  tokenizer as its own ``tokenizer.json`` + config files; either checked to encode exactly as training
  did, with the training BOS / EOS / pad ids;
- ``README.md``: a model card with the recipe, step, tokens seen and final loss.

Everything is written to a temporary folder next to OUT_DIR and renamed at the end: an error leaves
nothing behind. ``seqpar_output.json`` lists the files written; an existing OUT_DIR needs ``--force``,
which replaces only an earlier export (a folder holding anything else is refused and left as it is;
``seqpar.export.output``).
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

from seqpar.export.convert import ModelSpec, hf_config, megatron_to_hf, spec_from_recipe
from seqpar.export.output import check_out_dir, install
from seqpar.export.reader import ExportError, TrainingCheckpoint, read_checkpoint

TOOL = "seqpar.export.hf"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PROBE = "def f(x):\n    return x  # probe. The quick brown fox, ünïcödé & 42!"


def _ids(tok) -> dict[str, Optional[int]]:
    """The special ids of a ``seqpar.data.Tokenizer`` as HF config fields (EOS = the training EOD)."""
    return {"bos_token_id": tok.bos, "eos_token_id": tok.eod, "pad_token_id": tok.pad}


def write_tokenizer(tok, out: pathlib.Path, vocab_size: int) -> None:
    """The run's tokenizer (a ``seqpar.data.Tokenizer``) into ``out``: a sentencepiece model as a
    ``LlamaTokenizer``, a Hugging Face tokenizer as its own files; refused unless the written folder
    encodes like training did (no BOS / EOS added: training packs plain ``encode`` streams) and has no
    more ids than the model's ``vocab_size`` embedding rows."""
    if tok.vocab_size > vocab_size:
        raise ExportError(f"the checkpoint's tokenizer ({tok.where}) has {tok.vocab_size} ids but the model's "
                          f"vocabulary is {vocab_size}; vocabulary mismatch (was the checkpoint's tokenizer replaced?)")
    if tok.kind == "sentencepiece":
        _write_sentencepiece(tok, out, vocab_size)
        return
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer files alone (no config.json beside them)
        tok.save(tmp)
        hf = AutoTokenizer.from_pretrained(tmp)  # no trust_remote_code: a tokenizer folder runs no code
        if hf.encode(_PROBE, add_special_tokens=False) != tok.encode(_PROBE):
            raise ExportError("the exported Hugging Face tokenizer encodes differently from the one training used; "
                              "refusing to write a tokenizer that does not match training")
    tok.save(out)


def _write_sentencepiece(tok, out: pathlib.Path, vocab_size: int) -> None:
    """The sentencepiece model as a ``LlamaTokenizer`` (fast, tokenizers backend) in ``out``, with
    the sentencepiece BOS / EOS / pad / unk pieces and ids."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    from seqpar.data.tokenizer import SP_MODEL

    model_bytes = tok.files[SP_MODEL]
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        (pathlib.Path(tmp) / SP_MODEL).write_bytes(model_bytes)
        special = {name: sp.id_to_piece(i) for name, i in
                   (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id()),
                    ("unk_token", sp.unk_id())) if i >= 0}
        hf = LlamaTokenizer.from_pretrained(tmp, add_bos_token=False, add_eos_token=False, **special)
    if hf.encode(_PROBE, add_special_tokens=False) != tok.encode(_PROBE):
        raise ExportError("the Hugging Face tokenizer converted from the checkpoint's sentencepiece model encodes "
                          "differently from it; refusing to write a tokenizer that does not match training")
    for name, want in _ids(tok).items():
        got = getattr(hf, name)
        if want is not None and got != want:
            raise ExportError(f"tokenizer {name} is {got}, training used {want}")
    if len(hf) > vocab_size:
        raise ExportError(f"the Hugging Face tokenizer has {len(hf)} tokens, the model {vocab_size}; "
                          f"vocabulary mismatch")
    hf.save_pretrained(str(out))
    (out / SP_MODEL).write_bytes(model_bytes)


def _final_loss(ck: TrainingCheckpoint) -> Optional[float]:
    """Last ``train/loss`` scalar at or before the checkpoint's step from the run's tensorboard log."""
    tb = ck.path.parent.parent / "tb"
    if not tb.is_dir():
        return None
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    if "train/loss" not in acc.Tags().get("scalars", []):
        return None
    events = [e for e in acc.Scalars("train/loss") if e.step <= ck.step]
    return events[-1].value if events else None


def _portable_recipe(config: dict) -> dict:
    """The recipe for the model card with the paths it names (fields marked ``RecipePath``) that are
    absolute on the exporting machine shortened to ``.../<last component>``: a card travels."""
    from seqpar.train.config import SECTIONS, RecipePath, RunConfig

    out = json.loads(json.dumps(config))
    for sec in SECTIONS:
        fields = RunConfig.model_fields[sec].annotation.model_fields
        for name, info in fields.items():
            if not any(isinstance(m, RecipePath) for m in info.metadata) or name not in out.get(sec, {}):
                continue
            v = out[sec][name]
            out[sec][name] = [_short(x) for x in v] if isinstance(v, list) else _short(v)
    return out


def _short(v):
    return f".../{pathlib.PurePath(v).name}" if isinstance(v, str) and os.path.isabs(v) else v


def spec_arch(spec: ModelSpec) -> str:
    """The stock class a pure-softmax model exports as."""
    return "LlamaForCausalLM" if spec.softmax_window is None else f"MistralForCausalLM (sliding_window {spec.softmax_window})"


def _model_card(ck: TrainingCheckpoint, spec: ModelSpec, custom: bool, out: pathlib.Path) -> str:
    """README.md of the export; names no absolute path of this machine (the checkpoint by run / step,
    the folder by its name, recipe paths shortened)."""
    out_name = out.name
    data = ck.config.get("data", {})
    tokens = ck.step * int(data.get("global_batch", 0)) * int(data.get("seq_len", 0))
    loss = _final_loss(ck)
    kinds = {"A": "softmax", "S": "S2", "L": "Lightning", "H": "MoH"}
    remote = ", trust_remote_code=True" if custom else ""
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"path = {out_name!r}  # this folder\n"
            f"model = AutoModelForCausalLM.from_pretrained(path{remote})\n"
            f"tok = AutoTokenizer.from_pretrained(path{remote})"
            + ("  # AutoTokenizer reads config.json too" if custom else ""))
    source = f"{ck.path.parent.parent.name}/{ck.path.parent.name}/{ck.path.name}"
    return "\n".join([
        "---", "library_name: transformers", "tags: [seqpar, causal-lm]", "---", "",
        f"# {out_name}", "",
        f"Exported by `python -m seqpar.export.hf` from the training checkpoint `{source}`.", "",
        f"- architecture: {'SeqparForCausalLM (custom code, `trust_remote_code=True`)' if custom else spec_arch(spec)}",
        f"- layers: {spec.num_layers} ({', '.join(f'{i}:{kinds[c]}' for i, c in enumerate(spec.pattern))}), "
        f"hidden {spec.hidden_size}, heads {spec.num_heads} / kv heads {spec.num_kv_heads}, vocab {spec.vocab_size}",
        f"- training step: {ck.step}; tokens seen: {tokens:,} (step x global batch x sequence length)",
        f"- final training loss: {'not recorded' if loss is None else f'{loss:.4f}'}",
        "- tokenizer: " + ({"sentencepiece": "the run's sentencepiece model (LlamaTokenizer)",
                            "huggingface": "the run's Hugging Face tokenizer (tokenizer.json)"}[ck.tokenizer.kind]
                           if ck.tokenizer is not None else "none (token ids only)"),
        f"- saved at parallel layout: {json.dumps(ck.layout)}", "",
        "## Use", "", "```python", load, "```", "",
        "## Recipe (resolved; absolute paths of the exporting machine shortened to `.../<name>`)", "", "```json",
        json.dumps(_portable_recipe(ck.config), indent=2, sort_keys=True), "```", ""])


def _readable(folder: pathlib.Path) -> None:
    """mkdtemp makes a 0700 folder (and some writers 0600 files): give them the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def export(checkpoint: str | pathlib.Path, out_dir: str | pathlib.Path, *, force: bool = False,
           dtype: Optional[str] = None, max_shard_size: str | int = "5GB",
           allow_no_tokenizer: bool = False) -> pathlib.Path:
    """Write the Hugging Face folder for ``checkpoint`` to ``out_dir`` (see the module docstring).

    Args:
        checkpoint: step folder, ``checkpoints/latest`` or run folder.
        out_dir: destination; must not exist unless ``force`` (then: empty or an earlier export only).
        dtype: "fp32" | "bf16" | "fp16"; default: the training dtype.
        max_shard_size: safetensors shard limit (``save_pretrained``'s argument).
        allow_no_tokenizer: export a text-data checkpoint that carries no ``tokenizer/``
            (e.g. imported from a HF folder without one) without a tokenizer instead of failing.

    Raises:
        ExportError: bad checkpoint or output (see the module docstring); nothing is written then.
    """
    out = pathlib.Path(out_dir).absolute()
    check_out_dir(out, force=force, tool=TOOL)
    if dtype is not None and dtype not in _DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    ck = read_checkpoint(checkpoint)
    data = ck.config.get("data", {})
    # the model's vocabulary is its embedding rows (data.vocab_size); the tokenizer may have fewer ids
    vocab = int(data.get("vocab_size", ck.tensors["embedding.word_embeddings.weight"].shape[0]))
    if ck.tokenizer is not None:
        ids = _ids(ck.tokenizer)
    elif data.get("dataset", "text") != "mqar" and not allow_no_tokenizer:
        raise ExportError(f"{ck.path} has no tokenizer/: the run's tokenizer was not saved with it; re-save "
                          f"the checkpoint with seqpar.train, or pass --no-tokenizer to export the model alone")
    else:  # synthetic data (MQAR) or --no-tokenizer: token ids are the vocabulary, no tokenizer to ship
        ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    spec = spec_from_recipe(ck.config, vocab)
    weights = megatron_to_hf(ck.tensors, spec)
    train_dtype = _DTYPES.get(ck.config.get("model", {}).get("dtype", "fp32"), torch.float32)
    target = _DTYPES[dtype] if dtype else train_dtype
    weights = {k: v.to(target) for k, v in weights.items()}
    cfg = hf_config(spec, dtype=target, **ids)
    if spec.pure_softmax and spec.softmax_window is not None:  # Llama's weights, Mistral's sliding window
        from transformers import MistralForCausalLM as cls
    elif spec.pure_softmax:
        from transformers import LlamaForCausalLM as cls
    else:
        from seqpar.models.hf.modeling_seqpar import SeqparForCausalLM as cls
    with torch.device("meta"):
        model = cls(cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        raise ExportError(f"converted weights do not fit {cls.__name__}: missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp_export_{out.name}_", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        if not spec.pure_softmax:
            from seqpar.models.hf import TEMPLATE_DIR, TEMPLATE_FILES

            for name in TEMPLATE_FILES:
                shutil.copyfile(TEMPLATE_DIR / name, tmp / name)
        if ck.tokenizer is not None:
            write_tokenizer(ck.tokenizer, tmp, vocab)
        (tmp / "README.md").write_text(_model_card(ck, spec, not spec.pure_softmax, out))
        _readable(tmp)
        install(tmp, out, TOOL)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m seqpar.export.hf",
                                 description="Export a seqpar training checkpoint to a Hugging Face folder.")
    ap.add_argument("checkpoint", help="step_N folder, <run>/checkpoints/latest, or the run folder")
    ap.add_argument("out_dir", help="destination folder (written atomically)")
    ap.add_argument("--force", action="store_true",
                    help="replace OUT_DIR if it holds an earlier export (and nothing else)")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="weights dtype (default: training dtype)")
    ap.add_argument("--max-shard-size", default="5GB", help="safetensors shard size limit (e.g. 2GB, 500MB)")
    ap.add_argument("--no-tokenizer", action="store_true",
                    help="export a checkpoint that carries no tokenizer/ without a tokenizer")
    args = ap.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir, force=args.force, dtype=args.dtype,
                     max_shard_size=args.max_shard_size, allow_no_tokenizer=args.no_tokenizer)
    except ExportError as e:
        print(f"seqpar.export.hf: error: {e}", file=sys.stderr)
        return 2
    print(f"[seqpar.export] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
