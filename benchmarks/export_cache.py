"""Decode-cache memory of an exported model per layer kind: softmax K/V (DynamicLayer), S2 block
cache (S2BlockCacheLayer: per kv head, the local window + that head's stride columns) and the
Lightning recurrent state (LightningStateLayer), measured on a real ``SeqparForCausalLM`` after a
prefill of N - 1 tokens and one decode step (the step that evicts what no later query reads).

Shapes: 8 query heads, 2 kv heads, head dim 64, fp32, batch 1; S2 layout block 64, local 4
blocks, vert_stride 8 (head step 4). Bytes per layer.

    python benchmarks/export_cache.py [--json PATH] [--lengths 512 2048 8192]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _util import print_table, write_json  # noqa: E402

from seqpar.kernels import lightning_slopes  # noqa: E402
from seqpar.models.hf.configuration_seqpar import SeqparConfig  # noqa: E402
from seqpar.models.hf.modeling_seqpar import SeqparForCausalLM, cache_nbytes  # noqa: E402


def _model() -> SeqparForCausalLM:
    cfg = SeqparConfig(vocab_size=64, hidden_size=512, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=8, num_key_value_heads=2, layer_pattern="ASL",
                       lightning_slopes=[None, None, lightning_slopes(8, 2, 3).tolist()],
                       s2_block_size=64, s2_local_blocks=4, s2_vert_stride=8, s2_head_step=4, kernel_backend="torch")
    torch.manual_seed(0)
    return SeqparForCausalLM(cfg).eval()


def measure(n: int, model: SeqparForCausalLM) -> dict:
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.randint(0, 64, (1, n))
    with torch.no_grad():
        model(ids[:, :-1], past_key_values=cache, use_cache=True)
        model(ids[:, -1:], past_key_values=cache, use_cache=True)
    per_layer = []
    for layer in cache.layers:
        one = DynamicCache()
        one.layers = [layer]
        per_layer.append(cache_nbytes(one))
    dense, s2, lightning = per_layer
    return {"tokens": n, "softmax_kv_MiB": dense / 2**20, "s2_block_MiB": s2 / 2**20,
            "s2_vs_dense": s2 / dense, "lightning_state_KiB": lightning / 2**10, "lightning_vs_dense": lightning / dense}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model = _model()
    rows = [measure(n, model) for n in args.lengths]
    print_table(rows, "decode cache bytes per layer (8 heads / 2 kv heads, d=64, fp32, batch 1; "
                      "S2 block 64, local 4, stride 8)")
    if args.json:
        write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
