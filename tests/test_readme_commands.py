"""Every command in README.md, recipes/README.md and launchers/README.md runs as written on a fresh CPU
clone (issue 21, "Done when").

The commands are extracted from the READMEs' code blocks: each line of a ``bash`` block (comments
dropped), each ``$ `` line of a plain block (its output lines follow it), each ``python`` block as a
whole. Every extracted command must have an entry in ``COMMANDS``:

- ``Run``: cheap (``--help``, ``--check``, ``--dry-run``, the Slurm plan, the Usage snippet on CPU); run
  here, in a copy of the tracked files (a fresh clone: no ``runs/``, no ``out/``) with the venv, and its
  exit code (and shown output) checked;
- ``Covered``: expensive or needs what a CPU box lacks (training runs, two hosts, a Slurm cluster, a
  GPU, a Llama folder); the entry names the test that runs it, and that test must exist;
- ``Same``: a template line (``RECIPE.yaml``, ``[args]``) whose concrete form is another ``Run`` entry.

A command without an entry, or an entry whose command is in no README, fails the test: nothing is
silently unchecked.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
READMES = ("README.md", "recipes/README.md", "launchers/README.md")


@dataclass(frozen=True)
class Run:
    """Run the command in the clone; ``rc`` its exit code, ``out`` strings its stdout + stderr contain."""

    rc: int = 0
    out: tuple[str, ...] = ()
    stub_sbatch: bool = False


@dataclass(frozen=True)
class Covered:
    test: str
    """``tests/<file>.py::<test function>`` that runs this command (or its shrunk form)."""
    why: str = ""


@dataclass(frozen=True)
class Same:
    command: str
    """The ``Run`` command this template line stands for."""


TORCHRUN_DEMO = Covered("tests/test_train_torchrun.py::test_torchrun_two_ranks_demo_recipe",
                        "launchers/torchrun.sh on the demo recipe (fewer steps), then --resume")
MULTINODE = Covered("tests/test_multinode.py::test_two_nodes_equal_single_host", "two hosts: network namespaces")
SBATCH = Covered("tests/test_slurm.py::test_sbatch_two_nodes_completes", "a real Slurm cluster in namespaces")
DS_LAUNCHER = Covered("tests/test_deepspeed_launcher.py::test_wrapper_command_lines",
                      "the wrapper's command lines (DEEPSPEED=echo); the run: test_deepspeed_cli_runs_the_recipe")
DS_RUN = Covered("tests/test_deepspeed_launcher.py::test_deepspeed_cli_runs_the_recipe", "the deepspeed launcher")
OWN_DATA = Covered("tests/test_readme_data.py::test_readme_data_commands_run_as_written",
                   "README 'Train on your own data' in one interpreter (2 training steps); make demo-data: "
                   "test_make_demo_data_runs_the_readme_commands")
BENCH = Covered("tests/test_bench.py::test_smoke_report_is_schema_valid_and_complete",
                "every suite at --size smoke (timing runs take minutes to hours)")
QUALITY = Covered("tests/test_quality.py::test_smoke_report_is_schema_valid_and_complete",
                  "every model x task at --scale smoke on a stand-in corpus (the CPU-scale table takes ~25 min; "
                  "make quality-data fetches the corpus from the registry)")
BIG_DRY = ".venv/bin/python -m seqpar.train recipes/7b_lightning_cp8.yaml --dry-run"
SLURM_PLAN = "launchers/slurm.sh --dry-run --nodes 2 --gpus-per-node 8 recipes/7b_lightning_cp8.yaml"
SLURM_DEMO_PLAN = "launchers/slurm.sh --dry-run --nodes 1 --gpus-per-node 2 recipes/tiny_hybrid_cp2.yaml"
# the 7b recipe on a fresh clone: its indexed corpus is not there (README "Train on your own data")
NO_CORPUS = ("data.blend: data/corpus.bin not found; make it with: python -m seqpar.data.preprocess",
             "data.tokenizer='data/tokenizer.model' does not exist")

COMMANDS: dict[str, object] = {
    # README.md: set-up
    "make demo": TORCHRUN_DEMO,
    "make test": Covered("tests/test_readme_commands.py::test_every_readme_command_is_accounted_for",
                         "the whole suite: this test is part of it (.ci/run runs it on a fresh clone)"),
    # README.md: usage (CPU here: the torch implementations)
    "python: import torch / from seqpar.kernels import S2Layout, s2_attention, flash_attention": Run(),
    "python: from seqpar import cp": Covered("tests/test_cp_api.py::test_scheme_cost_closed_forms",
                                             "a fragment (group, q_full from a process group); cp.attention / shard "
                                             "/ unshard: tests/test_cp_attention.py"),
    # README.md: training with megatron-core
    "NPROC=2 launchers/torchrun.sh recipes/tiny_hybrid_cp2.yaml": TORCHRUN_DEMO,
    "NPROC=2 launchers/torchrun.sh recipes/tiny_hybrid_cp2.yaml --set train.steps=50 --set "
    "parallel.cp_schemes.moh=ring": TORCHRUN_DEMO,
    "NPROC=2 launchers/torchrun.sh recipes/tiny_hybrid_cp2.yaml --resume --set train.steps=400": TORCHRUN_DEMO,
    ".venv/bin/python -m seqpar.train --help": Run(out=("--check", "--dry-run", "--resume", "--world")),
    ".venv/bin/python -m seqpar.train recipes/tiny_hybrid_cp2.yaml --check":
        Run(out=("# recipes/tiny_hybrid_cp2.yaml, resolved", "\nmodel:\n", "  preset: tiny-hybrid\n")),
    ".venv/bin/python -m seqpar.train recipes/7b_lightning_cp8.yaml --check": Run(rc=2, out=NO_CORPUS),
    BIG_DRY: Run(out=('"dry_run": "ok"', '"world": 16', '"heads": 32', '"pattern": "LLLA"', "LLLALLLALLLALLLA")),
    ".venv/bin/python -m seqpar.train recipes/7b_lightning_cp8.yaml --dry-run --set parallel.cp_schemes=auto":
        Run(out=("CP schemes (chosen by parallel.cp_schemes: auto; CP=8, 8 GPUs/node",
                 "lightning     24     usp(U=4)", "  softmax      8     usp(U=4)")),
    ".venv/bin/python -m seqpar.train recipes/7b_lightning_cp8.yaml --dry-run --set parallel.pipeline_parallel=2 "
    "--set data.global_batch=2 --world 64": Run(out=('"dry_run": "ok"', '"world": 64')),
    "NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 launchers/torchrun.sh recipes/7b_lightning_cp8.yaml": MULTINODE,
    "sbatch --nodes=2 --gpus-per-node=8 launchers/slurm.sbatch recipes/7b_lightning_cp8.yaml": SBATCH,
    ".venv/bin/python -m seqpar.train recipes/tiny_mqar.yaml":
        Covered("tests/test_train_metrics.py::test_accuracy_startup_line_and_stop_summary_for_both_engines",
                "the MQAR recipe for a few steps on either engine"),
    # README.md: multi-node and Slurm
    "launchers/slurm.sh --nodes 2 --gpus-per-node 8 recipes/7b_lightning_cp8.yaml":
        Run(rc=2, out=NO_CORPUS, stub_sbatch=True),  # the stub sbatch must not be called
    SLURM_PLAN: Run(rc=2, out=NO_CORPUS),
    SLURM_DEMO_PLAN: Run(out=("1 node(s) [node1] x 2 process(es)", "recipe checked for a world of 1 x 2 = 2",
                              "(dry run: nothing launched)")),
    "REQUEUE=1 sbatch --nodes=2 --gpus-per-node=8 --time=04:00:00 launchers/slurm.sbatch "
    "recipes/7b_lightning_cp8.yaml": Covered("tests/test_slurm.py::test_preempted_job_requeues_and_resumes_exactly"),
    # README.md: DeepSpeed
    "make demo-deepspeed": DS_RUN,
    "NPROC=2 launchers/deepspeed.sh recipes/tiny_hybrid_zero2_cp2.yaml --set deepspeed.zero_stage=3 [--resume] "
    "[--dry-run]": DS_LAUNCHER,
    "HOSTFILE=hosts MASTER_ADDR=host0 launchers/deepspeed.sh RECIPE": DS_LAUNCHER,
    "HOSTFILE=hosts MASTER_ADDR=host0 NODE_RANK=r launchers/deepspeed.sh RECIPE": DS_LAUNCHER,
    "python: from seqpar.deepspeed import consolidated_fp32_state_dict":
        Covered("tests/test_deepspeed_engine.py::test_consolidated_fp32_state_dict", "needs a DeepSpeed run"),
    # README.md: export / import
    ".venv/bin/python -m seqpar.export.hf runs/tiny_hybrid_cp2 runs/tiny_hybrid_cp2/hf":
        Covered("tests/test_export_errors.py::test_cli_and_console_script", "needs a training run"),
    ".venv/bin/python -m seqpar.export.hf runs/tiny_hybrid_cp2/checkpoints/latest out/hf_bf16 --force --dtype bf16":
        Covered("tests/test_export_errors.py::test_force_replaces_only_an_earlier_export"),
    ".venv/bin/python -m seqpar.export.hf runs/tiny_hybrid_zero2_cp2 out/hf_zero2 --force":
        Covered("tests/test_deepspeed_checkpoint.py::test_export_cli_accepts_step_folder_and_latest"),
    ".venv/bin/python -m seqpar.export.from_hf $LLAMA_DIR out/run --pattern ALAL":
        Covered("tests/test_export_import.py::test_convert_layers_to_s2_and_lightning", "a local Llama folder"),
    ".venv/bin/python -m seqpar.train out/run/recipe.yaml --resume --set train.steps=1000":
        Covered("tests/test_export_import.py::test_roundtrip_bit_exact_and_trains_on", "resumes the imported run"),
    "make test-gpu": Covered("tests/gpu/test_gpu_train.py::test_recipe_model_trains_three_steps_on_one_nccl_rank",
                             "tests/gpu on a CUDA machine; every test skips on CPU"),
    # README.md: installing on a GPU cluster (tooling); needs the registries / a GPU host
    "make wheelhouse PYVER=3.12 WHEELHOUSE=build/wheelhouse": Covered(
        "tests/test_offline.py::test_install_pip_sees_the_wheelhouse_only",
        "a wheelhouse from the registries; .ci/run's make check-offline builds one and installs from it"),
    "make install TORCH=system PY=/path/to/python WHEELHOUSE=build/wheelhouse": Covered(
        "tests/test_offline.py::test_install_pip_sees_the_wheelhouse_only", "as above (make check-offline)"),
    "make install TORCH=system PY=python3 WHEELHOUSE=build/wheelhouse && make gpu-check": Covered(
        "tests/test_gpu_check.py::test_dry_run_toolchain_phase_fills_the_summary",
        "a GPU host: make gpu-check runs there; its runner is tested in a dry run"),
    "make gpu-check": Covered("tests/test_gpu_check.py::test_dry_run_toolchain_phase_fills_the_summary",
                              "a GPU host; its runner is tested in a dry run"),
    # README.md: train on your own data (run as written, training 2 steps instead of 200)
    ".venv/bin/python -m seqpar.data.documents --demo-corpus runs/demo_data/corpus.jsonl": OWN_DATA,
    ".venv/bin/python -m seqpar.data.tokenizer --input runs/demo_data/corpus.jsonl --vocab-size 2048 "
    "--output runs/demo_data/tokenizer.model": OWN_DATA,
    ".venv/bin/python -m seqpar.data.preprocess --input runs/demo_data/corpus.jsonl --json-key text "
    "--tokenizer runs/demo_data/tokenizer.model --output-prefix runs/demo_data/corpus --seq-len 256 --force": OWN_DATA,
    ".venv/bin/python -m seqpar.train recipes/tiny_data.yaml --set train.overwrite=true": OWN_DATA,
    ".venv/bin/python -m seqpar.export.hf runs/tiny_data runs/tiny_data/hf --force": OWN_DATA,
    ".venv/bin/python -c \"from transformers import AutoModelForCausalLM, AutoTokenizer; m = "
    "AutoModelForCausalLM.from_pretrained('runs/tiny_data/hf', trust_remote_code=True); t = "
    "AutoTokenizer.from_pretrained('runs/tiny_data/hf', trust_remote_code=True); print(t.decode(m.generate(**t('Return "
    "the', return_tensors='pt'), max_new_tokens=20, do_sample=False)[0]))\"": OWN_DATA,
    # README.md: benchmarks (minutes to hours of timing; the harness at smoke size, make bench's order)
    "make bench": Covered("tests/test_bench.py::test_make_bench_runs_every_benchmark_and_names_each_failure"),
    ".venv/bin/python -m seqpar.bench": BENCH,
    ".venv/bin/python -m seqpar.bench --suites s2 lightning --seqs 4096 8192 --budget-s 300": BENCH,
    # README.md: quality (the harness at smoke size)
    "make quality": QUALITY,
    'make quality QUALITY_ARGS="--seeds 0"': QUALITY,
    ".venv/bin/python -m seqpar.quality --tasks mqar passkey": QUALITY,
    # recipes/README.md
    ".venv/bin/python -m seqpar.train recipes/tiny_hybrid_cp2.yaml --set train.steps=2.5 --set optim.lr=.inf --check":
        Run(rc=2),  # and exactly the output shown under it (test below)
    # launchers/README.md
    "NPROC=2 launchers/torchrun.sh recipes/tiny_hybrid_cp2.yaml --resume": TORCHRUN_DEMO,
    "NPROC=2 MAX_RESTARTS=3 launchers/torchrun.sh recipes/tiny_hybrid_cp2.yaml":
        Covered("tests/test_signals.py::test_max_restarts_resumes_from_latest"),
    "NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC=8 launchers/torchrun.sh recipes/7b_lightning_cp8.yaml": MULTINODE,
    "NPROC=2 launchers/deepspeed.sh recipes/tiny_hybrid_zero2_cp2.yaml": DS_RUN,
    "NPROC=2 launchers/deepspeed.sh recipes/tiny_hybrid_zero2_cp2.yaml --set deepspeed.zero_stage=3": DS_RUN,
    "HOSTFILE=hosts MASTER_ADDR=host0 launchers/deepspeed.sh recipes/tiny_hybrid_zero2_cp2.yaml": DS_LAUNCHER,
    "HOSTFILE=hosts MASTER_ADDR=host0 NODE_RANK=1 launchers/deepspeed.sh recipes/tiny_hybrid_zero2_cp2.yaml":
        DS_LAUNCHER,
    "sbatch --nodes=2 --gpus-per-node=8 launchers/slurm.sbatch RECIPE.yaml [seqpar-train args]": SBATCH,
    "launchers/slurm.sh --nodes 2 --gpus-per-node 8 [--time 04:00:00 --partition gpu] RECIPE.yaml [args]":
        Same("launchers/slurm.sh --nodes 2 --gpus-per-node 8 recipes/7b_lightning_cp8.yaml"),
    "launchers/slurm.sh --dry-run --nodes 2 --gpus-per-node 8 RECIPE.yaml": Same(SLURM_DEMO_PLAN),
    "launchers/slurm.sbatch --dry-run RECIPE.yaml": Same(SLURM_DEMO_PLAN),  # slurm.sh --dry-run runs exactly this
}


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def extract(text: str) -> list[tuple[str, list[str]]]:
    """(command, output lines shown under it) for every command of a README's code blocks."""
    found: list[tuple[str, list[str]]] = []
    for lang, body in _blocks(text):
        if lang == "python":
            first = [ln for ln in body.splitlines() if ln.strip()][:2]
            key = first[0].split("#")[0].strip()
            if key == "import torch":
                key += " / " + first[1].split("#")[0].strip()
            found.append(("python: " + key, [body]))
        elif lang in ("bash", "sh"):
            for line in body.replace("\\\n", " ").splitlines():  # a trailing backslash continues the line
                cmd = re.sub(r"\s+#\s.*$", "", line).strip()
                if cmd and not cmd.startswith("#"):
                    found.append((" ".join(cmd.split()), []))
        elif lang == "":
            for line in body.splitlines():
                if line.startswith("$ "):
                    found.append((" ".join(line[2:].split()), []))
                elif found and found[-1][1] is not None and line and body.lstrip().startswith("$ "):
                    found[-1][1].append(line)
    return found


def readme_commands() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in READMES:
        for cmd, shown in extract((ROOT / name).read_text()):
            out.setdefault(cmd, shown)
    return out


def _test_exists(ref: str) -> bool:
    path, _, name = ref.partition("::")
    f = ROOT / path
    return f.is_file() and re.search(rf"^def {re.escape(name)}\(", f.read_text(), re.M) is not None


def test_every_readme_command_is_accounted_for():
    cmds = readme_commands()
    missing = [c for c in cmds if c not in COMMANDS]
    assert not missing, f"README commands without an entry in COMMANDS (run it here or name its test): {missing}"
    stale = [c for c in COMMANDS if c not in cmds]
    assert not stale, f"COMMANDS entries that no README holds any more: {stale}"
    for cmd, spec in COMMANDS.items():
        if isinstance(spec, Covered):
            assert _test_exists(spec.test), f"{cmd!r}: {spec.test} does not exist"
        if isinstance(spec, Same):
            assert isinstance(COMMANDS.get(spec.command), Run), f"{cmd!r}: {spec.command!r} is not a Run entry"


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> pathlib.Path:
    """The tracked files (what a fresh clone holds) with the test's venv as ``.venv``."""
    dst = tmp_path_factory.mktemp("clone") / "seqpar"
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in files.decode().split("\0") if n and (ROOT / n).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but the outputs
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
                 and not {".git", ".venv", "runs", "out", "__pycache__"} & set(p.relative_to(ROOT).parts)]
    for n in names:
        (dst / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / n, dst / n)
    venv = ROOT / ".venv" if (ROOT / ".venv" / "bin" / "python").exists() else pathlib.Path(sys.prefix)
    (dst / ".venv").symlink_to(venv, target_is_directory=True)
    return dst


def _env(tmp: pathlib.Path, stub: Optional[pathlib.Path]) -> dict[str, str]:
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC", "NNODES", "CHECK", "PYTHON",
            "TRITON_INTERPRET")  # the Usage snippet on CPU: the torch implementations, not the interpreter
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", SEQPAR_CACHE=str(tmp / "cache"))
    if stub is not None:
        env["PATH"] = f"{stub}:{env['PATH']}"
    return env


RUNS = [c for c, spec in COMMANDS.items() if isinstance(spec, Run)]


@pytest.mark.parametrize("cmd", RUNS)
def test_cheap_readme_command_runs_as_written(cmd, clone, tmp_path):
    spec = COMMANDS[cmd]
    stub = None
    if spec.stub_sbatch:  # submission without a cluster: a stand-in sbatch records its arguments
        stub = tmp_path / "bin"
        stub.mkdir()
        (stub / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'sbatch_args'}\n")
        (stub / "sbatch").chmod(0o755)
    shown = readme_commands()[cmd]
    if cmd.startswith("python: "):
        script = tmp_path / "snippet.py"
        script.write_text(shown[0])
        argv = [str(clone / ".venv" / "bin" / "python"), str(script)]
    else:
        argv = ["bash", "-c", cmd]
    r = subprocess.run(argv, cwd=clone, env=_env(tmp_path, stub), capture_output=True, text=True, timeout=600)
    both = r.stdout + r.stderr
    assert r.returncode == spec.rc, both[-3000:]
    assert "Traceback" not in both, both[-3000:]
    for s in spec.out:
        assert s in both, (s, both[-3000:])
    if spec.stub_sbatch:  # submitted only when the pre-flight passed
        assert (tmp_path / "sbatch_args").exists() == (spec.rc == 0)
    if shown and not cmd.startswith("python: "):  # the output the README shows under the command
        assert r.stderr.splitlines() == shown, r.stderr


def test_docs_name_every_recipe_and_launcher():
    """recipes/README.md's table lists every recipe; launchers/README.md has a section for every launcher
    and README.md's layout block names each of them (issue 21, item 14)."""
    recipes_readme = (ROOT / "recipes" / "README.md").read_text()
    table = [ln for ln in recipes_readme.splitlines() if ln.startswith("| `") and ".yaml`" in ln.split("|")[1]]
    listed = {ln.split("|")[1].strip().strip("`") for ln in table}
    assert listed == {p.name for p in (ROOT / "recipes").glob("*.yaml")}, listed
    launchers = sorted(p.name for p in (ROOT / "launchers").iterdir() if p.name != "README.md")
    headings = [ln for ln in (ROOT / "launchers" / "README.md").read_text().splitlines() if ln.startswith("## ")]
    assert not [n for n in launchers if not any(n in h for h in headings)], (launchers, headings)
    layout = next(body for lang, body in _blocks((ROOT / "README.md").read_text()) if "launchers/" in body
                  and "kernels/" in body)
    assert not [n for n in launchers if n not in layout], layout
