"""The three tasks: their training data (addressed by step, like every seqpar dataset) and their
evaluation on the trained model.

(a) ``text``: the Shakespeare works (``seqpar.quality.corpus``) tokenized once by the parent process
    (sentencepiece BPE trained on the training works, ``seqpar.data.get_tokenizer``), packed into
    windows (``seqpar.data.PackedTextDataset``, works joined by EOS); metric: the trainer's
    token-weighted loss (``forward_backward(forward_only=True)``) on the first ``val_windows``
    windows of the held-out works.
(b) ``mqar``: ``seqpar.data.MQARDataset(spread=True)``, one (pairs, length) setting per step in turn;
    metric: answer accuracy per setting on sequences of a fixed evaluation seed.
(c) ``passkey``: ``seqpar.data.passkey.PasskeyDataset`` with the needle at random depths; metric:
    whole-key exact match (and digit accuracy) per fixed depth.

Evaluation sets use seeds no training run uses, and the same sequences for every model and seed.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Sequence

import torch

from seqpar.quality.config import MQARTask, PasskeyTask, TextTask

EVAL_SEED = 7_777_777  # the evaluation sets' seed; training runs use the run seeds (small integers)


class Mixture:
    """Datasets taken in turn: step ``s`` is step ``s // n`` of dataset ``s % n`` (equal steps per
    setting, whatever their lengths)."""

    def __init__(self, datasets: Sequence[Any]) -> None:
        if not datasets:
            raise ValueError("a mixture needs at least one dataset")
        self.datasets = list(datasets)

    def batch(self, step: int, global_batch: int, rank: int = 0, ranks: int = 1):
        n = len(self.datasets)
        return self.datasets[step % n].batch(step // n, global_batch, rank, ranks)


# --------------------------------------------------------------------------------------------------
# data


def prepare_text(task: TextTask, corpus_path: pathlib.Path, out: pathlib.Path, cache_dir: pathlib.Path
                 ) -> dict[str, Any]:
    """Tokenize the corpus once (the parent process): ``out`` gets ``train_ids`` / ``valid_ids``
    (int64, works joined by EOS) as a weights-only torch file. Returns the corpus facts for the report."""
    from seqpar.data import encode_documents, get_tokenizer
    from seqpar.data.tokenizer import SP_MODEL, Tokenizer, _budget  # documents in order up to max_bytes
    from seqpar.quality import corpus

    train, held = corpus.split(corpus_path)
    train_docs = _budget(list(train.values()), task.max_bytes)
    sp = get_tokenizer(task.vocab_size, "\n".join(train_docs), cache_dir)
    tok = Tokenizer({SP_MODEL: sp.serialized_model_proto()}, f"quality text task ({task.vocab_size} pieces)", cache_dir)
    train_ids = encode_documents(tok, train_docs)
    valid_ids = encode_documents(tok, list(held.values()))
    need = task.val_windows * task.seq_len + 1
    if valid_ids.numel() < need:
        raise ValueError(f"the held-out works have {valid_ids.numel()} tokens, fewer than val_windows x seq_len + 1 "
                         f"= {need}")
    torch.save({"train_ids": train_ids, "valid_ids": valid_ids, "eod": tok.require_eod()}, out)
    return {"corpus": corpus.SDIST, "sha256": corpus.SHA256, "train_works": len(train), "held_out_works": sorted(held),
            "train_tokens": int(train_ids.numel()), "held_out_tokens": int(valid_ids.numel()),
            "val_tokens": task.val_windows * task.seq_len, "tokenizer": f"sentencepiece BPE, {sp.vocab_size()} pieces, "
            f"trained on the training works"}


def train_data(task_name: str, task: Any, seed: int, text_file: pathlib.Path | None = None) -> Any:
    """The training stream of ``task_name`` for run seed ``seed`` (``.batch(step, global_batch)``)."""
    from seqpar.data import MQARDataset, PackedTextDataset
    from seqpar.data.passkey import PasskeyDataset

    if task_name == "text":
        saved = torch.load(text_file, weights_only=True)
        return PackedTextDataset(saved["train_ids"], task.seq_len, seed=seed, eod=int(saved["eod"]))
    if task_name == "mqar":
        return Mixture([MQARDataset(task.vocab_size, n, p, q, seed=seed, spread=True) for p, q, n in task.settings])
    if task_name == "passkey":
        return PasskeyDataset(task.vocab_size, task.seq_len, task.key_len, seed=seed)
    raise ValueError(f"unknown task {task_name!r}")


def max_seq_len(task_name: str, task: Any) -> int:
    """The longest sequence the task trains on (the model's position range)."""
    return max(n for _, _, n in task.settings) if task_name == "mqar" else task.seq_len


# --------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``[b, s, vocab]`` logits of the megatron ``GPTModel`` (or its DDP wrapper) for ``tokens [b, s]``."""
    pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, pos, None)


def correct_predictions(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, chunk: int
                        ) -> torch.Tensor:
    """Bool ``[b, s]``: argmax prediction == label, evaluated ``chunk`` sequences at a time."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, tokens.shape[0], chunk):
        t = tokens[i:i + chunk].to(device)
        out.append((logits(model, t).argmax(-1) == labels[i:i + chunk].to(device)).cpu())
    return torch.cat(out)


def evaluate(task_name: str, task: Any, model_chunks: list[torch.nn.Module], text_file: pathlib.Path | None = None
             ) -> dict[str, float]:
    """Metrics of the trained model (flat names, documented in ``seqpar.quality.report``)."""
    model = model_chunks[0]
    model.eval()
    try:
        if task_name == "text":
            return _eval_text(task, model_chunks, text_file)
        if task_name == "mqar":
            return _eval_mqar(task, model)
        if task_name == "passkey":
            return _eval_passkey(task, model)
        raise ValueError(f"unknown task {task_name!r}")
    finally:
        model.train()


def _eval_text(task: TextTask, chunks: list[torch.nn.Module], text_file: pathlib.Path | None) -> dict[str, float]:
    from seqpar.train.engine import Batch
    from seqpar.train.runtime import micro_batches, param_device
    from seqpar.train.step import forward_backward

    ids = torch.load(text_file, weights_only=True)["valid_ids"]
    device = param_device(chunks)
    n, s = task.val_windows, task.seq_len
    windows = torch.stack([ids[i * s:(i + 1) * s + 1] for i in range(n)])  # the stream's first n windows, in order
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, task.batch):
            x = windows[i:i + task.batch].to(device)
            mask = torch.ones(x.shape[0], s, device=device)
            res = forward_backward(chunks, micro_batches(Batch(x[:, :-1].contiguous(), x[:, 1:].contiguous(), mask), 0),
                                   forward_only=True)
            loss_sum += res.loss * res.tokens
            tokens += res.tokens
    loss = loss_sum / tokens
    return {"val_loss": loss, "val_ppl": math.exp(loss)}


def mqar_key(pairs: int, seq_len: int) -> str:
    return f"mqar_acc_p{pairs}_n{seq_len}"


def _eval_mqar(task: MQARTask, model: torch.nn.Module) -> dict[str, float]:
    from seqpar.data import MQARDataset

    out = {}
    for p, q, n in task.settings:
        ds = MQARDataset(task.vocab_size, n, p, q, seed=EVAL_SEED, spread=True)
        tokens, labels, mask = ds.batch(0, task.eval_sequences)
        ok = correct_predictions(model, tokens, labels, task.batch)
        out[mqar_key(p, n)] = float((ok.float() * mask).sum() / mask.sum())
    out["mqar_acc_mean"] = sum(out.values()) / len(out)
    return out


def passkey_key(depth: float, what: str = "acc") -> str:
    return f"passkey_{what}_d{depth:.2f}"


def _eval_passkey(task: PasskeyTask, model: torch.nn.Module) -> dict[str, float]:
    from seqpar.data.passkey import PasskeyDataset, key_exact_match

    out, exact = {}, []
    for d in task.depths:
        ds = PasskeyDataset(task.vocab_size, task.seq_len, task.key_len, seed=EVAL_SEED, depth=d)
        tokens, labels, mask = ds.batch(0, task.eval_sequences)
        ok = correct_predictions(model, tokens, labels, task.batch)
        out[passkey_key(d)] = float(key_exact_match(ok, mask).mean())
        out[passkey_key(d, "digit_acc")] = float((ok.float() * mask).sum() / mask.sum())
        exact.append(out[passkey_key(d)])
    out["passkey_acc_mean"] = sum(exact) / len(exact)
    return out
