"""Mixed-precision latents: a bit width per channel under the byte budget, packed so every bit is real memory."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import structured_ids, tiny_model, weights_config

from hf_svdkv import CompressionConfig, SVDBases, SVDCompressedCache, patch_model
from hf_svdkv.allocation import FULL_BYTES, POSITION_BYTES, LayerSpectrum
from hf_svdkv.bit_allocation import allocate_bits, hull_steps, relative_error, segment_bytes
from hf_svdkv.latents import MixedLatentStore
from hf_svdkv.quantization import quantize
from hf_svdkv.svd_cache import cache_settings


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("dim", [64, 45, 7])
def test_codes_on_the_grid_round_trip_exactly_and_pack_densely(bits, dim):
    levels = 2**bits - 1
    codes = torch.randint(0, levels + 1, (3, 5, dim), generator=torch.Generator().manual_seed(bits * dim)).float()
    codes[..., 0::32], codes[..., 1 % dim :: 32] = 0.0, float(levels)  # each group spans 0..levels: zero 0, scale 1
    if dim == 1:
        pytest.skip("one channel cannot span the grid")
    q = quantize(codes, bits, 32)
    assert q.data.shape[-1] == math.ceil(dim * bits / 8)
    assert torch.equal(q.dequantize(), codes)


def test_only_widths_on_the_convex_hull_are_bought():
    # Min/max 1-bit codes err more than not storing the channel at all: never worth its bytes.
    assert relative_error(1) > relative_error(0)
    steps = hull_steps()
    assert all(low < high for low, high in steps) and 1 not in {w for step in steps for w in step}
    assert steps[0][0] == 0 and steps[-1][1] == 8


def _spectra(layers: int = 30, groups: int = 1, dim: int = 192) -> list[LayerSpectrum]:
    generator = torch.Generator().manual_seed(0)
    spectra = []
    for _ in range(layers):
        pair = []
        for _ in range(2):
            decay = torch.rand(groups, 1, generator=generator, dtype=torch.float64) * 0.08 + 0.01
            pair.append(torch.exp(-decay * torch.arange(dim, dtype=torch.float64)))
        spectra.append(LayerSpectrum(*pair))
    return spectra


@pytest.mark.parametrize("ratio", [4.0, 8.0, 12.0, 16.0])
@pytest.mark.parametrize("groups", [1, 3])
def test_the_budget_is_met_within_one_percent(ratio, groups):
    spectra = _spectra(groups=groups, dim=192 // groups)
    widths = allocate_bits(spectra, ratio)
    full = sum(2 * s.key.numel() * FULL_BYTES for s in spectra)
    held = sum(segment_bytes(w) * groups for pair in widths for w in pair) + POSITION_BYTES * len(spectra)
    assert ratio <= full / held <= ratio * 1.01
    for pair in widths:
        for w in pair:
            assert w == sorted(w, reverse=True) and set(w) <= {8, 4, 2}
    # More bytes buy at least as many bits on every layer's keys and values.
    looser = allocate_bits(spectra, ratio / 2)
    assert sum(map(sum, (w for pair in looser for w in pair))) > sum(map(sum, (w for pair in widths for w in pair)))


def test_a_store_holds_exactly_the_bytes_its_format_says():
    segments = [(8, 3), (4, 33), (2, 10)]
    store = MixedLatentStore(2, 3, 46, torch.bfloat16, torch.device("cpu"), segments=segments)
    latents = torch.randn(2, 3, 20, 46)
    store.append(store.encode(latents))
    widths = [8] * 3 + [4] * 33 + [2] * 10
    assert store.nbytes() == 2 * 3 * 20 * segment_bytes(widths)
    assert store.shape == (2, 3, 20, 46)
    error = (store.read() - latents).square().mean(-1) / latents.square().mean(-1)
    # Expected: (3 f(8) + 33 f(4) + 10 f(2)) / 46 ≈ 0.05 of the variance (f = relative_error).
    assert error.mean() < 0.07
    store.crop(7)
    assert store.length == 7 and torch.equal(
        store.read(), store.decode(store.encode(latents[..., :7, :]), torch.float32)
    )


def test_mixed_bases_save_load_and_reproduce_the_logits(tmp_path):
    model = patch_model(tiny_model("llama", 4, 2, 32), weights_config(target_ratio=4.0, latent_bits="mixed"))
    ids = structured_ids(48)
    with torch.no_grad():
        expected = model(ids, past_key_values=SVDCompressedCache(model)).logits
    bases = cache_settings(model).bases
    assert all(layer.key.channel_bits is not None for layer in bases.layers)
    bases.save_pretrained(tmp_path)
    loaded = SVDBases.from_pretrained(tmp_path)
    fresh = patch_model(tiny_model("llama", 4, 2, 32), bases=loaded, latent_bits="mixed", exact_prefill=False)
    with torch.no_grad():
        got = fresh(ids, past_key_values=SVDCompressedCache(fresh)).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # Mixed bases store 4.0x fewer bytes than a 16-bit cache, as the target says.
    config = fresh.config
    full = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * 48
    cache = SVDCompressedCache(fresh)
    with torch.no_grad():
        fresh(ids, past_key_values=cache)
    assert full / cache.nbytes() == pytest.approx(4.0, rel=0.03)


def test_mixed_needs_a_ratio_and_bases_with_widths():
    with pytest.raises(ValueError, match="latent_bits='mixed' spends a byte budget"):
        CompressionConfig(key_rank=8, value_rank=8, latent_bits="mixed")
    model = tiny_model("llama", 4, 2, 32)
    plain = SVDBases.from_model(model, weights_config(key_rank=8, value_rank=8))
    patch_model(model, bases=plain, latent_bits="mixed")
    with pytest.raises(ValueError, match="needs bases with a bit width per channel"), torch.no_grad():
        model(structured_ids(8), past_key_values=SVDCompressedCache(model))
