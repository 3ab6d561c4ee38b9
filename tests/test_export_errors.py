"""Bad input to ``python -m seqpar.export.hf``: one clear error, nothing half-written.

A file that fails the checkpoint's manifest, missing recipe, unknown preset, truncated / missing shard, an output folder that exists (needs
``--force``), a tokenizer whose vocabulary does not match the model, a path that is no checkpoint,
and DCP metadata that would execute code. Also: CHECKPOINT may be a step folder,
``checkpoints/latest`` or the run folder, and the CLI / console script report errors with exit 2.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from cp_harness import run_ranks
from train_harness import train_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("export_errors") / "run"
    run_ranks(train_tiny, 1, str(out), "tiny-dense", 1, timeout=300)
    return out


@pytest.fixture
def ckpt(run, tmp_path) -> pathlib.Path:
    """A private copy of the run (tests damage it)."""
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _step(run: pathlib.Path) -> pathlib.Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _assert_clean(out: pathlib.Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp_export_")]


def _export(src, out, **kw):
    from seqpar.export.hf import export

    return export(src, out, **kw)


def _rewrite_common(step: pathlib.Path, fn) -> None:
    common = torch.load(step / "common.pt", weights_only=True)
    fn(common)
    torch.save(common, step / "common.pt")


def _reseal(step: pathlib.Path) -> None:
    """Rewrite the manifest after an edit: a checkpoint that is intact but wrong in what it says."""
    from seqpar.train import integrity

    integrity.write_manifest(step)


def test_edited_file_fails_the_manifest(ckpt, tmp_path):
    from seqpar.export import ExportError

    cfg = _step(ckpt) / "config.json"
    cfg.write_text(cfg.read_text().replace('"tiny-dense"', '"tiny-denze"'))  # same size, other bytes
    with pytest.raises(ExportError, match="contents changed"):
        _export(ckpt, tmp_path / "hf")
    _assert_clean(tmp_path / "hf")


def test_accepts_step_folder_latest_and_run_folder(ckpt, tmp_path):
    from seqpar.export.reader import resolve_step_dir

    step = _step(ckpt)
    assert resolve_step_dir(ckpt) == step
    assert resolve_step_dir(ckpt / "checkpoints") == step
    assert resolve_step_dir(ckpt / "checkpoints" / "latest") == step
    assert resolve_step_dir(step) == step
    from seqpar.export import ExportError

    with pytest.raises(ExportError, match="not a seqpar checkpoint"):
        resolve_step_dir(tmp_path)


def test_force_replaces_only_an_earlier_export(ckpt, tmp_path):
    """An existing OUT_DIR needs --force, and --force replaces only an earlier export (what README's
    ``... checkpoints/latest out/hf_bf16 --force --dtype bf16`` does): a folder that holds anything else
    (a file of yours, another export nested in it, a tampered export) is refused and left untouched."""
    import json

    from seqpar.export import ExportError
    from seqpar.export.output import MANIFEST

    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="--force"):
        _export(ckpt, out)
    with pytest.raises(ExportError, match=r"holds keep\.txt and no seqpar_output\.json.*--force replaces only an "
                                          r"earlier output of seqpar\.export\.hf"):
        _export(ckpt, out, force=True)
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    _export(ckpt, out, force=True)  # an empty folder is replaced
    written = json.loads((out / MANIFEST).read_text())
    assert written["tool"] == "seqpar.export.hf" and "config.json" in written["files"]
    _export(ckpt, out, force=True, dtype="bf16")  # an earlier export: replaced
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _export(ckpt, out / "nested")  # an export inside the export (README once nested out/ds in out/)
    with pytest.raises(ExportError, match=r"holds files that the earlier seqpar\.export\.hf did not write "
                                          r"\(nested/"):
        _export(ckpt, out, force=True)
    assert (out / "nested" / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp_export_", ".old_"))]


def test_model_card_names_no_absolute_path(ckpt, tmp_path):
    out = _export(ckpt, tmp_path / "card")
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and "/tmp" not in card and str(pathlib.Path.home()) not in card, card
    assert "from the training checkpoint `run/checkpoints/step_" in card
    assert "path = 'card'  # this folder" in card
    # the recipe's paths (train.out_dir, data.cache_dir were absolute) are shortened, relative ones kept
    assert '"out_dir": ".../run"' in card and '"cache_dir": ".../spm"' in card


def test_missing_recipe(ckpt, tmp_path):
    from seqpar.export import ExportError

    _rewrite_common(_step(ckpt), lambda c: c.pop("config"))
    (_step(ckpt) / "config.json").unlink()
    _reseal(_step(ckpt))
    with pytest.raises(ExportError, match="no recipe"):
        _export(ckpt, tmp_path / "hf")
    _assert_clean(tmp_path / "hf")


def test_unknown_preset(ckpt, tmp_path):
    from seqpar.export import ExportError

    cfg = _step(ckpt) / "config.json"
    cfg.write_text(cfg.read_text().replace('"tiny-dense"', '"huge-dense"'))
    _reseal(_step(ckpt))
    with pytest.raises(ExportError, match="preset"):
        _export(ckpt, tmp_path / "hf")
    _assert_clean(tmp_path / "hf")


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_missing_shard(ckpt, tmp_path, damage):
    from seqpar.export import ExportError

    shard = sorted(_step(ckpt).glob("*.distcp"), key=lambda p: p.stat().st_size)[-1]
    if damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    else:
        shard.unlink()
    with pytest.raises(ExportError, match="truncated" if damage == "truncate" else "missing"):
        _export(ckpt, tmp_path / "hf")
    _assert_clean(tmp_path / "hf")


def test_vocabulary_mismatch(ckpt, tmp_path):
    # a tokenizer with more ids (1000) than the model's embedding rows (512)
    import sentencepiece as spm

    from seqpar.export import ExportError

    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"line {i} of some text, word{i} and more{i * 7}" for i in range(3000)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "big"), vocab_size=1000,
                                   model_type="bpe", minloglevel=2)
    shutil.copyfile(tmp_path / "big.model", _step(ckpt) / "tokenizer" / "tokenizer.model")
    _reseal(_step(ckpt))
    with pytest.raises(ExportError, match="vocabulary mismatch"):
        _export(ckpt, tmp_path / "hf")
    _assert_clean(tmp_path / "hf")


def test_missing_tokenizer_for_text_run(ckpt, tmp_path):
    from seqpar.export import ExportError

    shutil.rmtree(_step(ckpt) / "tokenizer")
    _reseal(_step(ckpt))
    with pytest.raises(ExportError, match="--no-tokenizer"):
        _export(ckpt, tmp_path / "hf")
    _assert_clean(tmp_path / "hf")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_metadata_that_executes_code_is_refused(ckpt, tmp_path):
    from seqpar.export import ExportError

    (_step(ckpt) / ".metadata").write_bytes(pickle.dumps(_Evil()))
    _reseal(_step(ckpt))
    with pytest.raises(ExportError, match="refusing"):
        _export(ckpt, tmp_path / "hf")
    _assert_clean(tmp_path / "hf")


def test_cli_and_console_script(ckpt, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "seqpar.export.hf", str(ckpt / "checkpoints" / "latest"),
                         str(tmp_path / "hf")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and (tmp_path / "hf" / "model.safetensors").exists()
    script = pathlib.Path(sys.executable).parent / "seqpar-export"
    bad = subprocess.run([str(script), str(ckpt), str(tmp_path / "hf")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--force" in bad.stderr and "Traceback" not in bad.stderr
