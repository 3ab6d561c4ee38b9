"""Recipes that used to pass ``--check`` and fail late (in the first step, at model build, in the data
loader, on every rank with a traceback) are refused by ``--check`` with one line naming the field and
the fix (issue 21, items 4 and 5). Each row says where the recipe failed before.

Also: ``--check`` prints the resolved recipe as YAML that loads back to the same recipe, refuses an
``out_dir`` that holds a run (what ``make demo`` run twice hits), and what only the training machine
can judge (``parallel.backend: triton`` without CUDA or the interpreter) is refused before any process
group by the trainer itself.
"""

from __future__ import annotations

import pathlib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
MQAR = ROOT / "recipes" / "tiny_mqar.yaml"   # tiny-lightning (LLLA), one rank
DEMO = ROOT / "recipes" / "tiny_hybrid_cp2.yaml"  # tiny-hybrid (ASLH), CP=2

# (recipe, overrides, world, the one line starts with, ... and contains) -- the late failure it had before
LATE = [
    # megatron's rotary embedding in the first forward: "size of tensor a (25) must match ... (26)"
    (MQAR, ["model.hidden_size=100"], 1,
     "model.hidden_size=100 over model.num_attention_heads=4 gives head dim 25, but RoPE", "(e.g. 96 or 104)"),
    # S2Layout at model build: "S2Layout.block_size must be a power of two >= 16" under a traceback
    (MQAR, ["model.pattern=S", "model.s2_block_size=24"], 1, "model.s2_block_size: must be a power of two >= 16",
     "got 24"),
    (DEMO, ["model.s2_block_size=8"], 2, "model.s2_block_size: must be a power of two >= 16", "got 8"),
    # megatron's VocabParallelEmbedding at model build: "AssertionError: 65 is not divisible by 2"
    (MQAR, ["model.pattern=A", "parallel.tensor_parallel=2", "data.vocab_size=65"], 2,
     "parallel.tensor_parallel=2 must divide data.vocab_size=65", "e.g. 66"),
    # megatron's ColumnParallelLinear (fc1) at model build: "AssertionError: 129 is not divisible by 2"
    (MQAR, ["model.pattern=A", "parallel.tensor_parallel=2", "model.ffn_hidden_size=129"], 2,
     "parallel.tensor_parallel=2 must divide model.ffn_hidden_size=129", "multiple of 2"),
    # MQARDataset in the data loader: "ValueError: vocab_size 64 too small for 30 distinct keys"
    (MQAR, ["data.vocab_size=64", "data.mqar_pairs=30", "data.mqar_queries=2"], 1,
     "data.mqar_pairs=30 needs as many distinct keys, but data.vocab_size=64 has 28", ">= 68"),
    # the softmax / S2 / MoH Triton kernels spill registers above head dim 128 (kernel_resources harness)
    (MQAR, ["model.hidden_size=1024", "model.num_kv_heads=4"], 1,
     "model.hidden_size=1024 over model.num_attention_heads=4 gives head dim 256, above 128",
     "parallel.backend='torch'"),
    # silently ignored before: the degree is read by the 'usp' scheme only
    (MQAR, ["parallel.usp_ulysses_degree=2"], 1, "parallel.usp_ulysses_degree=2 is read only by the 'usp' CP scheme",
     "set it to 1"),
]

# near misses that must stay valid: Lightning layers have no RoPE; the torch backend takes any head dim;
# an even vocabulary at TP=2
VALID = [
    (MQAR, ["model.pattern=L", "model.hidden_size=100"], 1),
    (MQAR, ["model.hidden_size=1024", "model.num_kv_heads=4", "parallel.backend=torch"], 1),
    (MQAR, ["model.pattern=A", "parallel.tensor_parallel=2", "data.vocab_size=66"], 2),
    (DEMO, ["parallel.context_parallel=4", "parallel.cp_schemes.softmax=usp", "parallel.usp_ulysses_degree=2"], 4),
]


def _check(recipe, overrides, world):
    """What --check runs for a world of ``world`` ranks (seqpar.train.cli)."""
    from seqpar.train.config import load_recipe

    cfg = load_recipe(recipe, overrides)
    cfg.check_world(world)
    cfg.check_paths()
    return cfg


@pytest.mark.parametrize("recipe, overrides, world, start, contains", LATE,
                         ids=[" ".join(o) for _, o, *_ in LATE])
def test_late_failing_recipe_is_one_line_from_check(recipe, overrides, world, start, contains):
    from seqpar.train.config import RecipeError

    with pytest.raises(RecipeError) as e:
        _check(recipe, overrides, world)
    assert len(e.value.lines) == 1 and "\n" not in e.value.lines[0], e.value.lines
    assert e.value.lines[0].startswith(start) and contains in e.value.lines[0], e.value.lines[0]


@pytest.mark.parametrize("recipe, overrides, world", VALID, ids=[" ".join(o) for _, o, _ in VALID])
def test_near_misses_stay_valid(recipe, overrides, world):
    _check(recipe, overrides, world)


def test_files_named_by_the_recipe_are_checked(tmp_path):
    """data.text_files (readable, non-empty files), deepspeed.config (a readable file), train.out_dir and
    data.cache_dir (writable or creatable folders): one line per bad path, before any process."""
    from seqpar.train.config import RecipeError

    text = tmp_path / "a.txt"
    text.write_text("some text\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _check(DEMO, [f"data.text_files=[{text}]", f"train.out_dir={tmp_path / 'new' / 'run'}",
                  f"data.cache_dir={tmp_path / 'spm'}"], 2)
    with pytest.raises(RecipeError) as e:
        _check(DEMO, [f"data.text_files=[{text}, {tmp_path / 'missing.txt'}, {empty}, {tmp_path}]",
                      f"train.out_dir={blocker / 'run'}", f"data.cache_dir={blocker}"], 2)
    assert e.value.lines == [
        f"data.text_files[1]='{tmp_path / 'missing.txt'}': no such file; fix the path or remove the entry",
        f"data.text_files[2]='{empty}' is empty; give a file with text or remove the entry",
        f"data.text_files[3]='{tmp_path}' is not a regular file; give a file path",
        f"data.cache_dir='{blocker}' is not a folder (the run writes into it); give a folder path",
        f"train.out_dir='{blocker / 'run'}' cannot be created: '{blocker}' is not a writable folder; give a path "
        f"under a folder you can write to"], e.value.lines
    with pytest.raises(RecipeError, match=r"data\.text_files\[0\]='nope\.txt': no such file \(relative to the "):
        _check(DEMO, ["data.text_files=[nope.txt]"], 2)


def test_recipe_path_marks_the_path_fields():
    """Every field that names a path carries RecipePath (what check_paths walks; new path fields plug in by
    the annotation alone)."""
    from seqpar.train.config import SECTIONS, RecipePath, RunConfig

    marked = {f"{sec}.{name}" for sec in SECTIONS
              for name, info in RunConfig.model_fields[sec].annotation.model_fields.items()
              if any(isinstance(m, RecipePath) for m in info.metadata)}
    assert {"data.text_files", "data.cache_dir", "train.out_dir", "deepspeed.config"} <= marked


def test_check_cli_one_line_yaml_and_held_run(tmp_path, capsys, monkeypatch):
    from seqpar.train.cli import main
    from seqpar.train.config import load_recipe

    out = tmp_path / "run"
    assert main([str(MQAR), "--set", "model.hidden_size=100", "--check"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"seqpar-train: invalid recipe {MQAR}:" and len(err.splitlines()) == 2, err
    assert "Traceback" not in err
    # the resolved recipe as YAML, which loads back to the same recipe
    assert main([str(DEMO), "--set", f"train.out_dir={out}", "--set", "train.steps=7", "--check"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"# {DEMO}, resolved") and "\ntrain:\n  steps: 7\n" in printed
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(printed)
    assert load_recipe(dumped).to_dict() == load_recipe(DEMO, [f"train.out_dir={out}", "train.steps=7"]).to_dict()
    # an out_dir that holds a run (make demo, twice): refused by --check unless --resume / train.overwrite
    (out / "checkpoints" / "step_0000003").mkdir(parents=True)
    assert main([str(DEMO), "--set", f"train.out_dir={out}", "--check"]) == 2
    err = capsys.readouterr().err
    assert f"train.out_dir='{out}' already holds a run" in err and "pass --resume" in err
    assert main([str(DEMO), "--set", f"train.out_dir={out}", "--check", "--resume"]) == 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued job resumes by itself (signals.resume_mode)
    (out / "checkpoints" / "latest").write_text("step_0000003")
    assert main([str(DEMO), "--set", f"train.out_dir={out}", "--check"]) == 0
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert main([str(DEMO), "--set", f"train.out_dir={out}", "--set", "train.overwrite=true", "--check"]) == 0


def test_triton_backend_without_cuda_is_refused_before_any_process_group(monkeypatch, capsys):
    import torch
    import torch.distributed as dist

    from seqpar.train.cli import main

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main([str(MQAR), "--set", "parallel.backend=triton"]) == 2
    err = capsys.readouterr().err
    assert "parallel.backend='triton': backend='triton' needs CUDA tensors or TRITON_INTERPRET=1" in err
    assert not dist.is_initialized()
    # --check validates the recipe, not this machine (it may run on a login node)
    assert main([str(MQAR), "--set", "parallel.backend=triton", "--check"]) == 0


def test_corpus_summary_names_what_max_bytes_leaves_out(tmp_path):
    """Own text is never cut silently: the start-up line names the corpus, what is used and what is left out."""
    from seqpar.data import corpus_summary, load_documents

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x" * 600)
    b.write_text("y" * 2400)
    docs = load_documents([str(a), str(b)], 1000)
    line = corpus_summary([str(a), str(b)], 1000, docs, 500, 64)
    assert line.startswith("corpus: data.text_files (2 file(s)), 3,000 characters in 2 document(s); using 1,000 "
                           "characters in 2 document(s) = 500 tokens (with EOS), 7 sequences of data.seq_len=64")
    assert ("data.max_bytes=1,000 leaves out 2,000 characters (67%): the end of the last document used; set "
            "data.max_bytes=3000 to train on all of it") in line
    whole = corpus_summary([str(a), str(b)], 5000, load_documents([str(a), str(b)], 5000), 1500, 64)
    assert "leaves out" not in whole and "using 3,000 characters in 2 document(s)" in whole


def test_data_errors_only_the_run_can_see_are_config_errors(tmp_path):
    """A vocabulary larger than sentencepiece can learn from the text, or a corpus shorter than one sequence:
    ConfigError (one line, exit 2 from seqpar-train) naming the field and the fix, not a traceback."""
    import torch

    from seqpar.data import PackedTextDataset, get_tokenizer
    from seqpar.errors import ConfigError
    from seqpar.train.cli import _exit_codes

    assert any(ConfigError in classes and code == 2 for classes, code in _exit_codes())
    with pytest.raises(ConfigError, match=r"data\.vocab_size=8000 is more pieces than sentencepiece can learn from "
                                          r"2,400 characters of text \(at most \d+\); lower data\.vocab_size"):
        get_tokenizer(8000, "hello world " * 200, tmp_path)
    with pytest.raises(ConfigError, match=r"fewer than data\.seq_len \+ 1 = 65; lower data\.seq_len"):
        PackedTextDataset(torch.arange(10), 64)


def test_known_warnings_are_filtered_exactly():
    """megatron's non-leaf .grad read (DistributedOptimizer.zero_grad) and torch's deprecation of the
    collectives megatron's grad buffers call are filtered once by message; other warnings still show."""
    import warnings

    from seqpar.known_warnings import filter_known_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filter_known_warnings()
        filter_known_warnings()  # idempotent
        warnings.warn_explicit("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its",
                               UserWarning, "optimizer.py", 66, module="megatron.core.optimizer.optimizer")
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        # the same .grad text from anywhere else, and any other warning, still show
        warnings.warn_explicit("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its",
                               UserWarning, "mine.py", 1, module="mymodule")
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == [
        "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its",
        "something else is deprecated"]



def _data_outcome_job(rank: int, world: int, text: str, cache: str) -> str:
    # rank 0's tokenizer training fails (a vocabulary the text cannot fill); rank 1's data (MQAR) is fine
    from seqpar.data import build_sources
    from seqpar.errors import ConfigError
    from seqpar.train.config import load_recipe

    bad = load_recipe(DEMO, [f"data.text_files=[{text}]", "data.vocab_size=8000", f"data.cache_dir={cache}"])
    with pytest.raises(ConfigError) as e:  # before the agreement: rank 1 returned its sources and went on
        build_sources(bad if rank == 0 else load_recipe(MQAR))
    assert build_sources(load_recipe(MQAR)).vocab_size == 128  # every rank fine: returns on every rank
    return str(e.value)


def test_data_failure_on_one_rank_raises_the_same_error_on_every_rank(tmp_path):
    """build_sources: a data error on one rank (here rank 0 training the tokenizer) is raised on every
    rank, naming the failing rank on the others, instead of leaving them in their next collective until
    parallel.distributed_timeout_s (2 gloo ranks)."""
    from cp_harness import run_ranks

    text = tmp_path / "a.txt"
    text.write_text("hello world " * 200)
    msgs = run_ranks(_data_outcome_job, 2, str(text), str(tmp_path / "cache"), timeout=240)
    first = msgs[0].splitlines()[0]
    assert first.startswith("data.vocab_size=8000 is more pieces than sentencepiece can learn"), first
    assert msgs[1] == msgs[0].replace(first, f"{first} (raised on rank 0)", 1), msgs
