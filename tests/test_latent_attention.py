"""The latent fast path computes the same function as the reference path (rebuild everything, then attention):
same logits within float32 tolerance, for every geometry, grouping, mask, window and latent storage."""

from __future__ import annotations

import pytest
import torch
from tiny_models import structured_ids, tiny_model

import hf_svdkv.patch
from hf_svdkv import CompressionConfig, Projection, SVDBases, SVDCompressedCache, patch_model
from hf_svdkv.attention import apply_rope, compressed_attention_forward
from hf_svdkv.latent_attention import (
    fold_value_up_into_o_proj,
    latent_attention_forward,
    use_latent_attention,
)

ATOL = 1e-4


def fast_forward(module, patch, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
    """`compressed_attention_forward` with the latent path wired in, as attention.py is meant to do it."""
    batch, seq = hidden_states.shape[:-1]
    if not isinstance(past_key_values, SVDCompressedCache) or not use_latent_attention(module, past_key_values, seq):
        return compressed_attention_forward(module, patch, hidden_states, position_embeddings=position_embeddings,
                                            attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
    patch.check_cache(past_key_values)
    shape = (batch, seq, -1, module.head_dim)
    query = module.q_proj(hidden_states).view(shape).transpose(1, 2)
    key = module.k_proj(hidden_states).view(shape).transpose(1, 2)
    value = module.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    query = apply_rope(query, cos, sin)
    positions = kwargs["position_ids"].expand(batch, -1)
    layer = past_key_values.layers[module.layer_idx]
    out = latent_attention_forward(module, layer, patch.rotary_emb, query, key, value, positions, attention_mask, memo_key=cos)
    return out, None


def patch_both(model, config: CompressionConfig, monkeypatch, **kwargs):
    """Two ways to patch `model` with the same bases: the reference path and the latent path."""
    bases = SVDBases.from_model(model, config)

    def reference():
        monkeypatch.setattr(hf_svdkv.patch, "compressed_attention_forward", compressed_attention_forward)
        return patch_model(model, bases=bases, window=config.window, latent_bits=config.latent_bits, **kwargs)

    def fast():
        monkeypatch.setattr(hf_svdkv.patch, "compressed_attention_forward", fast_forward)
        return patch_model(model, bases=bases, window=config.window, latent_bits=config.latent_bits, **kwargs)

    return reference, fast


def decode_logits(model, ids: torch.Tensor, steps: int = 6, piece: int = 1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill ids, then `steps` forwards of `piece` greedy tokens each; all logits, concatenated."""
    cache = SVDCompressedCache(model)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache)
        logits = [out.logits]
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1).repeat(1, piece)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], piece)], dim=1)
            out = model(nxt, attention_mask=mask, past_key_values=cache)
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 32), (4, 2, 32), (6, 2, 64)], ids=["mha", "gqa", "gqa-d64"])
@pytest.mark.parametrize("group_size", [1, 2], ids=["per-head", "joint"])
def test_decode_matches_reference_path(monkeypatch, num_heads, num_kv_heads, head_dim, group_size):
    model = tiny_model("llama", num_heads, num_kv_heads, head_dim)
    config = CompressionConfig(key_rank=head_dim // 3, value_rank=head_dim // 4, group_size=group_size)
    reference, fast = patch_both(model, config, monkeypatch)
    ids = structured_ids(21)
    reference()
    expected = decode_logits(model, ids)
    fast()
    got = decode_logits(model, ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
@pytest.mark.parametrize("window", [0, 5])
def test_small_pieces_and_windows_match(monkeypatch, arch, window):
    """Several tokens per forward (speculative decoding, chunked teacher forcing) and the exact window; qwen2's k/v
    biases exercise the basis centers (folded into o_proj's bias for values)."""
    model = tiny_model(arch)
    config = CompressionConfig(key_rank=9, value_rank=7, group_size=2, window=window)
    reference, fast = patch_both(model, config, monkeypatch)
    ids = structured_ids(17)
    reference()
    expected = decode_logits(model, ids, steps=5, piece=3)
    fast()
    got = decode_logits(model, ids, steps=5, piece=3)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("window", [0, 4])
def test_left_padded_batch_matches(monkeypatch, attn_implementation, window):
    model = tiny_model("llama", num_heads=6, num_kv_heads=3, head_dim=32, attn_implementation=attn_implementation)
    config = CompressionConfig(key_rank=10, value_rank=12, group_size=3, window=window)
    reference, fast = patch_both(model, config, monkeypatch)
    prompts = [structured_ids(n, seed=n)[0] for n in (5, 11, 18)]
    ids = torch.zeros(3, 18, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, 18 - len(prompt):], mask[row, 18 - len(prompt):] = prompt, 1
    reference()
    expected = decode_logits(model, ids, steps=8, mask=mask)
    fast()
    got = decode_logits(model, ids, steps=8, mask=mask)
    valid = torch.cat([mask, mask.new_ones(3, 8)], dim=1).bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=ATOL, rtol=0)


def test_short_padded_prompts_take_the_fast_path_from_the_start(monkeypatch):
    """Prompts of at most MAX_QUERY_LEN tokens are prefilled by the latent path too; padding queries see nothing."""
    model = tiny_model("llama", attn_implementation="eager")
    config = CompressionConfig(key_rank=10, value_rank=10, window=2)
    reference, fast = patch_both(model, config, monkeypatch)
    ids = torch.stack([structured_ids(12, seed=1)[0], structured_ids(12, seed=2)[0]])
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    reference()
    expected = decode_logits(model, ids, steps=4, mask=mask)
    fast()
    got = decode_logits(model, ids, steps=4, mask=mask)
    valid = torch.cat([mask, mask.new_ones(2, 4)], dim=1).bool()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[valid], expected[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_latents_match(monkeypatch, bits):
    model = tiny_model("llama")
    config = CompressionConfig(key_rank=12, value_rank=12, latent_bits=bits, window=3)
    reference, fast = patch_both(model, config, monkeypatch)
    ids = structured_ids(19)
    reference()
    expected = decode_logits(model, ids)
    fast()
    got = decode_logits(model, ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_generate_is_unchanged_and_chunking_does_not_matter(monkeypatch):
    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=32)
    config = CompressionConfig(key_rank=16, value_rank=16, group_size=2)
    reference, fast = patch_both(model, config, monkeypatch)
    ids = structured_ids(40)
    reference()
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=24, do_sample=False)
    fast()
    monkeypatch.setattr("hf_svdkv.latent_attention.CHUNK_ELEMENTS", 7 * 2 * 32)  # chunks of 7 tokens, the last partial
    monkeypatch.setattr("hf_svdkv.latent_attention.MAX_BLOCK_DIAGONAL", 0)  # score KV head by KV head
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(got, expected)


def test_attention_module_output_matches_directly(monkeypatch):
    """One attention module, random hidden states, a cache already holding 30 tokens: same output, both paths."""
    model = tiny_model("llama", num_heads=6, num_kv_heads=2, head_dim=32)
    config = CompressionConfig(key_rank=8, value_rank=8, group_size=2)
    reference, fast = patch_both(model, config, monkeypatch)
    attention = model.model.layers[1].self_attn
    hidden = torch.randn(2, 31, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(31)[None]
    rotary = model.model.rotary_emb
    outputs = []
    for patcher in (reference, fast):
        patcher()
        cache = SVDCompressedCache(model)
        with torch.no_grad():
            for start, end in ((0, 30), (30, 31)):
                cos, sin = rotary(hidden, position_ids[:, start:end])
                out, _ = attention(hidden[:, start:end], position_embeddings=(cos, sin), attention_mask=None,
                                   past_key_values=cache, position_ids=position_ids[:, start:end])
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=0)


def test_fold_value_up_into_o_proj_is_o_proj_of_rebuilt_values():
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, groups, rank, hidden, seq = 6, 3, 8, 1, 10, 20, 13
    projection = Projection(
        down=torch.randn(groups, 3 * head_dim, rank, generator=generator),
        up=torch.randn(groups, rank, 3 * head_dim, generator=generator),
        center=torch.randn(groups, 3 * head_dim, generator=generator),
    )
    o_proj = torch.randn(hidden, heads * head_dim, generator=generator)
    latents = torch.randn(1, groups, seq, rank, generator=generator)
    probs = torch.softmax(torch.randn(heads, seq, generator=generator), dim=-1)
    values = projection.decode(latents, head_dim)[0]  # [kv_heads, seq, head_dim]
    per_head = torch.stack([probs[j] @ values[j // (heads // kv_heads)] for j in range(heads)])
    expected = o_proj @ per_head.flatten()
    weight, bias = fold_value_up_into_o_proj(o_proj, projection, heads, kv_heads, head_dim)
    latent_out = probs @ latents[0, 0]  # every head of the single joint group reads the same latents
    torch.testing.assert_close(weight @ latent_out.flatten() + bias, expected, atol=1e-4, rtol=1e-5)
