"""Exactness at full rank, batching, beam search, memory accounting and patch hygiene on tiny random models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    ARCHITECTURES,
    structured_ids,
    tiny_model,
    weights_config,
)
from transformers import DynamicCache

from hf_svdkv import CompressionConfig, SVDBases, SVDCompressedCache, is_patched, patch_model, unpatch_model

GEOMETRIES = [  # (num_heads, num_kv_heads, head_dim)
    pytest.param(4, 4, 32, id="mha-d32"),
    pytest.param(4, 2, 32, id="gqa-d32"),
    pytest.param(4, 4, 64, id="mha-d64"),
    pytest.param(6, 2, 64, id="gqa-d64"),
]


def full_rank(head_dim: int, group_size: int = 1) -> CompressionConfig:
    return weights_config(key_rank=head_dim, value_rank=head_dim, group_size=group_size)


def step_logits(model, ids: torch.Tensor, cache, decode_steps: int = 4) -> list[torch.Tensor]:
    """Logits of a prefill and of `decode_steps` single-token steps fed through `cache`."""
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        logits = [out.logits]
        for _ in range(decode_steps):
            next_id = out.logits[:, -1:].argmax(-1)
            out = model(next_id, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return logits


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_backends_match_and_explicit_cache_in_generate(attn_implementation):
    model = tiny_model("llama", attn_implementation=attn_implementation)
    ids = structured_ids(16)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=20, do_sample=False)
        patch_model(model, full_rank(32))
        cache = SVDCompressedCache(model)
        got = model.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=cache)
    assert torch.equal(got, expected)
    assert cache.get_seq_length() == ids.shape[1] + 19  # the last generated token is never fed back


def test_beam_search_matches_dynamic_cache():
    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=32)
    ids = structured_ids(10, batch=2)
    kwargs = dict(max_new_tokens=16, num_beams=3, do_sample=False, num_return_sequences=2)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        patch_model(model, full_rank(32))
        got = model.generate(ids, **kwargs)
    assert torch.equal(got, expected)


def test_crop_and_batch_operations_follow_positions():
    model = tiny_model("llama")
    patch_model(model, full_rank(32))
    ids = structured_ids(12, batch=2)
    cache = SVDCompressedCache(model)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        cache.crop(-4)
        assert cache.get_seq_length() == 8
        assert cache.layers[1].positions.shape == (2, 8)
        # Re-feeding the cropped tokens gives what a fresh cache gives for the whole prompt.
        cropped = model(ids[:, 8:], past_key_values=cache).logits
        fresh = model(ids, past_key_values=SVDCompressedCache(model)).logits[:, 8:]
    torch.testing.assert_close(cropped, fresh, atol=1e-4, rtol=0)

    cache.batch_repeat_interleave(3)
    assert cache.layers[0].keys.shape[0] == 6 and cache.layers[0].positions.shape[0] == 6
    cache.batch_select_indices(torch.tensor([0, 5]))
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.layers[0].positions.shape == (2, 12)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0


@pytest.mark.parametrize("key_rank,value_rank,group_size", [(8, 16, 1), (24, 8, 2), (32, 32, 1)])
def test_bytes_per_token_counts_latents_and_positions(key_rank, value_rank, group_size):
    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=32, num_layers=3, dtype=torch.bfloat16)
    patch_model(model, weights_config(key_rank=key_rank, value_rank=value_rank, group_size=group_size))
    cache = SVDCompressedCache(model)
    with torch.no_grad():
        model(structured_ids(20, batch=2), past_key_values=cache)
    layers, kv_heads, dtype_size, position_size = 3, 2, 2, 4
    expected = layers * kv_heads * (key_rank + value_rank) * dtype_size + layers * position_size
    assert cache.bytes_per_token() == expected
    assert cache.nbytes() == expected * 2 * 20
    layer = cache.layers[0]
    assert layer.keys.shape == (2, kv_heads // group_size, 20, key_rank * group_size)
    assert layer.values.shape == (2, kv_heads // group_size, 20, value_rank * group_size)
    assert layer.keys.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_reduced_rank_is_close_but_not_exact(arch):
    model = tiny_model(arch)
    ids = structured_ids(40)
    with torch.no_grad():
        reference = model(ids).logits
        patch_model(model, weights_config(key_rank=16, value_rank=16))
        cache = SVDCompressedCache(model)
        got = model(ids, past_key_values=cache).logits
    assert cache.layers[0].keys.shape[-1] == 16 and cache.layers[0].values.shape[-1] == 16
    assert torch.isfinite(got).all()
    assert (got - reference).abs().max() > 1e-3
    assert torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0) > 0.99


def test_qwen2_bias_is_carried_by_the_basis_center():
    """Keys W x + b with rank-r W are reproduced exactly at rank r only if the bias is not projected away."""
    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2, head_dim=32)
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                left, singular, right = torch.linalg.svd(linear.weight.view(2, 32, -1), full_matrices=False)
                singular[:, 12:] = 0  # each head's projection has rank 12
                linear.weight.copy_((left @ torch.diag_embed(singular) @ right).reshape_as(linear.weight))
        ids = structured_ids(20)
        reference = model(ids).logits
        patch_model(model, weights_config(key_rank=12, value_rank=12))
        got = model(ids, past_key_values=SVDCompressedCache(model)).logits
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=0)


def test_patch_leaves_other_models_and_unpatch_restores_exactly():
    model, bystander = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = structured_ids(16)
    with torch.no_grad():
        before = model(ids).logits
        bystander_before = bystander.generate(
            ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        state = {k: v.clone() for k, v in model.state_dict().items()}
        patch_model(model, weights_config(key_rank=8, value_rank=8))
        assert is_patched(model) and not is_patched(bystander)
        bystander_after = bystander.generate(
            ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        assert isinstance(bystander_after.past_key_values, DynamicCache)
        for a, b in zip(bystander_before.logits, bystander_after.logits, strict=True):
            assert torch.equal(a, b)
        unpatch_model(model)
        after = model(ids).logits
    assert not is_patched(model)
    assert torch.equal(before, after)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    assert "_prepare_cache_for_generation" not in model.__dict__


def test_patched_model_still_runs_other_caches():
    model = tiny_model("llama")
    ids = structured_ids(12)
    with torch.no_grad():
        expected = model(ids, past_key_values=DynamicCache(config=model.config)).logits
        patch_model(model, weights_config(key_rank=8, value_rank=8))
        got = model(ids, past_key_values=DynamicCache(config=model.config)).logits
        generated = model.generate(ids, max_new_tokens=4, cache_implementation="dynamic", return_dict_in_generate=True)
    assert torch.equal(got, expected)
    assert type(generated.past_key_values) is DynamicCache


def test_bases_round_trip_reproduces_outputs(tmp_path):
    model = tiny_model("qwen2")
    bases = SVDBases.from_model(model, weights_config(key_rank=16, value_rank=8, group_size=2))
    bases.save_pretrained(tmp_path)
    loaded = SVDBases.from_pretrained(tmp_path)
    assert loaded.key_ranks == [32, 32] and loaded.value_ranks == [16, 16] and loaded.method == "weights"
    ids = structured_ids(16)
    with torch.no_grad():
        patch_model(model, bases=bases)
        first = model(ids, past_key_values=SVDCompressedCache(model)).logits
        patch_model(model, bases=loaded)
        second = model(ids, past_key_values=SVDCompressedCache(model)).logits
    assert torch.equal(first, second)


def test_bases_validate_on_a_bf16_copy_of_the_same_weights():
    model = tiny_model("llama")
    bases = SVDBases.from_model(model, weights_config(profile="med"))
    patch_model(model.to(torch.bfloat16), bases=bases)  # same weights, other dtype: accepted
    assert bases.value_ranks == [16, 16] and bases.key_ranks == [8, 8]  # med scaled from head_dim 128 to 32
