"""The fused CPU decode kernel (decode/cpu_decode.cpp): what it computes is the torch path's function (an invariant
over every cache variant: tests/test_invariants.py); here, what is particular to it: every head size it compiles,
bfloat16, integer latents, AMX tiles, and the torch path taking over where it cannot be built or is switched off."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import structured_ids, tiny_model, weights_config

import hf_svdkv.decode
from hf_svdkv import SVDBases, SVDCompressedCache, patch_model
from hf_svdkv.decode import Rope, layer_state
from hf_svdkv.decode import cpu as cpu_decode
from hf_svdkv.decode.blockwise import BlockwiseBackend, blockwise_attention
from hf_svdkv.decode.cpu import CpuKernelBackend
from hf_svdkv.latents import LatentStore, MixedLatentStore

pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="no C++ compiler: the CPU kernel cannot be built")


def decode(model, ids: torch.Tensor, kernel: bool, monkeypatch, steps: int = 5) -> torch.Tensor:
    """Logits of a prefill and `steps` greedy single-token steps, through the kernel or the torch path."""
    backends = [CpuKernelBackend(), BlockwiseBackend()] if kernel else [BlockwiseBackend()]
    monkeypatch.setattr(hf_svdkv.decode, "BACKENDS", backends)
    cache = SVDCompressedCache(model)
    logits = []
    with torch.inference_mode():
        out = model(ids, past_key_values=cache)
        logits.append(out.logits[:, -1:])
        for _ in range(steps):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache)
            logits.append(out.logits)
    return torch.cat(logits, dim=1).float()


@pytest.mark.parametrize("bits", [None, 8, 4, "mixed"])
def test_bfloat16_close_to_torch_path(bits, monkeypatch):
    model = tiny_model("llama", num_heads=6, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)
    size = {"target_ratio": 3.0} if bits == "mixed" else {"key_rank": 24, "value_rank": 20}
    patch_model(model, weights_config(**size, latent_bits=bits))
    ids = structured_ids(300)
    expected = decode(model, ids, kernel=False, monkeypatch=monkeypatch)
    got = decode(model, ids, kernel=True, monkeypatch=monkeypatch)
    # Both round latents to bfloat16; the torch path also rounds rebuilt keys to bfloat16, the kernel keeps float32.
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_kernel_handles_each_head_size_it_claims():
    """The kernel backend directly, for every compiled head size, against the torch path on the same layer."""
    for head_dim in cpu_decode.HEAD_DIMS:
        model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=head_dim, num_layers=1)
        bases = SVDBases.from_model(model, weights_config(key_rank=8, value_rank=8))
        patch_model(model, bases=bases)
        cache = SVDCompressedCache(model)
        with torch.inference_mode():
            model(structured_ids(70), past_key_values=cache)
            layer, attention = cache.layers[0], model.model.layers[0].self_attn
            state = layer_state(attention, layer)
            rope = Rope(model.model.rotary_emb, layer.positions)
            query = torch.randn(1, 4, 1, head_dim, generator=torch.Generator().manual_seed(head_dim))
            expected, expected_lse = blockwise_attention(query, layer, state, rope.factors, scaling=attention.scaling)
            got, lse = CpuKernelBackend().attend(
                query, layer, state, rope, scaling=attention.scaling, attention_mask=None
            )
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=0)


def prefilled_layer(num_heads, num_kv_heads, head_dim, key_rank, value_rank, group_size, bits, dtype=torch.float32):
    """A one-layer model's cache layer after a prompt of two rows longer than a kernel span, with what attending over
    it takes: (layer, state, rope, scaling, a query [2, heads, 1, d], a mask hiding row 1's first 13 tokens). Mixed
    latents (`bits` "mixed") take no ranks: their widths are allocated for a 3x smaller cache."""
    model = tiny_model("llama", num_heads, num_kv_heads, head_dim, num_layers=1, dtype=dtype)
    size = {"target_ratio": 3.0} if bits == "mixed" else {"key_rank": key_rank, "value_rank": value_rank}
    config = weights_config(**size, group_size=group_size, latent_bits=bits)
    patch_model(model, config)
    cache = SVDCompressedCache(model)
    with torch.inference_mode():
        model(structured_ids(cpu_decode.SPAN + 90, batch=2), past_key_values=cache)
    layer, attention = cache.layers[0], model.model.layers[0].self_attn
    state = layer_state(attention, layer)
    rope = Rope(model.model.rotary_emb, layer.positions)
    query = torch.randn(2, num_heads, 1, head_dim, generator=torch.Generator().manual_seed(head_dim)).to(dtype)
    mask = torch.ones(2, 1, 1, layer.get_seq_length(), dtype=torch.bool)
    mask[1, ..., :13] = False  # left padding
    return layer, state, rope, attention.scaling, query, mask


# (heads, KV heads, head_dim, key rank, value rank, group size): every compiled head size; ranks with a partial group
# of 32 channels, odd (an odd number of 4-bit codes: the last byte half padding); joint bases.
INTEGER_GEOMETRIES = {
    "d32-odd": (4, 2, 32, 9, 13, 1),
    "d64-joint-3": (6, 3, 64, 40, 33, 3),
    "d80-joint-odd": (4, 2, 80, 13, 9, 2),
    "d96-mha": (4, 4, 96, 32, 17, 1),
    "d128-joint": (4, 2, 128, 64, 48, 2),
    "d256-odd": (4, 2, 256, 9, 13, 1),
}


@pytest.mark.parametrize("bits", [8, 4, "mixed"])
@pytest.mark.parametrize("geometry", INTEGER_GEOMETRIES.values(), ids=INTEGER_GEOMETRIES.keys())
def test_integer_latents_match_torch_path(geometry, bits):
    """8-bit, 4-bit and mixed-width latents read by the kernel as codes against the torch path (which dequantizes them
    first), over two spans and left padding, a float32 model: the same to float32 rounding."""
    layer, state, rope, scaling, query, mask = prefilled_layer(*geometry, bits)
    assert layer.keys.bits == bits and CpuKernelBackend().supports(query, layer, state, rope)
    kwargs = {"scaling": scaling, "attention_mask": mask}
    with torch.inference_mode():
        expected, expected_lse = BlockwiseBackend().attend(query, layer, state, rope, **kwargs)
        got, lse = CpuKernelBackend().attend(query, layer, state, rope, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=0)


def read_as_float_latents(layer):
    """A shallow copy of `layer` whose keys and values are float latents holding what its integer latents read as in
    the model dtype (what the torch path computes with)."""
    floats = copy.copy(layer)
    for name in ("keys", "values"):
        store = getattr(layer, name)
        batch, groups = store.shape[:2]
        float_store = LatentStore(batch, groups, store.rank, store.dtype, store.device)
        float_store.stored = store.read(dtype=store.dtype)
        setattr(floats, name, float_store)
    return floats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("geometry", ["d64-joint-3", "d80-joint-odd"])
def test_integer_latents_read_as_the_torch_path_reads_them(geometry, bits, dtype):
    """The kernel on codes equals, bit for bit, the kernel on float latents holding the torch path's dequantization
    (float32, rounded to bfloat16 for a bfloat16 model), vector and AMX rebuilds alike: the dequantization is exact,
    float16 subnormal zero points included (the kernel runs with denormals read as zero)."""
    layer, state, rope, scaling, query, mask = prefilled_layer(*INTEGER_GEOMETRIES[geometry], bits, dtype)
    valid = mask[:, 0, 0, : layer.keys.length].to(torch.uint8)
    with torch.inference_mode():
        for store in (layer.keys, layer.values):
            store.stored.zero[..., ::5, -1] = 2.0**-20  # float16 subnormals
            store.stored.zero[..., 1::5, 0] = -(2.0**-23)
        floats = read_as_float_latents(layer)
        for tiles in [False, True] if dtype == torch.bfloat16 and cpu_decode.tiles_available() else [False]:
            expected = cpu_decode.decode_latents(query[:, :, 0], floats, state, rope.factors, scaling, valid, tiles)
            got = cpu_decode.decode_latents(query[:, :, 0], layer, state, rope.factors, scaling, valid, tiles)
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_every_code_width_read_as_the_torch_path_reads_it(dtype):
    """Mixed latents re-stored in runs of every width the kernel unpacks (8, 4, 2 and 1 bits; widths that fill neither
    a vector nor a last byte; groups split across runs): bit for bit the kernel on the torch path's dequantization."""
    layer, state, rope, scaling, query, mask = prefilled_layer(6, 3, 64, 0, 0, 3, "mixed", dtype)
    valid = mask[:, 0, 0, : layer.keys.length].to(torch.uint8)
    with torch.inference_mode():
        for name in ("keys", "values"):
            store = getattr(layer, name)
            rank, widths = store.rank, []
            for bits in (8, 4, 2, 1, 2, 8):  # runs of 21, 37, 19, 11, ... channels: the rest of the rank in the last
                widths.append((bits, min(rank - sum(w for _, w in widths), (21, 37, 19, 11, 17, rank)[len(widths)])))
            segments = [(bits, width) for bits, width in widths if width]
            restored = MixedLatentStore(*store.shape[:2], rank, store.dtype, store.device, segments=segments)
            restored.append(restored.encode(store.read()))
            setattr(layer, name, restored)
        assert len(layer.keys.segments) >= 4 and {1, 2} <= {bits for bits, _ in layer.keys.segments}
        assert CpuKernelBackend().supports(query, layer, state, rope)
        floats = read_as_float_latents(layer)
        for tiles in [False, True] if dtype == torch.bfloat16 and cpu_decode.tiles_available() else [False]:
            expected = cpu_decode.decode_latents(query[:, :, 0], floats, state, rope.factors, scaling, valid, tiles)
            got = cpu_decode.decode_latents(query[:, :, 0], layer, state, rope.factors, scaling, valid, tiles)
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("bits", [None, 4, "mixed"])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_window_and_sinks_scored_in_the_kernel_equal_the_torch_merge(head_dim, bits):
    """The kernel scores the exact copies (sinks, window) in its own softmax: the same two outputs as the torch path's
    `attend_window` merge, a left-padded row included (its sinks come after the padding)."""
    model = tiny_model("llama", num_heads=6, num_kv_heads=2, head_dim=head_dim, num_layers=1)
    size = {"target_ratio": 3.0} if bits == "mixed" else {"key_rank": 24, "value_rank": 20}
    patch_model(model, weights_config(**size, latent_bits=bits, window=16, sinks=4))
    cache = SVDCompressedCache(model)
    ids = structured_ids(cpu_decode.SPAN + 90, batch=2)
    padding = torch.ones_like(ids)
    padding[1, :13] = 0
    generator = torch.Generator().manual_seed(head_dim)
    with torch.inference_mode():
        model(ids, attention_mask=padding, past_key_values=cache)
        layer, attention = cache.layers[0], model.model.layers[0].self_attn
        new_key, new_value = torch.randn(2, 2, 2, 1, head_dim, generator=generator)
        exact = layer.append(new_key, new_value, layer.positions[:, -1:] + 1)
        state = layer_state(attention, layer)
        rope = Rope(model.model.rotary_emb, layer.positions)
        query = torch.randn(2, 6, 1, head_dim, generator=generator)
        mask = torch.ones(2, 1, 1, layer.get_seq_length(), dtype=torch.bool)
        mask[1, ..., :13] = False
        kwargs = {"scaling": attention.scaling, "attention_mask": mask}
        assert exact is not None and CpuKernelBackend().supports(query, layer, state, rope)
        got = CpuKernelBackend().attend_with_exact(query, layer, state, rope, exact, **kwargs)
        expected = BlockwiseBackend().attend_with_exact(query, layer, state, rope, exact, **kwargs)
    torch.testing.assert_close(got.latent, expected.latent, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.exact, expected.exact, atol=1e-5, rtol=0)


def test_up_tiles_layout():
    """Tile (group, step, column tile, part, pair, column, member) holds part of up[group, 32 step + 2 pair + member,
    16 column tile + column]; hi + lo is the float32 row to bfloat16-pair precision; padded ranks are zero."""
    up = torch.randn(2, 40, 48, generator=torch.Generator().manual_seed(0))
    tiles = cpu_decode.up_tiles(up)
    assert tiles.shape == (2, 2, 3, 2, 16, 16, 2) and tiles.dtype == torch.bfloat16
    rebuilt = (tiles[:, :, :, 0].float() + tiles[:, :, :, 1].float()).permute(0, 1, 3, 5, 2, 4).reshape(2, 64, 48)
    torch.testing.assert_close(rebuilt[:, :40], up, atol=0, rtol=2**-15)
    assert not rebuilt[:, 40:].any()


@pytest.mark.skipif(not cpu_decode.tiles_available(), reason="this CPU (or OS) has no AMX tiles")
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,key_rank,group_size",
    [(4, 2, 64, 32, 1), (6, 2, 64, 24, 1), (6, 3, 32, 15, 3), (4, 2, 80, 35, 2), (4, 4, 128, 9, 1), (4, 2, 256, 64, 1)],
    ids=["one-step", "padded", "joint-odd", "d80-joint-3-steps", "d128-odd", "d256"],
)
def test_amx_tiles_match_vector_rebuild(num_heads, num_kv_heads, head_dim, key_rank, group_size):
    """bfloat16 latents rebuilt by AMX tiles (hi + lo bfloat16 parts of the up projection) give the vector path's
    float32 answer to float32 rounding, over several blocks, spans and column tiles of a group."""
    model = tiny_model("llama", num_heads, num_kv_heads, head_dim, num_layers=1, dtype=torch.bfloat16)
    patch_model(model, weights_config(key_rank=key_rank, value_rank=16, group_size=group_size))
    cache = SVDCompressedCache(model)
    with torch.inference_mode():
        model(structured_ids(cpu_decode.SPAN + 77, batch=2), past_key_values=cache)
        layer, attention = cache.layers[0], model.model.layers[0].self_attn
        state = layer_state(attention, layer)
        rope = Rope(model.model.rotary_emb, layer.positions).factors
        query = torch.randn(2, num_heads, head_dim, generator=torch.Generator().manual_seed(head_dim))
        valid = torch.ones(2, layer.keys.shape[-2], dtype=torch.uint8)
        valid[1, :13] = 0
        vector, vector_lse = cpu_decode.decode_latents(query, layer, state, rope, attention.scaling, valid, tiles=False)
        tiles, tiles_lse = cpu_decode.decode_latents(query, layer, state, rope, attention.scaling, valid, tiles=True)
    torch.testing.assert_close(tiles, vector, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(tiles_lse, vector_lse, atol=2e-5, rtol=2e-5)


def test_without_a_compiler_the_torch_path_serves(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_SVDKV_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    cpu_decode._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not build the CPU decode kernel"):
            assert not cpu_decode.available()
        model = tiny_model("llama")
        patch_model(model, weights_config(key_rank=8, value_rank=8))
        decode(model, structured_ids(20), kernel=True, monkeypatch=monkeypatch, steps=2)  # the torch path serves
    finally:
        cpu_decode._library.cache_clear()


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("HF_SVDKV_CPU_KERNEL", "0")
    cpu_decode._library.cache_clear()
    try:
        assert not cpu_decode.available()
    finally:
        monkeypatch.delenv("HF_SVDKV_CPU_KERNEL")
        cpu_decode._library.cache_clear()
    assert cpu_decode.available()


def test_tiles_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("HF_SVDKV_CPU_TILES", "0")
    cpu_decode.tiles_available.cache_clear()
    try:
        assert not cpu_decode.tiles_available()
    finally:
        monkeypatch.delenv("HF_SVDKV_CPU_TILES")
        cpu_decode.tiles_available.cache_clear()
