"""Throughput you can compare: model FLOPs of a training step, TFLOP/s per GPU, MFU, peak memory.

Model FLOPs of one training step (forward + backward, the Megatron-LM / PaLM convention: what the
model needs, no activation recompute, no kernel's recomputed ``S``):

* ``6 N`` per token for the dense matmuls, ``N`` = the weights of every matmul (QKV(G), output
  projection, SwiGLU MLP, MoH router, the LM head; not the embedding lookup, not norm weights);
* plus each layer's attention FLOPs by kind, per document (document masking: a document attends to
  itself only) from :mod:`seqpar.kernels.flops` — dense causal pairs, S2 by its mask, Lightning linear
  in length, MoH by its active heads ``(shared + top_k) / heads`` — with ``recompute=False``.

Every rank of a DP group (TP x CP x PP) works on the same ``[global_batch / DP, seq]`` rows, so one
GPU's share is the rows' FLOPs over ``TP x CP x PP``. MFU = those FLOPs per second over the device's
dense peak in the model's math mode (:data:`PEAK_TFLOPS`: bf16, TF32 or fp32; or ``train.peak_tflops``);
with no known peak (CPU, an unlisted GPU) MFU is not reported.
"""

from __future__ import annotations

import resource
import sys
from typing import Any, Optional, Sequence

import torch

from seqpar.kernels.flops import PEAK_TFLOPS, attention_flops, math_mode

def device_peak_tflops(device: torch.device | str, dtype: str = "bf16") -> Optional[float]:
    """The dense peak of ``device`` from :data:`PEAK_TFLOPS` for a model of recipe dtype ``dtype``
    (:func:`math_mode`); ``None`` on a CPU or an unlisted GPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[math_mode(dtype)] for key, peaks in PEAK_TFLOPS if key in name), None)


def matmul_params(cfg: Any, vocab_size: int) -> int:
    """``N`` of ``6 N``: the weights of every matmul of the whole model (all TP / PP shards) — the
    closed-form parameter count of :mod:`seqpar.train.memory` less the embedding table and the norm
    weights (vectors, no matmul)."""
    from seqpar.train.memory import closed_form_params

    return closed_form_params(cfg.model.shape, cfg.model.layers, vocab_size, 1, first=False, last=True,
                              moh_num_shared_heads=cfg.model.moh_num_shared_heads, norms=False)


class ModelFlops:
    """Model FLOPs (forward + backward, see the module docstring) of ``[b, s]`` rows of a recipe's
    model, for the row's documents. Built once per run; the attention count of each (kind,
    document length) is cached."""

    def __init__(self, cfg: Any, vocab_size: int) -> None:
        from seqpar.megatron.config import s2_layout

        m, p = cfg.model, cfg.model.shape
        self.kinds = m.layer_kinds
        self.n = matmul_params(cfg, vocab_size)
        self.heads, self.kv_heads = p.num_attention_heads, p.num_query_groups
        self.head_dim = p.hidden_size // p.num_attention_heads
        # the model's own layout (seqpar.megatron.attention's S2 layers), only where S2 layers exist
        self.layout = s2_layout(m, self.heads) if "s2" in self.kinds else None
        self.moh_active = m.moh_active
        self.softmax_window = m.softmax_window  # A layers count the window's pairs only
        self.shards = cfg.parallel.tensor_parallel * cfg.parallel.context_parallel * cfg.parallel.pipeline_parallel
        self._cache: dict[int, float] = {}

    def attention(self, kind: str, doc_len: int) -> float:
        """Forward + backward attention FLOPs of one layer of ``kind`` over one document of ``doc_len`` tokens."""
        return attention_flops(kind, batch=1, seq_len=doc_len, heads=self.heads, head_dim=self.head_dim,
                               kv_heads=self.kv_heads, layout=self.layout, active_fraction=self.moh_active,
                               backward=True, recompute=False,
                               window=self.softmax_window if kind == "softmax" else None)

    def document(self, doc_len: int) -> float:
        """Model FLOPs of one document of ``doc_len`` tokens (all layers, forward + backward)."""
        if doc_len not in self._cache:
            self._cache[doc_len] = 6.0 * self.n * doc_len + sum(
                layers * self.attention(kind, doc_len) for kind, layers in self.kinds.items())
        return self._cache[doc_len]

    def rows(self, doc_lens: Sequence[int]) -> float:
        """Model FLOPs of rows packing documents of these lengths (every row's documents, in order)."""
        return sum(self.document(int(n)) for n in doc_lens)

    def batch(self, batch: Any) -> float:
        """Model FLOPs of a ``seqpar.data.Batch`` (its documents: ``cu_seqlens()``, host only)."""
        cu, _ = batch.cu_seqlens()
        return self.rows((cu[1:] - cu[:-1]).tolist())


def peak_memory_bytes(device: torch.device | str) -> tuple[int, str]:
    """(bytes, what was measured): CUDA ``max_memory_allocated`` on a GPU, else the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "peak RSS"  # Linux reports KiB


class Throughput:
    """Per-step perf numbers of a run on this rank's device: tokens/s and model TFLOP/s per GPU, MFU
    (against ``peak_tflops``: the recipe's ``train.peak_tflops`` else the device's table entry, else
    none) and peak memory; keeps the run's totals for the end-of-run summary."""

    def __init__(self, cfg: Any, vocab_size: int, device: torch.device | str) -> None:
        self.flops = ModelFlops(cfg, vocab_size)
        self.device = torch.device(device)
        self.peak = (cfg.train.peak_tflops if cfg.train.peak_tflops is not None
                     else device_peak_tflops(self.device, cfg.model.dtype))
        self.steps: list[tuple[int, float, float]] = []  # (tokens, seconds, FLOPs per GPU) of each step

    def step(self, batch: Any, dt: float) -> dict[str, float]:
        """The ``perf/*`` scalars of a training step of this DP rank's ``batch`` (a ``seqpar.data.Batch``
        ``[global_batch / DP, seq]``, host-side document boundaries) that took ``dt`` seconds:
        tokens_per_s_per_gpu and tflops_per_gpu (one GPU's share, the batch's tokens and model FLOPs
        over TP x CP x PP), mfu (only with a peak), peak_memory_gib. Host only, no sync."""
        shards = self.flops.shards
        tokens, fl = batch.tokens.numel() / shards, self.flops.batch(batch) / shards
        self.steps.append((tokens, dt, fl))
        tflops = fl / dt / 1e12
        out = {"tokens_per_s_per_gpu": tokens / dt, "tflops_per_gpu": tflops}
        if self.peak:
            out["mfu"] = tflops / self.peak
        out["peak_memory_gib"] = peak_memory_bytes(self.device)[0] / 2**30
        return out

    def summary(self) -> str:
        """One line for the end-of-run summary: the averages over the run's steps (without the
        first, warm-up and compilation, when there are others), MFU (or why not) and peak memory."""
        steps = self.steps[1:] or self.steps
        if not steps:
            return "no steps run"
        tokens, seconds, fl = (sum(col) for col in zip(*steps))
        tflops = fl / seconds / 1e12
        mfu = (f"MFU {100 * tflops / self.peak:.1f}% of {self.peak:g} TFLOP/s" if self.peak
               else "MFU not reported (no peak TFLOP/s known for this device; set train.peak_tflops)")
        mem, what = peak_memory_bytes(self.device)
        return (f"{tokens / seconds:,.0f} tokens/s per GPU, {tflops:.3g} model TFLOP/s per GPU, "
                f"{mfu}, peak memory {mem / 2**30:.2f} GiB ({what})")


__all__ = ["PEAK_TFLOPS", "ModelFlops", "Throughput", "device_peak_tflops", "math_mode", "matmul_params",
           "peak_memory_bytes"]
