"""Generation with transformers' Cache API on SeqparForCausalLM (tiny random models, plain torch):

- greedy ``generate()`` with the cache equals greedy without it, token for token, for softmax, S2,
  Lightning, MoH and the hybrid;
- batched generation with left padding equals each prompt generated alone;
- a Lightning layer's cache is its recurrent state only: bytes independent of the generated length;
- an S2 layer's cache holds, per kv head, exactly the tokens of the blocks that head can still read
  (local window + its stride columns), far fewer than a dense K/V cache.
"""

from __future__ import annotations

import pytest
import torch

from seqpar.models.hf.configuration_seqpar import SeqparConfig
from seqpar.models.hf.modeling_seqpar import LightningStateLayer, S2BlockCacheLayer, SeqparForCausalLM, cache_nbytes

VOCAB = 97


def _model(pattern: str, **kw) -> SeqparForCausalLM:
    from seqpar.kernels import lightning_slopes

    layers = len(pattern)
    slopes = [lightning_slopes(4, i, max(2, layers)).tolist() if c == "L" else None for i, c in enumerate(pattern)]
    cfg = SeqparConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, layer_pattern=pattern, lightning_slopes=slopes,
                       s2_block_size=16, s2_local_blocks=2, s2_vert_stride=4, s2_head_step=2, moh_num_shared_heads=1,
                       moh_top_k=2, initializer_range=0.3, pad_token_id=0, eos_token_id=None, bos_token_id=None,
                       kernel_backend="torch", **kw)
    torch.manual_seed(0)
    return SeqparForCausalLM(cfg).eval()


def _greedy(model, ids, mask=None, new=40, use_cache=True):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              use_cache=use_cache, pad_token_id=0, return_dict_in_generate=True)


@pytest.mark.parametrize("pattern, window", [("A", None), ("S", None), ("L", None), ("H", None), ("ASLH", None),
                                             ("ASLH", 9)])
def test_greedy_with_cache_equals_without(pattern, window):
    # window: the softmax layers' sliding window; their cache keeps only the last window - 1 tokens
    model = _model(pattern * (1 if len(pattern) > 1 else 2), softmax_window=window)
    ids = torch.randint(1, VOCAB, (1, 11), generator=torch.Generator().manual_seed(1))
    with_cache = _greedy(model, ids, new=60)  # 71 tokens: 5 S2 blocks, so the S2 cache evicts
    without = _greedy(model, ids, new=60, use_cache=False)
    assert torch.equal(with_cache.sequences, without.sequences)
    if window is not None:  # the A layer's cache keeps window - 1 tokens, and the window changes the function
        assert with_cache.past_key_values.layers[0].keys.shape[2] == window - 1
        full = _model(pattern, softmax_window=None)
        with torch.no_grad():
            seq = with_cache.sequences
            assert (model(seq).logits - full(seq).logits).abs().max() > 1e-3
    assert len(set(with_cache.sequences[0, 11:].tolist())) > 3  # not a degenerate constant output


@pytest.mark.parametrize("pattern, window", [("AS", None), ("LH", None), ("ASLH", None), ("ASLH", 5)])
def test_batched_left_padding_equals_single(pattern, window):
    model = _model(pattern, softmax_window=window)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (19, 7, 12)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    batched = _greedy(model, ids, mask, new=30).sequences[:, width:]
    for i, p in enumerate(prompts):
        alone = _greedy(model, p[None], new=30).sequences[0, len(p):]
        assert torch.equal(batched[i], alone), (pattern, i)


def test_lightning_cache_is_constant_in_generated_length():
    model = _model("LL")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    short = _greedy(model, ids, new=3).past_key_values
    long = _greedy(model, ids, new=70).past_key_values
    assert all(isinstance(layer, LightningStateLayer) for layer in long.layers)
    state_bytes = 2 * 4 * 8 * 8 * 4  # batch x heads x dk x dv x fp32, per layer
    assert cache_nbytes(short) == cache_nbytes(long) == 2 * state_bytes
    assert long.get_seq_length() == 9 + 70 - 1  # the last generated token is never fed back


def _s2_expected_tokens(seen: int, last_q: int, g: int, bs=16, local=2, stride=4, step=2) -> int:
    """Tokens (of positions 0..seen-1) kv head g keeps after a query at position last_q."""
    qb = last_q // bs
    return sum(1 for p in range(seen) if (p // bs > qb - local) or ((p // bs + g * step) % stride == 0))


def test_s2_cache_keeps_only_readable_blocks():
    model = _model("SS")
    prompt, new = 13, 150
    ids = torch.randint(1, VOCAB, (1, prompt), generator=torch.Generator().manual_seed(4))
    out = _greedy(model, ids, new=new)
    cache = out.past_key_values
    seen = prompt + new - 1
    for layer in cache.layers:
        assert isinstance(layer, S2BlockCacheLayer)
        for g in range(2):
            assert layer.k[g].shape[1] == _s2_expected_tokens(seen, seen - 1, g), g
    dense = 2 * seen * 2 * 8 * 4 * 2  # layers x tokens x kv heads x dim x fp32 x (k, v)
    assert cache_nbytes(cache) < 0.55 * dense
    # and the answer is still exact
    assert torch.equal(out.sequences, _greedy(model, ids, new=new, use_cache=False).sequences)


def test_cache_layer_of_wrong_kind_is_an_error():
    from transformers import DynamicCache

    model = _model("AS")
    ids = torch.randint(1, VOCAB, (1, 5))
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    cache.layers[0], cache.layers[1] = cache.layers[1], cache.layers[0]  # S2 cache where K/V belongs
    with pytest.raises((ValueError, TypeError)):
        with torch.no_grad():
            model(ids[:, :1], past_key_values=cache, use_cache=True)


def test_beam_search_reorders_every_cache_kind():
    model = _model("ASLH")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=20, min_new_tokens=20, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with_cache = model.generate(ids, use_cache=True, **kw)
        without = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("window", [0, -3, 2.5, True, "8"])
def test_bad_softmax_window_is_one_clear_error(window):
    with pytest.raises(ValueError, match="softmax_window must be an int >= 1"):
        _model("AL", softmax_window=window)
