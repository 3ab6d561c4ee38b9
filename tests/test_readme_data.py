"""README "Train on your own data": every command of its code block runs as written (training 2
steps instead of 200), in one fresh interpreter that calls each command's entry point with the exact
argv from the README; `make demo-data` runs the same commands; and a recipe whose corpus is missing
(the 125m one) stops every rank before any process group, naming the files and the commands."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

DRIVER = r'''
import os, shlex, sys, json, time
commands = json.loads(sys.argv[1])
t0 = time.perf_counter()
# first: a rank of a torchrun world of 8 on the 125m recipe, whose corpus does not exist here: exit 2
# naming the files and the commands that make them, before init_process_group (nothing listens at :1)
from seqpar.train.cli import main as train_main
os.environ.update(WORLD_SIZE="8", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
print("missing corpus: exit", train_main([sys.argv[2], "--set", "train.out_dir=runs/missing"]), flush=True)
for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    del os.environ[k]
for argv in commands:
    print(f"[{time.perf_counter() - t0:.0f} s] $", shlex.join(argv), flush=True)
    if argv[1] == "-c":
        exec(compile(argv[2], "<README>", "exec"), {"__name__": "__main__"})
        continue
    assert argv[1] == "-m", argv
    module, args = argv[2], argv[3:]
    entry = {"seqpar.train": "seqpar.train.cli"}.get(module, module)
    main = getattr(__import__(entry, fromlist=["main"]), "main")
    rc = main(args)
    assert rc in (0, None), (argv, rc)
'''


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Train on your own data\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_readme_data_commands_run_as_written(tmp_path):
    commands = readme_commands()
    assert len(commands) == 6
    argvs = []
    for c in commands:
        argv = shlex.split(c.split("  #", 1)[0])
        assert argv[0] == ".venv/bin/python", c
        if argv[1:3] == ["-m", "seqpar.train"]:
            argv += ["--set", "train.steps=2", "--set", "train.save_every=0", "--set", "train.progress=false"]
        argvs.append(argv)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")   # the README runs from the repository root
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEQPAR_CACHE": str(tmp_path / "cache")}
    # a user on CPU runs these without TRITON_INTERPRET (make test sets it): parallel.backend "auto" then
    # trains and generates with the torch kernels, not the Triton interpreter (~3 s instead of minutes)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET"):
        env.pop(k, None)
    res = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs), str(ROOT / "recipes" / "125m_s2_cp4.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    out = res.stdout
    assert "missing corpus: exit 2" in out and not (tmp_path / "runs" / "missing").exists()
    assert "data/corpus.bin not found; make it with: python -m seqpar.data.preprocess" in res.stderr
    assert "python -m seqpar.data.tokenizer --input corpus.jsonl" in res.stderr
    assert "[seqpar.data.preprocess] " in out and "documents longer than seq_len=256" in out
    assert "[seqpar.data]   valid: " in out and "[seqpar.train] steps 0->2" in out
    assert "  validation:  loss " in out  # train.eval_interval of the recipe: validated after the last step
    hf = tmp_path / "runs" / "tiny_data" / "hf"
    assert (hf / "tokenizer.model").is_file() and (hf / "model.safetensors").is_file()
    assert out.strip().splitlines()[-1].startswith("Return the")   # the generated text


def test_make_demo_data_runs_the_readme_commands():
    make = (ROOT / "Makefile").read_text().split("\ndemo-data: install\n", 1)[1].split("\n\n", 1)[0]
    recipe = [line.strip().replace("$(BIN)/python", ".venv/bin/python") for line in make.splitlines()]
    assert recipe == [" ".join(c.split("  #", 1)[0].split()) for c in readme_commands()[:5]]

