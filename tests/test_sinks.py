"""Attention sinks: each row's first tokens are kept at full precision for good, and counted in the bytes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import left_padded, structured_ids, tiny_model, weights_config
from transformers import DynamicCache

from hf_svdkv import CompressionConfig, SVDCompressedCache, patch_model


def _model(sinks: int, window: int = 0, latent_bits: int | None = None, attn: str = "sdpa"):
    model = tiny_model("llama", 4, 2, 32, attn_implementation=attn)
    return patch_model(
        model, weights_config(key_rank=4, value_rank=4, window=window, latent_bits=latent_bits, sinks=sinks)
    )


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("latent_bits", [None, 4])
def test_a_cache_of_sinks_only_equals_the_dynamic_cache(attn, latent_bits):
    """At rank 4 of 32 the latents are far from the keys, so only a cache whose every token is a sink (a left-padded
    batch: each row's own first tokens, wherever its padding ends) can give the dynamic cache's logits and tokens."""
    ids, mask = left_padded((9, 14))
    reference = tiny_model("llama", 4, 2, 32, attn_implementation=attn)
    model = _model(sinks=40, latent_bits=latent_bits, attn=attn)
    low_rank = _model(sinks=0, latent_bits=latent_bits, attn=attn)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, past_key_values=DynamicCache()).logits
        got = model(ids, attention_mask=mask, past_key_values=SVDCompressedCache(model, exact_prefill=False)).logits
        lossy = low_rank(ids, attention_mask=mask, past_key_values=SVDCompressedCache(low_rank, exact_prefill=False))
        kwargs = {"attention_mask": mask, "max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
        tokens = reference.generate(ids, **kwargs)
        sink_tokens = model.generate(ids, past_key_values=SVDCompressedCache(model), **kwargs)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)
    assert (lossy.logits[real] - expected[real]).abs().max() > 1e-2  # the sinks, not the latents, made them equal
    assert torch.equal(sink_tokens, tokens)


def test_sinks_are_each_rows_first_tokens_under_left_padding():
    """A sink is a token written at a position below `sinks`: under left padding, each row's own first tokens."""
    model = _model(sinks=3, window=2)
    ids, mask = left_padded((5, 9))
    cache = SVDCompressedCache(model)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate() numbers a left-padded batch
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
    layer = cache.layers[0]
    # Row 0 has 4 padding slots: its sinks are slots 4-6; row 1's are 0-2. Exact copies of slots 0-6 are held.
    assert layer.sink_keys.shape[-2] == 7
    flags = layer.sink_flags(torch.arange(9)) & mask.bool()  # padding is masked out whatever copy it has
    assert flags[0].nonzero().flatten().tolist() == [4, 5, 6]
    assert flags[1].nonzero().flatten().tolist() == [0, 1, 2]


def test_sinks_are_counted_in_the_bytes_and_cropped():
    ids = structured_ids(30)
    caches = {}
    for sinks in (0, 4):
        model = _model(sinks=sinks, window=3)
        caches[sinks] = SVDCompressedCache(model)
        with torch.no_grad():
            model(ids, past_key_values=caches[sinks])
    config = model.config
    per_sink = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * model.dtype.itemsize
    assert caches[4].nbytes() - caches[0].nbytes() == 4 * per_sink
    caches[4].crop(-28)  # transformers 5.x: a negative count of tokens to remove
    assert caches[4].layers[0].sink_keys.shape[-2] == 2


def test_sinks_must_be_a_non_negative_count():
    with pytest.raises(ValueError, match="sinks must be a non-negative integer"):
        CompressionConfig(sinks=-1)
    with pytest.raises(ValueError, match="sinks must be a non-negative integer"):
        CompressionConfig(sinks=2.5)


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("window", [0, 3])
def test_no_exact_copy_keeps_the_prompts_storage_alive(sinks, window):
    """A view of a prefill's keys would hold all of them (every layer, full size) for as long as the cache lives: the
    peak memory of a long prompt would be that of no compression."""
    model = _model(sinks=sinks, window=window)
    cache = SVDCompressedCache(model)
    with torch.no_grad():
        model(structured_ids(200), past_key_values=cache)
    for layer in cache.layers:
        for tensor in (layer.recent_keys, layer.recent_values, layer.sink_keys, layer.sink_values):
            assert tensor.untyped_storage().nbytes() <= max(tensor.numel(), 1) * tensor.element_size() * 2
