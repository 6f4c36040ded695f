"""Long inputs without full-size rebuilds: a prompt attends over its own exact keys and values (exact prefill), and
later multi-token forwards (a chunked prefill, a teacher-forced continuation) go through the blockwise latent path,
which computes what the reference path (everything rebuilt at full size, then the model's attention backend) does."""

from __future__ import annotations

import pytest
import torch
from tiny_models import structured_ids, tiny_model, weights_config
from transformers import DynamicCache

import hf_svdkv.latent_attention as latent_attention
from hf_svdkv import SVDCompressedCache, patch_model

# (architecture, heads, KV heads, key rank, value rank, group size, window, latent bits)
CASES = {
    "mha": ("llama", 4, 4, 12, 10, 1, 0, None),
    "gqa-window": ("llama", 4, 2, 9, 7, 1, 5, None),
    "joint-window": ("mistral", 6, 3, 20, 30, 3, 16, None),
    "qwen2-bias-int8": ("qwen2", 4, 2, 16, 12, 1, 4, 8),
    "int4-window": ("llama", 4, 2, 16, 16, 2, 8, 4),
}


def patched(case: str, attn: str = "sdpa", exact_prefill: bool = True):
    arch, heads, kv_heads, key_rank, value_rank, group, window, bits = CASES[case]
    model = tiny_model(arch, num_heads=heads, num_kv_heads=kv_heads, attn_implementation=attn)
    patch_model(model, weights_config(key_rank=key_rank, value_rank=value_rank, group_size=group, window=window,
                                      latent_bits=bits, exact_prefill=exact_prefill))
    return model


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_exact_prefill_is_the_full_precision_prompt_and_stores_the_same_latents(case, attn):
    """The prompt's logits are DynamicCache's; what is stored is what storing those keys and values always stores
    (their latents, the window's exact copies, the positions)."""
    model = patched(case, attn)
    ids = structured_ids(60, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    states = {}
    hooks = [linear.register_forward_hook(lambda m, a, out, key=(i, kind): states.__setitem__(key, out))
             for i, layer in enumerate(model.model.layers) for kind, linear in (("k", layer.self_attn.k_proj), ("v", layer.self_attn.v_proj))]
    with torch.no_grad():
        exact_cache = SVDCompressedCache(model)
        got = model(ids, attention_mask=mask, past_key_values=exact_cache).logits
        for hook in hooks:
            hook.remove()
        expected = model(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config)).logits
        compressed = model(ids, attention_mask=mask, past_key_values=SVDCompressedCache(model, exact_prefill=False)).logits
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
            fields = ("data", "scale", "zero") if hasattr(a, "scale") else (None,)
            for f in fields:
                assert torch.equal(a if f is None else getattr(a, f), b if f is None else getattr(b, f)), (i, name)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("exact_prefill", [True, False])
def test_blockwise_path_equals_the_reference_path(case, attn, exact_prefill, monkeypatch):
    """A chunked prefill and a teacher-forced continuation, in blocks far smaller than the cache (so the running
    softmax spans many blocks), against the same forwards through the reference path; left-padded batch."""
    model = patched(case, attn, exact_prefill)
    ids = structured_ids(90, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :11] = 0

    def run() -> torch.Tensor:
        cache = SVDCompressedCache(model)
        with torch.no_grad():
            chunks = [model(ids[:, s:e], attention_mask=mask[:, :e], past_key_values=cache).logits
                      for s, e in ((0, 40), (40, 70), (70, 72), (72, 90))]
        return torch.cat(chunks, dim=1)

    monkeypatch.setattr(latent_attention, "CHUNK_ELEMENTS", 64)  # blocks of a few tokens
    blockwise = run()
    monkeypatch.setattr(latent_attention, "MAX_QUERY_LEN", 0)  # everything through the reference path
    reference = run()
    valid = mask.bool()
    torch.testing.assert_close(blockwise[valid], reference[valid], atol=1e-4, rtol=0)


def test_the_blockwise_path_never_rebuilds_a_whole_layer(monkeypatch):
    """Every rebuilt block is bounded by CHUNK_ELEMENTS, whatever the length of the input and of the cache."""
    model = patched("gqa-window")
    sizes = []
    original = latent_attention._scratch

    def spy(name, shape, dtype, device):
        sizes.append(torch.Size(shape).numel())
        return original(name, shape, dtype, device)

    monkeypatch.setattr(latent_attention, "_scratch", spy)
    monkeypatch.setattr(latent_attention, "CHUNK_ELEMENTS", 1024)
    cache = SVDCompressedCache(model)
    with torch.no_grad():
        model(structured_ids(200), past_key_values=cache)
        model(structured_ids(150, seed=1), past_key_values=cache)  # 150 new tokens over 200 stored
    assert sizes and max(sizes) <= 1024
