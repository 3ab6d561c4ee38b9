"""What the loop reports for either engine on README's MQAR recipe (issue 21, items 3, 11, 12):

- train/accuracy: the loss-masked tokens whose greedy prediction is the label (MQAR: recall over the
  answers), counted by ``seqpar.train.runtime.TokenAccuracy`` from the output layer's logits; exact under
  TP (vocabulary-parallel logits: the global argmax over the TP group), checked against the argmax of the
  gathered full logits with labels chosen so the expected count is known;
- the start-up line: the model, its parameter count (the closed form, equal to the sum of the built
  shards) and the layout;
- the end-of-run summary names where the run stopped and why (a signal), not the planned last step;
- perf/* (issue 23, item 6): tokens/s and model TFLOP/s per GPU (their ratio: the model FLOPs per
  token of seqpar.train.perf), MFU against train.peak_tflops (none without a peak on a CPU), peak
  memory; the throughput line of the summary.
"""

from __future__ import annotations

import pathlib

import pytest

from cp_harness import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "tiny_hybrid_cp2.yaml"
MQAR = ROOT / "recipes" / "tiny_mqar.yaml"  # README's one-process recipe
SMALL = ["data.dataset=mqar", "data.seq_len=32", "data.global_batch=2", "data.vocab_size=64", "data.mqar_pairs=4",
         "data.mqar_queries=4", "train.progress=false", "parallel.backend=torch", "parallel.context_parallel=1",
         "model.preset=tiny", "model.pattern=AL"]


def _accuracy_against_gathered_argmax(rank: int, world: int) -> tuple[float, float]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from seqpar.megatron import disable_cpu_compat, init_parallel
    from seqpar.train.config import load_recipe
    from seqpar.train.runtime import TokenAccuracy, build_model

    cfg = load_recipe(DEMO, SMALL + [f"parallel.tensor_parallel={world}"])
    init_parallel(world, 1, 1, seed=cfg.train.seed)
    try:
        model = build_model(cfg, 64)[0].eval()
        acc = TokenAccuracy([model])
        g = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, 64, (2, 32), generator=g)
        pos = torch.arange(32).expand_as(tokens)
        with torch.no_grad():
            local = model(tokens, pos, None)  # no labels: logits [b, s, vocab / TP]
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            best = torch.cat(parts, dim=-1).argmax(dim=-1)
            # even positions: the prediction (a hit), odd: another token (a miss)
            even = (torch.arange(32) % 2 == 0).expand_as(best)
            labels = torch.where(even, best, (best + 1) % 64)
            mask = torch.ones(2, 32)
            mask[1, 20:] = 0  # masked tokens never count
            model(tokens, pos, None, labels=labels)
        return float(acc.take(mask)), float((even.float() * mask).sum())
    finally:
        parallel_state.destroy_model_parallel()
        disable_cpu_compat()


def test_token_accuracy_is_the_greedy_hit_count_under_tp():
    for got, want in run_ranks(_accuracy_against_gathered_argmax, 2, timeout=300):
        assert got == want == 26.0  # 16 even positions of row 0, 10 of row 1's first 20


def _one_run(rank: int, world: int, out: str, engine: str, stop_at: int) -> tuple[list[float], list[str]]:
    """A few steps of the loop on ``engine`` with a stop signal seen at step ``stop_at``; the start-up
    and summary lines printed on rank 0."""
    import contextlib
    import io

    from seqpar.megatron import disable_cpu_compat
    from seqpar.train import signals
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import train

    cfg = load_recipe(MQAR, [f"train.out_dir={out}", "train.steps=5", "train.progress=false", "data.global_batch=4",
                             "parallel.backend=torch",  # (make test sets TRITON_INTERPRET=1)
                             f"train.engine={engine}", "deepspeed.zero_stage=1"]
                      + (["train.peak_tflops=0.001"] if engine == "megatron" else []))
    seen = {"n": 0}

    def stop_requested() -> bool:  # as if SIGTERM reached the ranks during step `stop_at`
        seen["n"] += 1
        if seen["n"] == stop_at:
            signals._state.signum = __import__("signal").SIGTERM
            return True
        return False

    signals.install(cfg)
    signals.stop_requested = stop_requested
    buf = io.StringIO()
    code = None
    with contextlib.redirect_stdout(buf):
        try:
            train(cfg)
        except SystemExit as e:  # raise_if_stopped: EXIT_INTERRUPTED
            code = e.code
    disable_cpu_compat()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(pathlib.Path(out) / "tb"))
    ea.Reload()
    perf = {tag: [e.value for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"] if tag.startswith("perf/")}
    return [e.value for e in ea.Scalars("train/accuracy")], buf.getvalue().splitlines() + [f"exit {code}"], perf


@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_accuracy_startup_line_and_stop_summary_for_both_engines(engine, tmp_path, monkeypatch):
    """README's ``python -m seqpar.train recipes/tiny_mqar.yaml`` (fewer steps) on either engine, stopped by a
    signal after step 3: train/accuracy (MQAR recall) logged, the start-up line, the stop summary."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    acc, lines, perf = run_ranks(_one_run, 1, str(tmp_path / engine), engine, 3, timeout=400)[0]
    text = "\n".join(lines)
    assert len(acc) == 3 and all(0.0 <= a <= 1.0 for a in acc), acc
    # start-up: the model, the closed-form parameter count and the layout, once
    from seqpar.train.config import load_recipe
    from seqpar.train.memory import closed_form_params

    p = load_recipe(MQAR).model.shape
    total = closed_form_params(p, "LLLA", 128, 1, first=True, last=True, moh_num_shared_heads=1)
    assert f"model tiny-lightning, layers LLLA (4), hidden 64, heads 4 / kv 2, ffn 128, vocab 128, fp32: " \
           f"{total:,} parameters" in text, text
    assert "layout TP=1 x CP=1 x PP=1 x DP=1 = 1 rank(s), engine " + engine in text
    assert f"rank 0 holds {total:,} parameters" in text  # one rank holds the whole model
    # the summary says where the run stopped and why, not the planned last step
    assert "steps 0->3 of 5 (stopped by SIGTERM after step 3; continue with --resume)" in text, text
    assert "steps 0->5" not in text and lines[-1] == "exit 75"
    # perf/*: per step, FLOPs per token = the model's (MQAR rows: one document of seq_len each)
    from seqpar.train.perf import ModelFlops

    cfg = load_recipe(MQAR)
    per_token = ModelFlops(cfg, 128).document(cfg.data.seq_len) / cfg.data.seq_len
    want = {"perf/tokens_per_s_per_gpu", "perf/tflops_per_gpu", "perf/peak_memory_gib"}
    assert set(perf) == want | ({"perf/mfu"} if engine == "megatron" else set()), perf
    assert all(len(v) == 3 and all(x > 0 for x in v) for v in perf.values()), perf
    for tok, tfl in zip(perf["perf/tokens_per_s_per_gpu"], perf["perf/tflops_per_gpu"]):
        assert tfl * 1e12 / tok == pytest.approx(per_token, rel=1e-5)
    if engine == "megatron":
        assert perf["perf/mfu"] == pytest.approx([t / 1e-3 for t in perf["perf/tflops_per_gpu"]], rel=1e-5)
    summary = next(line for line in lines if line.startswith("  throughput:  "))
    assert "tokens/s per GPU" in summary and "model TFLOP/s per GPU" in summary and "peak RSS" in summary
    assert ("% of 0.001 TFLOP/s" if engine == "megatron" else "MFU not reported") in summary, summary
