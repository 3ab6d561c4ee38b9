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


def test_s2_under_cp_needs_whole_blocks(tmp_path):
    from seqpar.train.config import load_recipe

    with pytest.raises(ValueError, match=r"data\.seq_len.*s2_block_size"):
        load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", ["data.seq_len=36"])


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
