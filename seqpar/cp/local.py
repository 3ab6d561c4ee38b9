"""The per-rank softmax-family op each CP strategy calls: one signature for softmax, s2 and moh.

``op(q, k, v, q_offset, k_offset, gates) -> (o, lse)`` with absolute token positions (autograd),
so a strategy only decides *which* keys a query chunk meets and where they sit in the sequence;
``op.backward(q, k, v, out, lse, dout, q_offset, k_offset, gates) -> (dq, dk, dv)`` is the kernel's
backward for one key block given the *merged* ``(out, lse)`` of the rows (no recompute, no autograd;
the ring uses it). MoH's gate gradient depends only on the merged output (``rowsum(dout · out) /
gates``), so the strategy forms it once.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch


class LocalOp:
    """``kind`` ("softmax" | "s2" | "moh") bound to its keyword arguments.

    ``kv_head_offset`` / ``total_kv_heads``: the local kv heads are a slice of the global ones
    (tensor parallelism, USP after its all-to-all); S2 patterns follow the global index.
    ``kv_runs`` (s2): the local kv heads are runs ``(local start, global kv head, length)`` of
    global heads instead (an S2 head placement under USP, ``seqpar.cp.s2_heads``): one kernel call
    per run.
    """

    def __init__(self, kind: str, kw: dict[str, Any], kv_head_offset: int = 0,
                 total_kv_heads: Optional[int] = None,
                 kv_runs: Optional[tuple[tuple[int, int, int], ...]] = None) -> None:
        if kind not in ("softmax", "s2", "moh"):
            raise ValueError(f"kind {kind!r} has no softmax-family local op")
        self.kind, self.kw = kind, kw
        self.kv_head_offset, self.total_kv_heads = kv_head_offset, total_kv_heads
        self.kv_runs = kv_runs
        self.common = {"sm_scale": kw.get("sm_scale"), "backend": kw.get("backend", "auto")}
        # softmax's sliding window (0: none): strategies read it to skip keys outside every window
        self.window = int(kw.get("window") or 0) if kind == "softmax" else 0

    def _runs(self, hkv: int) -> tuple[tuple[int, int, int], ...]:
        return self.kv_runs or ((0, self.kv_head_offset, hkv),)

    def __call__(self, q, k, v, q_off: int, k_off: int, gates: Optional[torch.Tensor]):
        from seqpar import kernels

        kw = self.kw
        if self.kind == "softmax":
            return kernels.flash_attention(q, k, v, causal=kw.get("causal", True), return_lse=True,
                                           q_offset=q_off, k_offset=k_off, window=self.window or None,
                                           **self.common)
        if self.kind == "s2":
            from seqpar.cp.s2_heads import s2_runs_forward

            return s2_runs_forward(q, k, v, self._runs(k.shape[2]), self.total_kv_heads, layout=kw["layout"],
                                   return_lse=True, q_offset=q_off, k_offset=k_off, **self.common)
        return kernels.moh_attention(q, k, v, gates, causal=kw.get("causal", True), return_lse=True,
                                     q_offset=q_off, k_offset=k_off, **self.common)

    def backward(self, q, k, v, out, lse, dout, q_off: int, k_off: int,
                 gates: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kw = self.kw
        if self.kind == "softmax":
            from seqpar.kernels.flash.api import flash_attention_backward

            return flash_attention_backward(q, k, v, out, lse, dout, causal=kw.get("causal", True),
                                            q_offset=q_off, k_offset=k_off, window=self.window or None,
                                            **self.common)
        if self.kind == "s2":
            from seqpar.cp.s2_heads import s2_runs_backward

            return s2_runs_backward(q, k, v, out, lse, dout, self._runs(k.shape[2]), self.total_kv_heads,
                                    layout=kw["layout"], q_offset=q_off, k_offset=k_off, **self.common)
        from seqpar.kernels.moh.api import moh_attention_backward

        return moh_attention_backward(q, k, v, gates, out, lse, dout, causal=kw.get("causal", True),
                                      q_offset=q_off, k_offset=k_off, **self.common)


def softmax_family_op(kind: str, kw: dict[str, Any], kv_head_offset: int = 0,
                      total_kv_heads: Optional[int] = None,
                      kv_runs: Optional[tuple[tuple[int, int, int], ...]] = None) -> LocalOp:
    """Bind ``kind`` ("softmax" | "s2" | "moh") and its keyword arguments to a :class:`LocalOp`."""
    return LocalOp(kind, kw, kv_head_offset, total_kv_heads, kv_runs)


def scatter_pieces(outs: Sequence[torch.Tensor], lay: Any, rank: int, *, tail: Sequence[int],
                   ties: Sequence[torch.Tensor]) -> torch.Tensor:
    """This rank's local buffer ``[b, L, *tail]`` from the outputs of its pieces (in piece order);
    padding slots are 0 and pass no gradient. ``ties``: tensors (the rank's inputs, the gathered
    K/V) the output stays tied to when the rank holds no piece at all, so that every rank still runs
    the backward collectives."""
    if lay.dense(rank):
        return torch.cat(list(outs), dim=1)
    t0 = ties[0]
    if not outs:  # only padding here: zeros, tied to the inputs' graph
        tie = sum(t.narrow(0, 0, 0).sum() for t in ties)
        return torch.zeros((t0.shape[0], lay.local_len, *tail), dtype=t0.dtype, device=t0.device) + tie
    from seqpar.cp.partition import cached_index

    rows = torch.cat(list(outs), dim=1)
    idx = cached_index(("piece_slots", lay, rank), rows.device, lambda: lay.local_slots(rank))
    return rows.new_zeros((rows.shape[0], lay.local_len, *rows.shape[2:])).index_copy(1, idx, rows)
