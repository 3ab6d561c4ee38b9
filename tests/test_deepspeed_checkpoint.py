"""DeepSpeed checkpoints (seqpar.deepspeed.checkpoint): what export needs is inside, export is exact,
and loading executes nothing from disk.

One launch of 2 gloo ranks (module fixture) trains the tiny hybrid (ASLH, text data) on the DeepSpeed
engine at CP=2 under ZeRO-2 and ZeRO-3, and at TP=2 (ZeRO-1, pattern ASL); reloads each
checkpoint into a fresh DeepSpeed engine (checkpoint.load, the resume path) and records its logits
(CP and TP shards gathered) as the reference; then loads crafted copies of the ZeRO-2 checkpoint (a pickle
that would run ``exec`` planted in a ZeRO shard / an RNG file, manifest recomputed so the checksums
pass) through the resume path at the same layout and — via DeepSpeed's universal conversion — at
another layout, each with and without the early pickle check, and resumes with a changed model and
after the last step; it records the errors.

- the step folder holds config.json, tokenizer/ and integrity's manifest.json (engine=deepspeed);
- ``python -m seqpar.export.hf`` accepts the step folder, checkpoints/latest and the run folder; the
  HF model's logits equal the DeepSpeed model's (fp32 max abs diff <= 1e-4) for ZeRO-2 and ZeRO-3;
- a TP=2 DeepSpeed checkpoint: its TP shards are merged (the manifest's tp_split, read from the model at
  save time) and the HF model's logits equal the TP=2 DeepSpeed model's; a TP=2 checkpoint without
  tp_split (an older seqpar) or with a wrong split is refused with a clear error;
- resume refuses a recipe whose model differs (as the Megatron engine does) and a finished run (the
  fallback past a corrupt newest checkpoint: tests/test_deepspeed_engine.py);
- crafted pickles: every loader (resume, universal conversion, consolidated fp32 state dict, export,
  RNG files) refuses with "refusing to unpickle builtins.exec ..." and the marker file the payload
  would write never appears.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from cp_harness import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEQ = 128  # S2 under CP=2: a multiple of 2 x CP x block (16)
BASE = ["model.preset=tiny-hybrid", "data.dataset=text", "data.global_batch=2", "data.vocab_size=512",
        "data.max_bytes=60000", "train.steps=2", "optim.warmup_steps=1", "train.progress=false",
        "train.time_attention=false", "parallel.backend=torch", "train.save_every=0", f"data.seq_len={SEQ}",
        "train.engine=deepspeed"]
RUNS = {"zero2": ["deepspeed.zero_stage=2"], "zero3": ["deepspeed.zero_stage=3"],
        # MoH needs TP=1; S2 under TP keeps the head stride exact only for vert_stride <= heads / TP
        "tp2": ["deepspeed.zero_stage=1", "parallel.tensor_parallel=2", "parallel.context_parallel=1",
                "model.pattern=ASL", "model.s2_vert_stride=2", "train.steps=1"]}
SHARD = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"  # .format(DP x CP rank)


class _Exec:
    """Pickles as a call of builtins.exec that writes ``marker``: run on load by an unrestricted unpickler."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _cfg(root: str, name: str, extra=()):
    from seqpar.train.config import load_recipe

    ovr = BASE + [f"train.out_dir={root}/{name}", f"data.cache_dir={root}/spm"] + RUNS.get(name, []) + list(extra)
    return load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", ovr)


def _engine(cfg):
    """A fresh DeepSpeed engine for the recipe (as train() builds it)."""
    from megatron.core import parallel_state as ps

    from seqpar.deepspeed.config import build_ds_config
    from seqpar.deepspeed.engine import initialize
    from seqpar.megatron import init_parallel
    from seqpar.train.loop import build_data, build_model

    init_parallel(cfg.parallel.tensor_parallel, cfg.parallel.context_parallel, seed=cfg.train.seed)
    _, vocab = build_data(cfg)
    return initialize(cfg, build_model(cfg, vocab)[0], build_ds_config(cfg, ps.get_data_parallel_world_size()))


def _close(engine) -> None:
    from megatron.core import parallel_state as ps

    engine.destroy()
    ps.destroy_model_parallel()


def _logits(cfg, tokens: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits [b, s, vocab] of the checkpoint loaded into a DeepSpeed engine at its
    saved layout (CP shards and TP vocab shards gathered)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from seqpar import cp
    from seqpar.deepspeed import checkpoint
    from seqpar.train.runtime import local_batch

    engine = _engine(cfg)
    checkpoint.load(engine, checkpoint.latest(pathlib.Path(cfg.train.out_dir) / "checkpoints"))
    engine.eval()
    tok = local_batch(tokens, tokens, torch.ones_like(tokens, dtype=torch.float32))["tokens"]
    with torch.no_grad():
        out = engine(tok, torch.arange(tok.shape[1]).expand_as(tok), None)  # [b, s_local, vocab]
        out = cp.unshard(out.contiguous(), ps.get_context_parallel_group(), dim=1, balance="zigzag")
        if ps.get_tensor_model_parallel_world_size() > 1:  # the output layer is vocab-parallel
            out = gather_from_tensor_model_parallel_region(out)
    _close(engine)
    return out


def plant(step_dir: pathlib.Path, name: str, marker: pathlib.Path) -> None:
    """Add a pickled exec call to ``step_dir/name`` (a real torch.save file, its other entries kept)
    and recompute the manifest so that every checksum matches: only the pickle check can stop it."""
    from seqpar.deepspeed.checkpoint import deepspeed_globals
    from seqpar.train import integrity

    f = step_dir / name
    state = integrity.weights_only_load(f, str(f), allow=deepspeed_globals())
    state["evil"] = _Exec(str(marker))
    torch.save(state, f)
    old = integrity.read_manifest(step_dir)
    integrity.write_manifest(step_dir, extra={k: v for k, v in old.items() if k not in ("files", "format", "algorithm")})


def _crafted(root: pathlib.Path, src: pathlib.Path, case: str, names: list[str]) -> pathlib.Path:
    """checkpoints/ folder of a copy of ``src`` with ``names`` crafted (rank 0; the others wait)."""
    import torch.distributed as dist

    ck = root / f"crafted_{case}" / "checkpoints"
    if dist.get_rank() == 0:
        shutil.copytree(src, ck / src.name)
        (ck / "latest").write_text(src.name)
        for name in names:
            plant(ck / src.name, name, root / f"marker_{case}")
    dist.barrier()
    return ck / src.name


def _attempt(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test asserts on the type and message
        return type(e).__name__, str(e)
    return "no error", ""


def _crafted_loads(root: pathlib.Path) -> dict:
    """Resume crafted copies of the ZeRO-2 checkpoint: at the same layout (engine.load_checkpoint) and
    at CP=1 x DP=2 (universal conversion), with the early pickle check on and bypassed. Every rank's
    own file is crafted (each rank reads only its ZeRO shard and its RNG file)."""
    from seqpar.deepspeed import checkpoint

    src = checkpoint.latest(root / "zero2" / "checkpoints")
    cases = {"shard": [SHARD.format(r) for r in range(2)], "rng": [f"rng/rank_{r:05d}.pt" for r in range(2)]}
    paths = {case: _crafted(root, src, case, names) for case, names in cases.items()}
    check = checkpoint.check_pickles
    out = {}

    def both(case: str, engine, path: pathlib.Path) -> None:
        out[case] = _attempt(lambda: checkpoint.load(engine, path))
        checkpoint.check_pickles = lambda folder, **kw: None  # the loads themselves must refuse as well
        try:
            out[case + "_unchecked"] = _attempt(lambda: checkpoint.load(engine, path))
        finally:
            checkpoint.check_pickles = check

    cfg = _cfg(str(root), "zero2")
    engine = _engine(cfg)
    changed = cfg.to_dict()
    changed["model"]["pattern"] = "SALH"  # same parameter names, other layer kinds
    out["model_changed"] = _attempt(lambda: checkpoint.load(engine, src, config=changed))
    out["finished"] = _attempt(lambda: checkpoint.load(engine, src, config=cfg.to_dict()))
    for case, path in paths.items():
        both(case, engine, path)
    _close(engine)
    engine = _engine(_cfg(str(root), "zero2", ["parallel.context_parallel=1"]))  # another layout: DP=2
    both("universal", engine, paths["shard"])
    _close(engine)
    return out


def _ranks(rank: int, world: int, root: str, tokens: torch.Tensor) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.loop import train

    out = {}
    for name in RUNS:
        cfg = _cfg(root, name)
        train(cfg)
        out[name] = _logits(cfg, tokens)
    out["crafted"] = _crafted_loads(pathlib.Path(root))
    disable_cpu_compat()
    return out


def _tokens() -> torch.Tensor:
    return torch.randint(4, 512, (2, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    root = tmp_path_factory.mktemp("ds_ckpt")
    tokens = _tokens()
    res = run_ranks(_ranks, 2, str(root), tokens, timeout=900)
    return root, tokens, res


def _hf_logits(folder: pathlib.Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def test_step_folder_carries_recipe_tokenizer_and_one_manifest(trained):
    from seqpar.deepspeed import checkpoint
    from seqpar.train import integrity
    from seqpar.train.checkpoint import CONFIG_FILE, TOKENIZER_DIR

    root, _, _ = trained
    step = checkpoint.latest(root / "zero2" / "checkpoints")
    assert step.name == "step_0000002"
    names = {p.name for p in step.iterdir()}
    assert {CONFIG_FILE, TOKENIZER_DIR, integrity.MANIFEST, "rng"} <= names and "seqpar_manifest.json" not in names
    man = integrity.verify(step)
    assert (man["format"], man["engine"], man["step"], man["zero_stage"]) == ("seqpar-manifest-1", "deepspeed", 2, 2)
    assert man["layout"]["context_parallel"] == 2 and man["layout"]["data_parallel"] == 1
    assert set(man["files"]) == {str(p.relative_to(step)) for p in step.rglob("*") if p.is_file()} - {"manifest.json"}
    assert json.loads((step / CONFIG_FILE).read_text())["train"]["engine"] == "deepspeed"
    import sentencepiece as spm

    assert spm.SentencePieceProcessor(model_file=str(step / TOKENIZER_DIR / "tokenizer.model")).vocab_size() == 512


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_export_logits_match_deepspeed_model(trained, name, tmp_path):
    from seqpar.export.hf import export

    root, tokens, res = trained
    ref = res[0][name]
    assert torch.equal(res[1][name], ref)
    out = export(root / name, tmp_path / "hf")  # the run folder
    diff = (_hf_logits(out, tokens) - ref).abs().max().item()
    assert diff <= 1e-4, (name, diff)
    card = (out / "README.md").read_text()
    assert "tokens seen: 512" in card and "final training loss: " in card and "not recorded" not in card


def test_export_cli_accepts_step_folder_and_latest(trained, tmp_path):
    root, tokens, res = trained
    ck = root / "zero2" / "checkpoints"
    for i, arg in enumerate([ck / "latest", ck / "step_0000002"]):
        out = tmp_path / f"hf{i}"
        r = subprocess.run([sys.executable, "-m", "seqpar.export.hf", str(arg), str(out)], capture_output=True,
                           text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (_hf_logits(out, tokens) - res[0]["zero2"]).abs().max().item() <= 1e-4


def test_tp2_deepspeed_checkpoint_exports_exactly(trained, tmp_path):
    """TP=2 (ZeRO-1): per TP rank zero_to_fp32, shards merged by the recorded split (Lightning's
    q|k|v|gate per section, SwiGLU's gate|up per section, column / row / replicated), then HF."""
    from seqpar.deepspeed import checkpoint
    from seqpar.export.hf import export
    from seqpar.train import integrity

    root, tokens, res = trained
    ref = res[0]["tp2"]
    assert torch.equal(res[1]["tp2"], ref) and ref.shape == (2, SEQ, 512)
    step = checkpoint.latest(root / "tp2" / "checkpoints")
    man = integrity.verify(step)
    assert man["layout"]["tensor_parallel"] == 2 and sorted(p.name for p in step.glob("*mp_rank_01_*")) == [
        "mp_rank_01_model_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"]
    split = man[checkpoint.TP_SPLIT]
    lin = "decoder.layers.2.self_attention."  # pattern ASL: layer 2 is Lightning
    assert split[lin + "linear_qkvg.weight"][0] == 0 and len(split[lin + "linear_qkvg.weight"][1]) == 4
    assert split[lin + "norm_weight"] == [0, []] and split[lin + "linear_proj.weight"] == [1, []]
    assert split["decoder.layers.0.mlp.linear_fc1.weight"][1][0] * 2 == sum(split["decoder.layers.0.mlp.linear_fc1.weight"][1])
    sd = checkpoint.consolidated_fp32_state_dict(step)
    assert set(sd) == set(split)
    out = export(root / "tp2", tmp_path / "hf")
    diff = (_hf_logits(out, tokens) - ref).abs().max().item()
    assert diff <= 1e-4, diff
    assert "tokens seen: 256" in (out / "README.md").read_text()


def _rewrite_manifest(step: pathlib.Path, fn) -> None:
    from seqpar.train import integrity

    man = integrity.read_manifest(step)
    fn(man)
    integrity.write_manifest(step, extra={k: v for k, v in man.items() if k not in ("files", "format", "algorithm")})


def test_tp2_checkpoint_without_or_with_a_wrong_split_is_refused(trained, tmp_path):
    from seqpar.deepspeed import checkpoint
    from seqpar.export.hf import export
    from seqpar.export.reader import ExportError

    root, _, _ = trained
    old = _crafted_copy(root, tmp_path / "old", "tp2")
    _rewrite_manifest(old, lambda m: m.pop(checkpoint.TP_SPLIT))  # as an older seqpar wrote it
    with pytest.raises(ExportError, match=r"tensor_parallel=2 by an older seqpar whose manifest has no 'tp_split'"):
        export(old, tmp_path / "hf")
    norm = "decoder.final_layernorm.weight"
    bad = _crafted_copy(root, tmp_path / "bad", "tp2")
    _rewrite_manifest(bad, lambda m: m[checkpoint.TP_SPLIT].pop(norm))
    with pytest.raises(ValueError, match=rf"no TP split recorded for \['{norm}'\].*refusing to guess"):
        checkpoint.consolidated_fp32_state_dict(bad)
    qkvg = "decoder.layers.2.self_attention.linear_qkvg.weight"
    wrong = _crafted_copy(root, tmp_path / "wrong", "tp2")
    _rewrite_manifest(wrong, lambda m: m[checkpoint.TP_SPLIT][qkvg][1].append(1))
    with pytest.raises(ValueError, match=rf"{qkvg} has \d+ rows per TP rank, its recorded sections"):
        checkpoint.consolidated_fp32_state_dict(wrong)
    assert not (tmp_path / "hf").exists()


def _refused(res: tuple[str, str], file: str) -> None:
    kind, msg = res
    assert kind == "UnsafeCheckpointError", res
    assert "refusing to unpickle" in msg and "builtins.exec" in msg, msg
    assert file in msg, msg


@pytest.mark.parametrize("case", ["shard", "shard_unchecked", "rng", "rng_unchecked", "universal",
                                  "universal_unchecked"])
def test_crafted_pickle_is_refused_on_resume(trained, case):
    root, _, res = trained
    assert list(root.glob("marker_*")) == []  # nothing ran, on any rank, in any case
    for rank, r in enumerate(res):
        got = r["crafted"][case]
        if case == "universal_unchecked":  # refused inside DeepSpeed's converter (a subprocess), on every rank
            _refused(got, "ds_to_universal")
        elif case.endswith("_unchecked"):  # refused by the weights-only loads themselves (each rank: its file)
            _refused(got, SHARD.format(rank) if case.startswith("shard") else f"rng/rank_{rank:05d}.pt")
        else:  # refused by the pickle check, before DeepSpeed reads anything (every rank: the same file)
            assert got == res[0]["crafted"][case]
            crafted = [SHARD.format(r) if case in ("shard", "universal") else f"rng/rank_{r:05d}.pt" for r in (0, 1)]
            _refused(got, next((c for c in crafted if c in got[1]), crafted[0]))


def test_resume_checks_the_recipe(trained):
    _, _, res = trained
    for r in res:
        kind, msg = r["crafted"]["model_changed"]
        assert kind == "ConfigMismatchError" and 'model.pattern: null -> "SALH"' in msg, (kind, msg)
        kind, msg = r["crafted"]["finished"]
        assert kind == "ResumeError" and "already the end of the run" in msg, (kind, msg)


def _crafted_copy(root: pathlib.Path, tmp: pathlib.Path, name: str) -> pathlib.Path:
    from seqpar.deepspeed import checkpoint

    src = checkpoint.latest(root / name / "checkpoints")
    dst = tmp / "run" / "checkpoints" / src.name
    shutil.copytree(src, dst)
    (dst.parent / "latest").write_text(src.name)
    return dst


@pytest.mark.parametrize("name, file", [("zero2", "mp_rank_00_model_states.pt"), ("zero2", SHARD.format(1)),
                                        ("zero3", "zero_pp_rank_1_mp_rank_00_model_states.pt")])
def test_crafted_pickle_is_refused_by_consolidation_and_export(trained, tmp_path, monkeypatch, name, file):
    from seqpar.deepspeed import checkpoint
    from seqpar.export.hf import export
    from seqpar.export.reader import ExportError
    from seqpar.train.integrity import UnsafeCheckpointError

    root, _, _ = trained
    step = _crafted_copy(root, tmp_path, name)
    marker = tmp_path / "marker"
    plant(step, file, marker)
    with pytest.raises(UnsafeCheckpointError, match=rf"refusing to unpickle builtins\.exec from .*{file}"):
        checkpoint.consolidated_fp32_state_dict(step)
    with pytest.raises(ExportError, match=rf"refusing to unpickle builtins\.exec from .*{file}"):
        export(step.parent.parent, tmp_path / "hf")
    monkeypatch.setattr(checkpoint, "check_pickles", lambda folder, **kw: None)  # DeepSpeed's own reads refuse too
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle .*builtins\.exec"):
        checkpoint.consolidated_fp32_state_dict(step)
    assert not marker.exists() and not (tmp_path / "hf").exists()
    torch.load(step / file, weights_only=False)  # what DeepSpeed's loader does unguarded: the payload is real
    assert marker.read_text() == "pwned"


def test_tampered_or_unlisted_file_is_refused_before_loading(trained, tmp_path):
    from seqpar.deepspeed import checkpoint
    from seqpar.train.integrity import CorruptCheckpointError

    root, _, _ = trained
    step = _crafted_copy(root, tmp_path, "zero2")
    f = step / SHARD.format(0)
    f.write_bytes(f.read_bytes()[:-7] + b"garbage")
    with pytest.raises(CorruptCheckpointError, match=rf"{f.name}: contents changed"):
        checkpoint.consolidated_fp32_state_dict(step)
    step2 = _crafted_copy(root, tmp_path / "b", "zero2")
    (step2 / "extra.pt").write_bytes(b"x")
    with pytest.raises(CorruptCheckpointError, match="extra.pt: not in the manifest"):
        checkpoint.consolidated_fp32_state_dict(step2.parent)  # checkpoints/ (latest)


def test_nested_allow_lists_keep_the_outer_one(tmp_path):
    """Our checkpoint engine's weights-only load inside forced_weights_only (DeepSpeed's universal path
    reads through both): torch's safe_globals context removes its entries on exit, the outer
    allowance must survive the inner one."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.tensor_fragment import fragment_address

    from seqpar.train import integrity

    f = tmp_path / "x.pt"
    torch.save({"a": fragment_address(numel=4, start=0)}, f)
    with integrity.forced_weights_only([fragment_address]):
        assert integrity.weights_only_load(f, str(f), allow=[fragment_address])["a"].numel == 4
        assert torch.load(f, weights_only=False)["a"].start == 0  # forced weights-only, still allowed
    assert fragment_address not in torch.serialization.get_safe_globals()
    with pytest.raises(integrity.UnsafeCheckpointError, match="fragment_address from"):
        integrity.weights_only_load(f, str(f))
