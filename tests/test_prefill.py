"""Long inputs without full-size rebuilds: a prompt attends over its own exact keys and values (exact prefill), and
later multi-token forwards go through the blockwise latent path with bounded transients (that it computes what the
reference path computes is an invariant: tests/test_invariants.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import CACHE_VARIANTS, structured_ids
from transformers import DynamicCache

import hf_svdkv.decode.blockwise as blockwise
import hf_svdkv.decode.window as window
from hf_svdkv import SVDCompressedCache


def patched(variant: str, attn: str = "sdpa"):
    return dataclasses.replace(CACHE_VARIANTS[variant], exact_prefill=True).model(attn)


@pytest.mark.parametrize("variant", list(CACHE_VARIANTS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_exact_prefill_is_the_full_precision_prompt_and_stores_the_same_latents(variant, attn):
    """The prompt's logits are DynamicCache's; what is stored is what storing those keys and values always stores
    (their latents, the window's exact copies, the positions)."""
    model = patched(variant, attn)
    ids = structured_ids(60, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    states = {}
    hooks = [
        linear.register_forward_hook(lambda m, a, out, key=(i, kind): states.__setitem__(key, out))
        for i, layer in enumerate(model.model.layers)
        for kind, linear in (("k", layer.self_attn.k_proj), ("v", layer.self_attn.v_proj))
    ]
    with torch.no_grad():
        exact_cache = SVDCompressedCache(model)
        got = model(ids, attention_mask=mask, past_key_values=exact_cache).logits
        for hook in hooks:
            hook.remove()
        expected = model(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config)).logits
        compressed = model(
            ids, attention_mask=mask, past_key_values=SVDCompressedCache(model, exact_prefill=False)
        ).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)
    assert (compressed[valid] - expected[valid]).abs().max() > 1e-5  # a compressed prompt does differ
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for i, layer in enumerate(exact_cache.layers):
        reference = SVDCompressedCache(model, exact_prefill=False).layers[i]
        keys, values = (states[i, kind].view(2, 60, -1, head_dim).transpose(1, 2) for kind in ("k", "v"))
        reference.append(keys, values, torch.arange(60).expand(2, -1))
        for name in ("keys", "values", "recent_keys", "recent_values", "positions"):
            a, b = getattr(layer, name), getattr(reference, name)
            if hasattr(a, "read"):  # a LatentStore: what it holds, as read back (codes decode the same or differ)
                a, b = a.read(), b.read()
            assert torch.equal(a, b), (i, name)


def test_the_blockwise_path_never_rebuilds_a_whole_layer(monkeypatch):
    """Every rebuilt block, and the scores of the new tokens against their exact copies, are bounded by
    CHUNK_ELEMENTS, whatever the length of the input and of the cache."""
    model = patched("window")
    sizes, scores = [], []
    original, merge = blockwise._scratch, window._merge_exact

    def spy(name, shape, dtype, device):
        sizes.append(torch.Size(shape).numel())
        return original(name, shape, dtype, device)

    def merge_spy(query, latent, lse, keys, *args):
        scores.append(query.shape[0] * query.shape[1] * query.shape[2] * keys.shape[-2])
        return merge(query, latent, lse, keys, *args)

    monkeypatch.setattr(blockwise, "_scratch", spy)
    monkeypatch.setattr(window, "_merge_exact", merge_spy)
    monkeypatch.setattr(window, "CHUNK_ELEMENTS", 1024)
    cache = SVDCompressedCache(model)
    with torch.no_grad():
        model(structured_ids(200), past_key_values=cache)
        model(structured_ids(150, seed=1), past_key_values=cache)  # 150 new tokens over 200 stored
    assert sizes and max(sizes) <= 1024
    assert scores and max(scores) <= 1024
