"""Real clients on an exported hybrid (A/S/L/H) model, offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1):
``AutoModelForCausalLM`` + ``AutoTokenizer``, ``transformers.pipeline("text-generation")``, and
lm-evaluation-harness (``lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True``) on
a multiple-choice task defined by a local YAML + JSONL file; it runs and reports a number."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from cp_harness import run_ranks
from train_harness import train_tiny

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> pathlib.Path:
    from seqpar.export.hf import export

    root = tmp_path_factory.mktemp("export_clients")
    run_ranks(train_tiny, 1, str(root / "run"), "tiny-hybrid", 2, timeout=300)
    return export(root / "run", root / "hf")


def test_auto_classes_and_pipeline(exported, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    tok = AutoTokenizer.from_pretrained(str(exported))
    model = AutoModelForCausalLM.from_pretrained(str(exported), trust_remote_code=True)
    assert type(model).__name__ == "SeqparForCausalLM" and model.config.layer_pattern == "ASLH"
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    prompt = "def main():\n    "
    text = gen(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt)
    # batched, left-padded prompts through the tokenizer (padding side left, pad id from training)
    batch = tok(["import os\n", "class A:\n    def f(self):"], return_tensors="pt", padding=True)
    assert tok.padding_side == "left" and (batch["attention_mask"][0] == 0).any()
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    single = model.generate(**tok(["import os\n"], return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert torch.equal(out[0, -6:], single[0, -6:])


def test_lm_eval_harness_runs_a_local_task(exported, tmp_path):
    docs = [{"question": "def add(a, b):\n    return a", "choices": [" + b", " ) ) ("], "label": 0},
            {"question": "import", "choices": [" os", " ((("], "label": 0},
            {"question": "for i in", "choices": [" range(10):", " ]]]"], "label": 0},
            {"question": "class Foo", "choices": [")))", "(object):"], "label": 1}]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "seqpar_tiny.yaml").write_text(
        "task: seqpar_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    out = tmp_path / "results"
    cmd = [str(pathlib.Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
           f"pretrained={exported},trust_remote_code=True,dtype=float32", "--tasks", "seqpar_tiny",
           "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2", "--output_path", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert res.returncode == 0, res.stderr[-4000:]
    files = list(out.rglob("results*.json"))
    assert files, res.stdout[-2000:]
    acc = json.loads(files[0].read_text())["results"]["seqpar_tiny"]["acc,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0 and not math.isnan(acc)
    assert "seqpar_tiny" in res.stdout
