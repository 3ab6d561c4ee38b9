"""Validation in the loop (issue 23 item 5): ``train.eval_interval`` / ``train.eval_iters`` on the
validation split, forward only.

- 1 rank: the training losses of a run with validation equal those of a run without it (the training
  stream, the parameters and the RNG are untouched); valid/loss and valid/ppl are in tensorboard at
  steps 2 and 4 (every eval_interval = 2 and the last step);
- 2 ranks: CP=2 and PP=2 (megatron engine; the forward-only pipeline schedule) and the DeepSpeed engine at CP=2 give the one-rank
  validation losses; a CP=2 run stopped after step 3 and resumed gives the uninterrupted run's
  validation (and training) scalars;
- ``train.eval_interval`` on data without a validation split is a recipe error naming the field.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from cp_harness import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVR = ["model.preset=tiny-hybrid", "parallel.context_parallel=1", "data.dataset=mqar", "data.seq_len=32",
       "data.global_batch=2", "data.vocab_size=64", "data.mqar_pairs=4", "data.mqar_queries=4",
       "train.steps=4", "optim.warmup_steps=1", "train.progress=false", "parallel.backend=torch",
       "train.time_attention=false", "model.s2_block_size=16", "model.s2_local_blocks=1", "model.s2_vert_stride=2"]
EVAL = ["train.eval_interval=2", "train.eval_iters=2"]


def _scalars(run: pathlib.Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a tensorboard scalar as TensorBoard shows it (a resumed run's purge applied);
    [] when the run never logged it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _runs(rank: int, world: int, root: str, plans: list) -> dict:
    """Each plan: (name, overrides, [(resume, stop_after), ...]) -> the training losses of every part."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import train

    out = {}
    try:
        for name, extra, parts in plans:
            cfg = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", OVR + [f"train.out_dir={root}/{name}"] + extra)
            out[name] = [train(cfg, resume=resume, stop_after=stop) for resume, stop in parts]
    finally:
        disable_cpu_compat()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    one = run_ranks(_runs, 1, str(root), [("ref", EVAL, [(False, None)]), ("noeval", [], [(False, None)])],
                    timeout=300)[0]
    two = run_ranks(_runs, 2, str(root), [
        ("cp2", EVAL + ["parallel.context_parallel=2"], [(False, None)]),
        ("cp2_resumed", EVAL + ["parallel.context_parallel=2"], [(False, 3), (True, None)]),
        ("pp2", EVAL + ["parallel.pipeline_parallel=2"], [(False, None)]),
        ("ds_cp2", EVAL + ["parallel.context_parallel=2", "train.engine=deepspeed"], [(False, None)]),
    ], timeout=600)
    return root, one, two


def test_validation_leaves_training_untouched_and_is_logged(runs):
    root, one, _ = runs
    assert one["ref"] == one["noeval"]
    valid = _scalars(root / "ref", "valid/loss")
    assert [s for s, _ in valid] == [2, 4]
    assert valid[1][1] != valid[0][1]  # the model changed between the validations
    ppl = _scalars(root / "ref", "valid/ppl")
    for (_, loss), (_, p) in zip(valid, ppl):
        assert p == pytest.approx(2.718281828 ** loss, rel=1e-5)
    assert _scalars(root / "noeval", "train/loss") and not _scalars(root / "noeval", "valid/loss")


@pytest.mark.parametrize("name", ["cp2", "pp2", "ds_cp2"])
def test_parallel_layouts_validate_as_one_rank(runs, name):
    root, _, two = runs
    ref = _scalars(root / "ref", "valid/loss")
    got = _scalars(root / name, "valid/loss")
    assert [s for s, _ in got] == [s for s, _ in ref]
    for (_, a), (_, b) in zip(got, ref):
        assert a == pytest.approx(b, rel=2e-5), (name, got, ref)


def test_resumed_run_validates_as_the_uninterrupted_one(runs):
    root, _, two = runs
    assert [x for part in two[0]["cp2_resumed"] for x in part] == two[0]["cp2"][0]
    assert _scalars(root / "cp2_resumed", "valid/loss") == _scalars(root / "cp2", "valid/loss")


@pytest.mark.parametrize("data,match", [
    (["data.dataset=text", "data.vocab_size=512"], "data.dataset='text' has none"),
    (["data.dataset=indexed", "data.tokenizer=tok.model", "data.blend=[prefix]", "data.split=98,0,2"],
     "give valid a share in data.split"),
])
def test_eval_interval_without_a_validation_split_is_refused(data, match):
    from seqpar.train.config import RecipeError, load_recipe

    ovr = [o for o in OVR if not o.startswith(("data.dataset", "data.mqar"))]
    with pytest.raises(RecipeError, match=r"train\.eval_interval=2 needs a validation split.*" + match):
        load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", ovr + data + ["train.eval_interval=2"])
