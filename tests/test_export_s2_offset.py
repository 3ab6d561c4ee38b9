"""S2 decoding at any position: ``s2_attention`` takes any ``q_offset`` / ``k_offset`` >= 0 (not only
multiples of the block size). One-token decode at every position of a sequence, a chunk starting
mid-block and keys starting mid-block all match the fp64 reference (both backends: the torch
block-sparse path and the Triton kernels, here through the interpreter), forward and backward."""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels import S2Layout, s2_attention
from seqpar.kernels.s2.plan import build_plan
from seqpar.kernels.s2.reference import attention_reference
from s2_check import DEVICE, check_attention, make_qkv

LAY = S2Layout(block_size=16, local_blocks=2, vert_stride=4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_token_decode_every_position(backend):
    n = 83  # 6 blocks, the last partial
    q, k, v = make_qkv(1, n, n, 4, 2, 16, torch.float32)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), layout=LAY)
    step = 1 if backend == "torch" else 7  # the interpreter is slow: every 7th position (all phases mod 16)
    for p in range(0, n, step):
        o = s2_attention(q[:, p:p + 1], k[:, :p + 1], v[:, :p + 1], LAY, q_offset=p, backend=backend)
        assert (o.double() - ref[:, p:p + 1]).abs().max().item() < 1e-5, p


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unaligned_chunk_and_keys_match_reference(backend):
    q, k, v = make_qkv(2, 90, 90, 4, 2, 16, torch.float32)
    # queries 37..89 against all keys (q_offset 37 is mid-block), gradients included
    check_attention(lambda a, b, c: s2_attention(a, b, c, LAY, return_lse=True, q_offset=37, backend=backend),
                    q[:, 37:], k, v, layout=LAY, q_offset=37)
    # keys 5..89 (k_offset 5) for queries 50..89
    check_attention(lambda a, b, c: s2_attention(a, b, c, LAY, return_lse=True, q_offset=50, k_offset=5,
                                                 backend=backend),
                    q[:, 50:], k[:, 5:], v[:, 5:], layout=LAY, q_offset=50, k_offset=5)


def test_unaligned_tiles_follow_absolute_blocks():
    plan = build_plan(LAY.with_heads(4), True, 2, 20, 40, 21, 0, None, 16)
    # q rows 0..19 are positions 21..40: tiles [21, 32) [32, 41) -> rows [0, 11) [11, 20)
    assert plan.q_start.tolist() == [0, 11] and plan.q_end.tolist() == [11, 20]
    aligned = build_plan(LAY.with_heads(4), True, 2, 32, 64, 32, 0, None, 16)
    assert aligned.q_start.tolist() == [0, 16] and aligned.q_end.tolist() == [32, 32]  # unchanged
    with pytest.raises(ValueError, match="q_offset"):
        q, k, v = make_qkv(1, 4, 8, 2, 2, 16, torch.float32, device=DEVICE)
        s2_attention(q, k, v, LAY, q_offset=-1)
