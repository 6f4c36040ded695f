"""The latent fast path (wired into the patched attention for decoding) computes the same function as the reference
path (rebuild everything, then attention): same logits within float32 tolerance, for every geometry, grouping, mask,
window and latent storage."""

from __future__ import annotations

import pytest
import torch
from tiny_models import structured_ids, tiny_model, weights_config

import hf_svdkv.attention
from hf_svdkv import CompressionConfig, Projection, SVDBases, SVDCompressedCache, patch_model
from hf_svdkv.attention import latent_attention_forward, use_latent_attention
from hf_svdkv.decode import fold_value_up_into_o_proj

ATOL = 1e-4


def patch_both(model, config: CompressionConfig, monkeypatch, **kwargs):
    """Two ways to patch `model` with the same bases: the reference path (the latent path switched off) and the
    patched attention as wired, which takes the latent path for up to MAX_QUERY_LEN new tokens."""
    bases = SVDBases.from_model(model, config)

    def patch(latent: bool):
        monkeypatch.setattr(
            hf_svdkv.attention, "use_latent_attention", use_latent_attention if latent else lambda *args: False
        )
        return patch_model(model, bases=bases, window=config.window, latent_bits=config.latent_bits, **kwargs)

    return (lambda: patch(False)), (lambda: patch(True))


def decode_logits(
    model, ids: torch.Tensor, steps: int = 6, piece: int = 1, mask: torch.Tensor | None = None
) -> torch.Tensor:
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


def test_generate_is_unchanged_and_chunking_does_not_matter(monkeypatch):
    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=32)
    config = weights_config(key_rank=16, value_rank=16, group_size=2)
    reference, fast = patch_both(model, config, monkeypatch)
    ids = structured_ids(40)
    reference()
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=24, do_sample=False)
    fast()
    monkeypatch.setattr("hf_svdkv.decode.window.CHUNK_ELEMENTS", 7 * 2 * 32)  # chunks of 7 tokens, the last partial
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(got, expected)


def test_attention_module_output_matches_directly(monkeypatch):
    """One attention module, random hidden states, a cache already holding 30 tokens: same output, both paths."""
    model = tiny_model("llama", num_heads=6, num_kv_heads=2, head_dim=32)
    config = weights_config(key_rank=8, value_rank=8, group_size=2)
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
                out, _ = attention(
                    hidden[:, start:end],
                    position_embeddings=(cos, sin),
                    attention_mask=None,
                    past_key_values=cache,
                    position_ids=position_ids[:, start:end],
                )
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


@pytest.mark.parametrize("seq,latent", [(1, True), (16, True), (300, True)])
def test_the_patched_attention_takes_the_latent_path_when_it_can(monkeypatch, seq, latent):
    """Any number of new tokens goes through the latent path (a block of stored tokens at a time); training, attention
    weights and backends with 2-D masks keep the reference path."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[3].shape[2])
        return latent_attention_forward(*args, **kwargs)

    monkeypatch.setattr(hf_svdkv.attention, "latent_attention_forward", spy)
    model = tiny_model("llama", attn_implementation="eager")
    patch_model(model, weights_config(key_rank=8, value_rank=8))
    cache = SVDCompressedCache(model)
    with torch.no_grad():
        model(structured_ids(seq), past_key_values=cache)
    assert calls == ([seq] * model.config.num_hidden_layers if latent else [])
    calls.clear()
    with torch.no_grad():
        out = model(structured_ids(1), past_key_values=cache, output_attentions=True)
    assert calls == [] and out.attentions[0] is not None
    model.config._attn_implementation = "flash_attention_2"
    assert not use_latent_attention(model.model.layers[0].self_attn, cache, 1)
    model.config._attn_implementation = "eager"
    model.train()
    assert not use_latent_attention(model.model.layers[0].self_attn, cache, 1)


def test_rope_factors_extend_the_previous_forwards():
    """A forward whose positions extend the previous forward's computes only the new ones; anything else recomputes."""
    from hf_svdkv.decode.rope import rope_factors

    rotary = tiny_model("llama").model.rotary_emb
    positions = torch.arange(40)[None].repeat(2, 1)
    positions[1] += 5
    rope_factors(rotary, positions[:, :25], memo_key=object())
    extended = rope_factors(rotary, positions, memo_key=object())
    torch.testing.assert_close(extended, rope_factors(rotary, positions), atol=1e-6, rtol=0)
    other = positions.flip(0)  # rows reordered (beam search): not an extension
    torch.testing.assert_close(
        rope_factors(rotary, other, memo_key=object()), rope_factors(rotary, other), atol=0, rtol=0
    )
