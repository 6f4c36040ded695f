"""The full-precision window of recent tokens: exact where it covers everything, and the same answer
whether tokens are fed in one forward or decoded one by one."""

from __future__ import annotations

import pytest
import torch
from tiny_models import structured_ids, tiny_model, weights_config

from hf_svdkv import SVDCompressedCache, patch_model


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_window_covering_the_sequence_is_exact_at_any_rank(attn_implementation):
    model = tiny_model("qwen2", attn_implementation=attn_implementation)
    ids = structured_ids(30)
    with torch.no_grad():
        expected = model(ids).logits
        patch_model(model, weights_config(key_rank=4, value_rank=4, window=64))
        got = model(ids, past_key_values=SVDCompressedCache(model)).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_window_helps_and_is_counted_in_memory():
    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=32, dtype=torch.float32)
    ids = structured_ids(48)
    with torch.no_grad():
        expected = model(ids).logits
        errors, caches = {}, {}
        for window in (0, 16):
            patch_model(model, weights_config(key_rank=8, value_rank=8, window=window))
            caches[window] = SVDCompressedCache(model)
            errors[window] = (model(ids, past_key_values=caches[window]).logits - expected).abs().mean()
    assert errors[16] < errors[0]
    layers, kv_heads, head_dim, fp32, int32 = 2, 2, 32, 4, 4
    latent = layers * kv_heads * (8 + 8) * fp32
    exact = layers * kv_heads * 2 * head_dim * fp32
    assert caches[0].nbytes() == 48 * (latent + layers * int32)
    assert caches[16].nbytes() == 32 * latent + 16 * exact + 48 * layers * int32


def test_crop_with_a_window_keeps_storage_consistent():
    model = tiny_model("llama")
    patch_model(model, weights_config(key_rank=8, value_rank=8, window=8))
    ids = structured_ids(20)
    with torch.no_grad():
        cache = SVDCompressedCache(model)
        model(ids, past_key_values=cache)
        for remove, latent, recent in ((3, 12, 5), (7, 10, 0)):
            cache.crop(-remove)
            layer = cache.layers[1]
            assert (layer.keys.shape[-2], layer.recent_keys.shape[-2]) == (latent, recent)
            assert layer.values.shape[-2] == latent and layer.recent_values.shape[-2] == recent
        assert cache.get_seq_length() == 10 and cache.layers[0].positions[0].tolist() == list(range(10))
        logits = model(ids[:, 10:], past_key_values=cache).logits
    assert torch.isfinite(logits).all() and cache.get_seq_length() == 20
    # Tokens already aged into latents cannot come back at full precision, so a rollback is not exact.
    assert not cache.is_croppable


@pytest.mark.parametrize("window", [0, 6])
def test_the_window_does_not_keep_the_prefill_alive(window):
    """The full-precision window owns its W tokens: a slice of the prefill's keys would keep all of them in memory."""
    model = tiny_model("llama")
    patch_model(model, weights_config(key_rank=8, value_rank=8, window=window))
    cache = SVDCompressedCache(model)
    with torch.no_grad():
        model(structured_ids(40), past_key_values=cache)
        model(structured_ids(1), past_key_values=cache)
    for layer in cache.layers:
        for exact in (layer.recent_keys, layer.recent_values):
            assert exact.shape[-2] == window
            assert exact.untyped_storage().nbytes() == exact.numel() * exact.element_size()
