"""Quantized latents: the round-trip bound, real int4 packing, the Hadamard fold, and a quantized cache that stays
consistent under every batch and sequence operation."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import assert_left_padded_rows_equal_single_runs, structured_ids, tiny_model, weights_config
from transformers import DynamicCache

from hf_svdkv import Projection, SVDCompressedCache, patch_model
from hf_svdkv.latents import QuantizedLatentStore
from hf_svdkv.quantization import FEW_ROWS, concat, hadamard, quantize, quantize_runs, rotate_projection
from hf_svdkv.svd_cache import SVDCacheLayer


def expanded_scale(q) -> torch.Tensor:
    return q.scale.float().repeat_interleave(q.group, dim=-1)[..., : q.dim]


# --- quantization ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("dim,group", [(64, 32), (48, 32), (45, 16), (7, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True], ids=["min-max", "centred"])
def test_round_trip_error_is_within_half_a_step(bits, dim, group, dtype, symmetric):
    generator = torch.Generator().manual_seed(dim + bits)
    # Channels of very different spread, an offset far from zero (the zero point's rounding matters there),
    # a constant row (zero span) and an outlier channel.
    x = torch.randn(2, 3, 17, dim, generator=generator) * torch.rand(dim, generator=generator) * 4
    x[..., 0] *= 25
    x[1, 2, 5] += 300.0
    x[0, 0, 0] = 7.25
    x = x.to(dtype)
    q = quantize(x, bits, group, symmetric=symmetric)
    assert q.shape == x.shape and q.data.dtype == torch.uint8
    assert q.scale.shape == (2, 3, 17, math.ceil(dim / group)) and q.scale.dtype == torch.float16
    assert q.zero is None if symmetric else q.zero.dtype == torch.float16
    error = (q.dequantize() - x.float()).abs()
    bound = expanded_scale(q) / 2 + 1e-6 * x.float().abs()  # + float32 rounding of the final add
    assert (error <= bound).all(), f"worst excess {(error - bound).max().item()}"
    # No step is wasted either: a group's scale is its range over the levels, widened only by rounding the zero point
    # down and the scale up to float16 (relative 2^-10 each), and at least the smallest normal float16. Centred
    # codes' range is [-max |x|, max |x|].
    for g in range(q.scale.shape[-1]):
        chunk = x.float()[..., g * group : (g + 1) * group]
        if symmetric:
            span = 2 * chunk.abs().amax(-1)
        else:
            span = chunk.amax(-1) - chunk.amin(-1) + chunk.amin(-1).abs() * 2**-10
        assert (q.scale[..., g].float() <= span / (2**bits - 1) * (1 + 2**-10) + 2**-14).all()
    if not symmetric:
        assert torch.equal(q.dequantize()[0, 0, 0], torch.full((dim,), 7.25))  # a constant row is exact


def test_centred_codes_dequantize_exactly_to_half_steps():
    # (q - levels / 2) * scale, with no zero point stored: every code lands on an odd multiple of half a step.
    x = torch.randn(3, 40, 64, generator=torch.Generator().manual_seed(0)) * 5
    for bits in (8, 4, 2, 1):
        q = quantize(x, bits, 32, symmetric=True)
        half_steps = q.dequantize() / (expanded_scale(q) / 2)
        assert torch.equal(half_steps, half_steps.round()) and (half_steps.remainder(2) == 1).all()
        assert half_steps.abs().max() <= 2**bits - 1
        assert q.nbytes() == q.data.nbytes + q.scale.nbytes


@pytest.mark.parametrize("dim", [64, 48, 30])
def test_int4_codes_are_packed_two_per_byte(dim):
    x = torch.randn(2, 3, 11, dim, generator=torch.Generator().manual_seed(0))
    q8, q4 = quantize(x, 8), quantize(x, 4)
    assert q4.data.dtype == q8.data.dtype == torch.uint8
    assert q4.data.numel() * q4.data.element_size() * 2 == q8.data.numel() * q8.data.element_size()
    assert q4.data.shape[-1] == dim // 2 and q4.scale.shape == q8.scale.shape
    # Values already on the 4-bit grid of their group come back exactly: packing loses nothing.
    on_grid = torch.randint(0, 16, (2, 3, 11, dim), generator=torch.Generator().manual_seed(1)).float()
    on_grid[..., 0::32], on_grid[..., 1::32] = 0.0, 15.0  # each group of 32 spans 0..15: zero 0, scale 1
    assert torch.equal(quantize(on_grid, 4).dequantize(), on_grid)


def test_tokens_quantize_independently_so_concat_and_crop_are_exact():
    x = torch.randn(2, 2, 20, 48, generator=torch.Generator().manual_seed(0))
    whole = quantize(x, 4)
    parts = concat([quantize(x[..., :7, :], 4), quantize(x[..., 7:, :], 4)])
    for name in ("data", "scale", "zero"):
        assert torch.equal(getattr(parts, name), getattr(whole, name))
        assert torch.equal(getattr(whole.crop(7), name), getattr(parts, name)[..., :7, :])
    picked = whole.apply(lambda t: t[torch.tensor([1, 1, 0])])
    assert torch.equal(picked.dequantize(), whole.dequantize()[torch.tensor([1, 1, 0])])
    assert whole.nbytes() == 2 * 2 * 20 * (24 + 2 * 2 * 2)
    with pytest.raises(ValueError, match="different bits"):
        concat([whole, quantize(x, 8)])
    with pytest.raises(ValueError, match="kind of codes"):
        concat([whole, quantize(x, 4, symmetric=True)])


@pytest.mark.parametrize("tokens", [9, FEW_ROWS + 7], ids=["one-pass", "per-run"])
@pytest.mark.parametrize("group", [32, 16, 8])
def test_runs_quantized_together_equal_each_run_quantized_alone(group, tokens):
    # Mixed-precision latents quantize every run of channels together (in one pass for a few tokens); each run's
    # centred codes are those of the run alone, constant groups and runs shorter than a group included.
    generator = torch.Generator().manual_seed(group)
    runs = [(8, 3), (4, 70), (2, 37), (1, 17), (4, 5)]
    x = torch.randn(2, tokens, sum(width for _, width in runs), generator=generator) * 3.0
    x[..., 0, 3:40] = 0.75
    together = quantize_runs(x, runs, group).runs
    for part, (bits, _), got in zip(x.split([width for _, width in runs], -1), runs, together, strict=True):
        alone = quantize(part, bits, group, symmetric=True)
        assert (got.bits, got.group, got.dim) == (alone.bits, alone.group, alone.dim)
        assert got.zero is None and alone.zero is None
        for name in ("data", "scale"):
            assert torch.equal(getattr(got, name), getattr(alone, name))
    with pytest.raises(ValueError, match="do not add up"):
        quantize_runs(x, runs[:-1], group)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_runs(x, [(3, x.shape[-1])], group)


# --- Hadamard rotation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 16, 20, 48, 64, 96, 192])
def test_hadamard_is_orthogonal(n):
    matrix = hadamard(n)
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    if n & (n - 1) == 0:
        assert torch.allclose(matrix.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))


@pytest.mark.parametrize("rank", [32, 48])
def test_folding_the_rotation_leaves_reconstructions_unchanged(rank):
    generator = torch.Generator().manual_seed(rank)
    groups, dim = 2, 64
    down = torch.linalg.qr(torch.randn(groups, dim, dim, generator=generator)).Q[..., :rank]
    projection = Projection(down, down.mT.contiguous(), torch.randn(groups, dim, generator=generator))
    rotated = rotate_projection(projection)
    states = torch.randn(3, groups, 9, dim, generator=generator) * 3
    latents = projection.encode(states)
    torch.testing.assert_close(rotated.encode(states), latents @ hadamard(rank, torch.float32), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        rotated.decode(rotated.encode(states), dim), projection.decode(latents, dim), atol=1e-5, rtol=0
    )


def test_rotation_spreads_an_outlier_channel():
    x = torch.randn(4, 100, 64, generator=torch.Generator().manual_seed(0))
    x[..., 3] *= 50
    rotation = hadamard(64, torch.float32)
    plain = (quantize(x, 4).dequantize() - x).square().mean()
    rotated = (quantize(x @ rotation, 4).dequantize() @ rotation.T - x).square().mean()
    assert rotated < plain / 4


# --- the cache layer on tiny models ---------------------------------------------------------------------------------
def patched(bits: int, rank: int = 32, window: int = 0, **kwargs) -> torch.nn.Module:
    model = tiny_model(kwargs.pop("arch", "llama"), **kwargs)
    return patch_model(model, weights_config(key_rank=rank, value_rank=rank, window=window, latent_bits=bits))


def unrotated(cache: SVDCompressedCache) -> SVDCompressedCache:
    for layer in cache.layers:
        layer.store_options = {"rotate": False}  # read at lazy init, i.e. on the first update
    return cache


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_full_rank_is_close_to_dynamic_cache_and_int4_needs_the_rotation(arch):
    ids = structured_ids(40)
    logits = {}
    with torch.no_grad():
        reference = tiny_model(arch)(ids, past_key_values=DynamicCache()).logits
        for bits in (8, 4):
            model = patched(bits, arch=arch)
            logits[bits] = model(ids, past_key_values=SVDCompressedCache(model)).logits
            logits[bits, "plain"] = model(ids, past_key_values=unrotated(SVDCompressedCache(model))).logits
    assert SVDCompressedCache(model).layers[0].latent_bits == 4

    def error(key) -> float:
        return ((logits[key] - reference).abs().max() / reference.std()).item()

    assert error(8) < 0.05
    assert error(8) < error(4) < error((4, "plain"))
    assert error(8) < error((8, "plain"))


def stored(layer: SVDCacheLayer) -> dict[str, torch.Tensor]:
    tensors = {
        f"{kind}.{part}": getattr(getattr(layer, kind).stored, part)
        for kind in ("keys", "values")
        for part in ("data", "scale", "zero")
    }
    return tensors | {name: getattr(layer, name) for name in ("recent_keys", "recent_values", "positions")}


def test_batch_operations_keep_codes_scales_and_positions_aligned():
    model = patched(4, window=4)
    ids = structured_ids(14, batch=3)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: row 1's positions start later
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = SVDCompressedCache(model)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
    before = stored(cache.layers[1])
    assert before["positions"][1, 3:].tolist() == list(range(11))

    def check(rows: list[int]) -> None:
        for name, tensor in stored(cache.layers[1]).items():
            assert torch.equal(tensor, before[name][rows]), name

    cache.batch_repeat_interleave(2)
    check([0, 0, 1, 1, 2, 2])
    cache.batch_select_indices(torch.tensor([1, 2, 5]))
    check([0, 1, 2])
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    check([2, 0, 1])
    for layer in cache.layers:  # on CPU these move nothing, but must keep every tensor
        layer.offload()
        layer.prefetch()
    check([2, 0, 1])
    # Decoding after the reorder gives each row what it would have got in its original place.
    step = {
        "input_ids": ids[:, :1],
        "position_ids": positions[:, -1:] + 1,
        "attention_mask": torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1),
    }
    with torch.no_grad():
        moved = model(**{k: v[[2, 0, 1]] for k, v in step.items()}, past_key_values=cache).logits
        fresh = SVDCompressedCache(model)
        model(ids, attention_mask=mask, position_ids=positions, past_key_values=fresh)
        expected = model(**step, past_key_values=fresh).logits[[2, 0, 1]]
    torch.testing.assert_close(moved, expected, atol=1e-4, rtol=0)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0


@pytest.mark.parametrize("window", [0, 6])
def test_crop_then_refeed(window):
    model = patched(8, rank=16, window=window)
    ids = structured_ids(20, batch=2)
    with torch.no_grad():
        cache = SVDCompressedCache(model)
        model(ids, past_key_values=cache)
        cache.crop(-8)
        layer = cache.layers[1]
        assert layer.keys.shape[-2] + layer.recent_keys.shape[-2] == 12 == layer.positions.shape[-1]
        assert layer.keys.stored.scale.shape[-2] == layer.values.stored.data.shape[-2] == layer.keys.shape[-2]
        refed = model(ids[:, 12:], past_key_values=cache).logits
        fresh = model(ids, past_key_values=SVDCompressedCache(model)).logits[:, 12:]
    if window == 0:  # per-token codes: the refed tokens are stored exactly as a fresh cache stores them
        torch.testing.assert_close(refed, fresh, atol=1e-4, rtol=0)
    assert torch.isfinite(refed).all() and cache.get_seq_length() == 20
    assert cache.is_croppable == (window == 0)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("key_rank,value_rank,group_size,window", [(24, 20, 2, 0), (32, 8, 1, 5), (7, 13, 1, 0)])
def test_memory_accounting_matches_the_shapes(bits, key_rank, value_rank, group_size, window):
    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=32, num_layers=3, dtype=torch.bfloat16)
    config = weights_config(
        key_rank=key_rank, value_rank=value_rank, group_size=group_size, window=window, latent_bits=bits
    )
    patch_model(model, config)
    cache = SVDCompressedCache(model)
    batch, tokens = 2, 20
    with torch.no_grad():
        model(structured_ids(tokens, batch=batch), past_key_values=cache)
    layers, groups, head_dim = 3, 2 // group_size, 32

    def latent_bytes(rank: int) -> int:  # codes + float16 scale and zero per group of 32 channels
        return groups * (math.ceil(rank * bits / 8) + 2 * 2 * math.ceil(rank / 32))

    per_latent = latent_bytes(key_rank * group_size) + latent_bytes(value_rank * group_size)
    per_exact = 2 * 2 * head_dim * 2  # keys and values of 2 KV heads in bf16
    expected = batch * layers * ((tokens - window) * per_latent + window * per_exact + tokens * 4)
    assert cache.nbytes() == expected
    assert cache.bytes_per_token() == expected / (batch * tokens)


def test_generate_uses_quantized_latents_and_left_padded_rows_equal_single_runs():
    model = patched(8, window=3, arch="mistral")
    batched = assert_left_padded_rows_equal_single_runs(model, (4, 13), new_tokens=10)
    assert isinstance(batched.past_key_values.layers[0].keys, QuantizedLatentStore)


def test_beam_search_runs_on_quantized_latents():
    model = patched(4)
    with torch.no_grad():
        out = model.generate(
            structured_ids(10, batch=2),
            max_new_tokens=8,
            num_beams=3,
            num_return_sequences=2,
            do_sample=False,
            return_dict_in_generate=True,
        )
    assert out.sequences.shape == (4, 18)
    assert out.past_key_values.layers[0].keys.stored.data.shape[0] == 6  # batch 2 x 3 beams


# --- the real default model -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_int8_full_rank_keeps_perplexity_on_the_default_model():
    from hf_svdkv.text import load_text, tokenize_text
    from hf_svdkv.tools.eval import dynamic_row, run_eval, svd_row
    from hf_svdkv.tools.loading import load_model

    model, tokenizer = load_model()  # bfloat16
    ids = tokenize_text(tokenizer, load_text("wiki"), model.config.vocab_size)
    config = weights_config(key_rank=64, value_rank=64, latent_bits=8)
    result = run_eval(
        model,
        ids,
        [dynamic_row(), svd_row("int8", config=config)],
        context=512,
        continuation=128,
        n_windows=2,
        progress=False,
    )
    base, int8 = result.rows
    assert 3 < base.ppl < 100
    assert abs(int8.delta_pct) < 0.5
    assert int8.compression_ratio > 1.7  # 16-bit -> 8-bit codes, less scales, zeros and positions
