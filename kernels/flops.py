"""Attention FLOPs per kind: the one place that counts them (the benchmark harness's TFLOP/s, the
context-parallel step model, and a trainer's MFU all use these functions), and the devices' dense
peak rates they are compared against (:data:`PEAK_TFLOPS`, :func:`math_mode`).

Only the FLOPs the mask *needs* are counted: the visible (query, key) pairs of causal softmax
attention (``N (N + 1) / 2`` per head, not ``N^2``), S2's listed blocks (token-level causal on the
diagonal blocks), MoH's active (token, head) pairs, Lightning's causal pairs inside each chunk
plus its state terms. A kernel that computes more (masked-out halves of diagonal tiles, MoH's
"compute every head then multiply by 0") is charged for the needed FLOPs only, so its TFLOP/s is
lower: that is the point of the comparison.

Conventions (a multiply-add is 2 FLOPs):

* softmax (dense, S2, MoH), per visible pair and head: forward ``2 (d + dv)`` (``Q Kᵀ`` and
  ``P V``); backward ``2 (3 d + 2 dv)`` (``S`` recomputed, ``dV``, ``dP``, ``dQ``, ``dK``: the
  FlashAttention-2 count, 2.5x the forward at ``d == dv``). With ``recompute=False`` (the model-FLOPs
  / MFU convention of Megatron-LM and PaLM: only the FLOPs the model needs, none a kernel redoes)
  backward is ``2 (2 d + 2 dv)`` = ``dV``, ``dP``, ``dQ``, ``dK``: 2x the forward.
* lightning, per token and head with chunk ``C`` (64, the block of the Lightning-2 algorithm):
  forward ``2 (dk + dv) (C + 1) / 2`` (causal pairs inside the chunk) ``+ 4 dk dv`` (``q KV`` and
  the state update ``kᵀ v``); backward 2x the forward (each forward product has two gradient
  products). Independent of the sequence length: that is linear attention.
"""

from __future__ import annotations

from typing import Optional

import torch

KINDS = ("softmax", "s2", "lightning", "moh")
LIGHTNING_CHUNK = 64


def causal_pairs(seq_len: int) -> int:
    """Visible (query, key) pairs of causal attention over ``seq_len`` tokens, one head."""
    return seq_len * (seq_len + 1) // 2


def s2_pairs(layout, seq_len: int, num_heads: int, num_kv_heads: int) -> int:
    """Visible (query, key) pairs summed over the query heads of S2 attention of one sequence
    (positions 0 .. seq_len - 1): ``block_size^2`` per listed off-diagonal block, the causal
    triangle on the diagonal, clipped at ``seq_len``.

    O(blocks) per kv head, so it serves the CP model at millions of tokens: the stride test of the
    layout depends on the key block only, so one row far below the band gives every column's
    verdict (``S2Layout.kv_block_mask``: the layout's own rule, evaluated once per column).
    """
    layout.validate_heads(num_kv_heads)
    layout = layout.with_heads(num_heads)
    bs, local = layout.block_size, layout.local_blocks
    nb = -(-seq_len // bs)
    cols = torch.arange(nb, dtype=torch.int64)
    far_row = torch.tensor([nb - 1 + local], dtype=torch.int64)
    strided = layout.kv_block_mask(num_kv_heads, far_row, cols)[:, 0, :]  # [hkv, nb]
    # row i reads the band j in (i - local, i] and the strided columns j <= i - local
    prefix = torch.cumsum(strided.to(torch.int64), dim=1)  # strided columns 0 .. j
    rows = torch.arange(nb, dtype=torch.int64)
    last_far = rows - local  # last column outside the band, < 0: none
    far_blocks = torch.where(last_far >= 0, prefix[:, last_far.clamp(min=0)], torch.zeros_like(prefix[:, :1]))
    band = torch.minimum(rows + 1, torch.tensor(local))
    tail = seq_len - (nb - 1) * bs  # tokens in the last (maybe partial) block
    rows_in = torch.full((nb,), bs, dtype=torch.int64)
    rows_in[-1] = tail
    # pairs per row block: off-diagonal blocks give rows_in * bs (the last key block is partial only
    # on the diagonal of the last row), the diagonal block its causal triangle
    diag = rows_in * (rows_in + 1) // 2
    off = (band - 1 + far_blocks) * rows_in[None, :] * bs
    per_kv_head = (off + diag[None, :]).sum(dim=1)
    return int(per_kv_head.sum()) * (num_heads // num_kv_heads)


def attention_flops(kind: str, *, batch: int, seq_len: int, heads: int, head_dim: int,
                    v_head_dim: Optional[int] = None, kv_heads: Optional[int] = None, layout=None,
                    active_fraction: float = 1.0, backward: bool = False,
                    chunk: int = LIGHTNING_CHUNK, recompute: bool = True) -> float:
    """FLOPs of one causal attention call ``[batch, seq_len, heads, head_dim]`` that the mask needs.

    ``kind``: "softmax" (dense causal), "s2" (needs ``layout`` and ``kv_heads``), "moh"
    (``active_fraction`` of the (token, head) pairs computed), "lightning". ``backward``: forward
    + backward, else forward only. ``recompute``: the softmax backward recomputes ``S``
    (FlashAttention-2's count, the kernels' own work); ``False``: the model-FLOPs convention of MFU
    (backward 2x forward). Lightning's count has no recompute term either way. See the module
    docstring for the conventions.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= active_fraction <= 1.0:
        raise ValueError(f"active_fraction must be in [0, 1], got {active_fraction}")
    d = head_dim
    dv = head_dim if v_head_dim is None else v_head_dim
    if kind == "lightning":
        fwd = batch * seq_len * heads * (2 * (d + dv) * (chunk + 1) / 2 + 4 * d * dv)
        return fwd * (3 if backward else 1)
    if kind == "s2":
        if layout is None or kv_heads is None:
            raise ValueError("kind='s2' needs layout= and kv_heads=")
        pairs = batch * s2_pairs(layout, seq_len, heads, kv_heads)
    else:
        pairs = batch * heads * causal_pairs(seq_len) * (active_fraction if kind == "moh" else 1.0)
    fwd = 2 * (d + dv) * pairs
    return fwd + (2 * ((3 if recompute else 2) * d + 2 * dv) * pairs if backward else 0)


# Dense (no 2:4 sparsity) peaks, TFLOP/s, from the vendors' data sheets, per math mode: bf16 (and fp16)
# tensor cores, TF32 tensor cores (an fp32 model with torch's TF32 matmuls on), plain fp32 (TF32 off:
# torch's default); matched as substrings of torch.cuda.get_device_name, first match wins (so the PCIe /
# NVL H100s before "H100")
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),   # SXM
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),   # also GH200
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    ("A40", {"bf16": 149.7, "tf32": 74.8, "fp32": 37.4}),
    ("4090", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),   # bf16 with fp32 accumulate (a GEMM's rate)
)


def math_mode(dtype: str) -> str:
    """The peak column a model of recipe dtype ``dtype`` ("bf16" / "fp32") runs at: "bf16", or for fp32
    "tf32" when torch's TF32 matmuls are on (``torch.backends.cuda.matmul.allow_tf32``) else "fp32"."""
    if dtype in ("bf16", "fp16"):
        return "bf16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
