"""Recipes: every recipe in recipes/ validates and dry-runs (meta-device shards in one process, the
per-rank parameter count equal to the closed form); bad recipes fail before any process group starts, with the field named."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import yaml



ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipes_exist_and_cover_all_kinds():
    from seqpar.train.config import load_recipe

    assert RECIPES
    demo = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml")
    assert set(demo.model.layer_pattern) == set("ASLH") and demo.parallel.context_parallel == 2
    for r in RECIPES:
        cfg = load_recipe(r)
        cfg.check_world(cfg.parallel.tensor_parallel * cfg.parallel.context_parallel)


def test_every_recipe_dry_runs():
    # the dry run builds each distinct shard on the meta device in one process (no process group of
    # its own world), so it runs in a fresh interpreter, as `seqpar-train --dry-run` does
    code = ("import json, sys\nfrom seqpar.train.cli import dry_run\nfrom seqpar.train.config import load_recipe\n"
            "for p in sys.argv[1:]:\n    rep = dry_run(load_recipe(p))\n"
            "    assert all(s['params'] == s['params_closed_form'] for s in rep['shards']), rep\n")
    out = subprocess.run([sys.executable, "-c", code, *map(str, RECIPES)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count('"dry_run": "ok"') == len(RECIPES)


BASE = {"model": {"preset": "tiny-hybrid"}, "parallel": {"context_parallel": 2}, "data": {"seq_len": 64}}


@pytest.mark.parametrize("patch, field", [
    ({"model": {"pattern": "ALX"}}, "model.pattern"),
    ({"model": {"preset": "tiny-dense"}, "parallel": {"tensor_parallel": 3}}, "parallel.tensor_parallel"),
    ({"model": {"preset": "tiny-dense"}, "parallel": {"context_parallel": 8, "cp_schemes": {"softmax": "ulysses"}},
      "data": {"seq_len": 128}}, "parallel.context_parallel"),
    ({"data": {"seq_len": 70}}, "data.seq_len"),
    ({"parallel": {"cp_schemes": {"softmax": "teleport"}}}, "parallel.cp_schemes.softmax"),
    ({"parallel": {"cp_schemes": {"softmax": "usp"}, "usp_ulysses_degree": 3}}, "parallel.usp_ulysses_degree"),
    ({"parallel": {"cp_schemes": {"mamba": "ring"}}}, "parallel.cp_schemes"),
    ({"model": {"preset": "tiny-dense"}, "data": {"seq_len": 48}, "parallel": {"context_parallel": 2}}, None),
    ({"optim": {"lr": -1.0}}, "optim.lr"),
    ({"train": {"stepz": 3}}, "train.stepz"),
    ({"model": {"preset": "huge"}}, "model.preset"),
])
def test_bad_recipe_names_the_field(tmp_path, patch, field):
    from seqpar.train.config import load_recipe

    tree = yaml.safe_load(yaml.safe_dump(BASE))
    for sec, vals in patch.items():
        tree.setdefault(sec, {}).update(vals)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    if field is None:  # a valid variant of the same base (seq 48 = multiple of 2*CP without S layers)
        load_recipe(path)
        return
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_recipe(path)


def test_s2_under_cp_takes_chunks_of_partial_blocks(tmp_path):
    from seqpar.megatron import check_layout
    from seqpar.train.config import load_recipe

    # 36 tokens at CP=2: chunks of 9, not whole S2 blocks (cp.attention splits blocks between ranks)
    assert load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", ["data.seq_len=36"]).data.seq_len == 36
    check_layout(pattern="S", num_layers=1, num_attention_heads=4, num_query_groups=2, context_parallel=2,
                 seq_len=36, s2_block_size=16)


def test_set_overrides_and_world_check():
    from seqpar.train.config import load_recipe

    cfg = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", ["train.steps=7", "parallel.cp_schemes.moh=ring"])
    assert cfg.train.steps == 7 and cfg.parallel.cp_schemes["moh"] == "ring"
    assert cfg.parallel.cp_schemes["softmax"] == "ring"
    with pytest.raises(ValueError, match="world size 3"):
        cfg.check_world(3)
    with pytest.raises(ValueError, match=r"data\.global_batch"):
        load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", ["data.global_batch=3"]).check_world(4)
    with pytest.raises(ValueError, match="section.field=value"):
        load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", ["train.steps"])


def test_cli_rejects_bad_recipe_before_process_groups(tmp_path, capsys):
    import torch.distributed as dist

    from seqpar.train.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"pattern": "AZ"}}))
    assert main([str(path)]) == 2
    assert "model.pattern" in capsys.readouterr().err
    assert not dist.is_initialized()


# --- strict schema (issue #16): one line per bad value, naming the field, the value and what is allowed

DEMO = ROOT / "recipes" / "tiny_hybrid_cp2.yaml"


@pytest.mark.parametrize("override, line", [
    ("train.save_every=2.5", "train.save_every: got 2.5 (float); expected an integer >= 0"),
    ("train.progress=maybe", "train.progress: got 'maybe' (string); expected true or false"),
    ("model.moh_top_k=true", "model.moh_top_k: got true (bool); expected an integer >= 1"),
    ("train.steps=2.5", "train.steps: got 2.5 (float); expected an integer >= 1"),
    ("train.seed=1.5", "train.seed: got 1.5 (float); expected an integer >= 0"),
    ("train.steps=null", "train.steps: got null; expected an integer >= 1"),
    ("train.steps=[3]", "train.steps: got [3] (list); expected an integer >= 1"),
    ("optim.lr={a: 1}", "optim.lr: got {'a': 1} (mapping); expected a finite number > 0"),
    ("data.text_files=notes.txt", "data.text_files: got 'notes.txt' (string); expected a list of strings"),
    ("parallel.cp_schemes=ring", "parallel.cp_schemes: got 'ring' (string); expected 'auto' or a mapping"),
    ("optim.lr=.inf", "optim.lr: got inf (float); expected a finite number > 0"),
    ("optim.lr=.nan", "optim.lr: got nan (float); expected a finite number > 0"),
    ("optim.lr=0", "optim.lr: got 0 (int); expected a finite number > 0"),
    ("optim.lr=-3e-4", "optim.lr: got -0.0003 (float); expected a finite number > 0"),
    ("model.dtype=fp16", "model.dtype: got 'fp16' (string); expected one of 'fp32', 'bf16'"),
    ("train.on_corrupt_checkpoint=ignore", "train.on_corrupt_checkpoint: got 'ignore' (string)"),
    ("model.num_kv_heads=3", "model.num_kv_heads=3 must divide model.num_attention_heads=4"),
    ("parallel.cp_schemes.mamba=ring", "parallel.cp_schemes.mamba: unknown key 'mamba'"),
    ("parallel.cp_balance=round_robin",
     "parallel.cp_balance: got 'round_robin' (string); expected one of 'zigzag', 'cost'"),
    ("train.stepz=3", "train.stepz: unknown field; fields of train: "),
    ("model=null", "model: got null; expected a mapping with fields"),
])
def test_bad_value_is_one_line(override, line):
    from seqpar.train.config import RecipeError, load_recipe

    with pytest.raises(RecipeError) as e:
        load_recipe(DEMO, [override])
    assert e.value.lines == [e.value.lines[0]] and e.value.lines[0].startswith(line), e.value.lines


def test_yaml_numbers_and_file_errors(tmp_path):
    from seqpar.train.config import RecipeError, load_recipe

    # YAML 1.1 reads 1e6 / 3e-4 as strings; the recipe loader reads them as numbers (YAML 1.2)
    assert load_recipe(DEMO, ["optim.lr=1e-2", "optim.min_lr=1E-5"]).optim.lr == 1e-2
    assert load_recipe(DEMO, ["data.max_bytes=1000"]).data.max_bytes == 1000

    def err(text: str) -> list[str]:
        p = tmp_path / "r.yaml"
        p.write_text(text)
        with pytest.raises(RecipeError) as e:
            load_recipe(p)
        assert len(e.value.lines) == 1
        return e.value.lines[0]

    assert "r.yaml: the recipe is empty" in err("")
    assert "r.yaml: the recipe is empty" in err("# only a comment\n")
    assert "r.yaml:3:3: YAML error: duplicate key 'lr' (first at line 2)" in err("optim:\n  lr: 1\n  lr: 2\n")
    syntax = err("model: {preset: tiny\n  x: [\n" + "train: {}\n" * 50)
    assert syntax.startswith(str(tmp_path / "r.yaml") + ":2:") and "YAML error" in syntax
    assert "a recipe must be a mapping" in err("- model\n")
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match=r"train\.steps is not a section"):
        load_recipe(DEMO, ["train.steps.x=1"])


def test_several_bad_values_one_line_each():
    from seqpar.train.config import RecipeError, load_recipe

    with pytest.raises(RecipeError) as e:
        load_recipe(DEMO, ["train.steps=2.5", "optim.lr=.inf", "model.moh_top_k=true"])
    assert sorted(x.split(":")[0] for x in e.value.lines) == ["model.moh_top_k", "optim.lr", "train.steps"]


def test_model_shape_overrides():
    from seqpar.models import transformer_config
    from seqpar.train.config import load_recipe

    cfg = load_recipe(DEMO, ["model.num_attention_heads=8", "model.num_kv_heads=2", "model.hidden_size=128",
                             "model.num_layers=2", "model.ffn_hidden_size=96"])
    s = cfg.model.shape
    assert (s.num_layers, s.hidden_size, s.num_attention_heads, s.num_query_groups, s.ffn_hidden_size) == \
        (2, 128, 8, 2, 96)
    assert s.pattern == "ASLH"
    t = transformer_config(s)
    assert (t.num_attention_heads, t.num_query_groups, t.kv_channels) == (8, 2, 16)
    with pytest.raises(ValueError, match=r"model\.hidden_size=100 must be a multiple of model\.num_attention_heads=8"):
        load_recipe(DEMO, ["model.num_attention_heads=8", "model.hidden_size=100"])
    # checks that used the preset's heads now use the overridden ones
    with pytest.raises(ValueError, match=r"moh_num_shared_heads \+ model\.moh_top_k = 1 \+ 2 must be <= the 2"):
        load_recipe(DEMO, ["model.num_attention_heads=2", "model.num_kv_heads=1", "model.moh_top_k=2"])


def test_shape_override_builds_the_model():
    from seqpar.models import preset
    from seqpar.train.cli import dry_run
    from seqpar.train.config import load_recipe

    # the dry run builds the model on the meta device in this process (its own fake world, no group left)
    cfg = load_recipe(DEMO, ["parallel.context_parallel=1", "model.num_attention_heads=8", "model.num_kv_heads=2",
                             "data.dataset=mqar", "data.vocab_size=64", "data.seq_len=64"])
    info = dry_run(cfg)
    p = preset("tiny-hybrid")
    assert p.num_attention_heads == 4 and info["heads"] == 8 and info["kv_heads"] == 2


def test_one_definition_per_attention_field():
    """model.s2_*/moh_* and parallel.cp_schemes/usp/backend are the megatron config's fields: same
    names (backend = seqpar_backend), same defaults, same validation."""
    import dataclasses

    from seqpar.megatron.config import AttentionModelFields, AttentionParallelFields, SeqparTransformerConfig
    from seqpar.train.config import ModelConfig, ParallelConfig

    dc = {f.name: f for f in dataclasses.fields(SeqparTransformerConfig)}
    for section, fields in ((ModelConfig, AttentionModelFields), (ParallelConfig, AttentionParallelFields)):
        assert issubclass(section, fields)
        for name, info in fields.model_fields.items():
            assert section.model_fields[name] is not None and info.description
            f = dc["seqpar_backend" if name == "backend" else name]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert default == info.get_default(call_default_factory=True)
    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True)
    with pytest.raises(ValueError, match=r"s2_block_size: got 0 \(int\); expected an integer >= 1"):
        SeqparTransformerConfig(**base, s2_block_size=0)
    with pytest.raises(ValueError, match=r"SeqparTransformerConfig.seqpar_backend: got 'cuda'"):
        SeqparTransformerConfig(**base, seqpar_backend="cuda")
    with pytest.raises(ValueError, match=r"moh_top_k: got true \(bool\)"):
        SeqparTransformerConfig(**base, moh_top_k=True)
    assert SeqparTransformerConfig(**base, cp_schemes={"moh": "ring"}).cp_schemes["softmax"] == "allgather"


def test_cli_prints_once_on_rank_zero(tmp_path, capsys, monkeypatch):
    from seqpar.train.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 2.5\n")
    monkeypatch.setenv("RANK", "1")
    assert main([str(path)]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("train.steps: got 2.5 (float); expected an integer >= 1") == 1 and "Traceback" not in err


def test_check_and_dry_run_without_torchrun(tmp_path):
    """--check validates and prints the resolved recipe (YAML); --dry-run refuses a world that does not fit.
    (--dry-run of the 7B TP=2 x CP=8 layout on a fake 16-rank group, no NPROC=16 needed: README's command,
    run by tests/test_readme_commands.py.)"""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "seqpar.train", *a], capture_output=True, text=True,
                                    env=env, cwd=ROOT, timeout=180)
    r = run(str(DEMO), "--check", "--set", "train.steps=7", "--set", f"train.out_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["train"]["steps"] == 7
    r = run(str(DEMO), "--check", "--set", "train.steps=2.5")
    assert r.returncode == 2 and "train.steps: got 2.5 (float)" in r.stderr and "Traceback" not in r.stderr
    r = run(str(DEMO), "--dry-run", "--world", "3")
    assert r.returncode == 2 and "world size 3" in r.stderr


def test_recipes_readme_has_the_generated_reference():
    """recipes/README.md embeds schema_markdown() verbatim: a field's docs live once, in the schema."""
    from seqpar.train.config import schema_markdown

    text = (ROOT / "recipes" / "README.md").read_text()
    block = text.split("<!-- schema:begin -->\n", 1)[1].split("\n<!-- schema:end -->", 1)[0]
    assert block == schema_markdown().rstrip("\n"), "regenerate: .venv/bin/python -m seqpar.train.config"


def test_softmax_window_field():
    """model.softmax_window reaches the megatron config; a window with no softmax layer to take it, a
    window < 1 and megatron's own (Transformer Engine) window_size are refused, naming the field."""
    from seqpar.megatron import SeqparTransformerConfig
    from seqpar.train.config import load_recipe

    recipe = ROOT / "recipes" / "tiny_hybrid_cp2.yaml"
    assert load_recipe(recipe, ["model.softmax_window=8"]).model.softmax_window == 8
    with pytest.raises(ValueError, match=r"model\.softmax_window=8 applies to softmax \(A\) layers"):
        load_recipe(recipe, ["model.softmax_window=8", "model.pattern=SL"])
    with pytest.raises(ValueError, match=r"model\.softmax_window"):
        load_recipe(recipe, ["model.softmax_window=0"])
    kw = dict(num_layers=1, hidden_size=32, num_attention_heads=4)
    with pytest.raises(ValueError, match="softmax_window=W instead"):
        SeqparTransformerConfig(window_size=(8, 0), **kw)
    assert SeqparTransformerConfig(softmax_window=8, **kw).softmax_window == 8
