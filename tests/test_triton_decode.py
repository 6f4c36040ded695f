"""The Triton decode kernel against the torch latent path, run by Triton's interpreter on CPU tensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import structured_ids, tiny_model, weights_config

from hf_svdkv import SVDCompressedCache, patch_model
from hf_svdkv.decode import Rope, layer_state, project_output
from hf_svdkv.decode.blockwise import blockwise_attention
from hf_svdkv.decode.window import attend_window

triton = pytest.importorskip("triton")


def _interpreting() -> bool:
    """Whether Triton runs kernels on CPU tensors in this process: TRITON_INTERPRET=1 must have been set before
    triton was first imported (torch imports it early), since it decides how triton.language is compiled."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.zeros, InterpretedFunction)


RUNS_HERE = _interpreting()  # CPU tensors even on a GPU machine: scripts/gpu_check.py checks the compiled kernels
kernel_test = pytest.mark.skipif(not RUNS_HERE, reason="runs in a child process with TRITON_INTERPRET=1 (see below)")


def test_kernels_in_a_fresh_interpreter():
    """This file's kernel tests, run again in a child process where the interpreter is on from the start."""
    if RUNS_HERE:
        pytest.skip("the kernel tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
        env=env,
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]


def filled_layer(model, batch: int, prompt_len: int, pad: int):
    """A patched model's cache after a left-padded prefill (row 0 padded by `pad`) and one appended token."""
    ids = structured_ids(prompt_len, batch=batch)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    cache = SVDCompressedCache(model)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    attention = model.model.layers[1].self_attn
    layer = cache.layers[1]
    generator = torch.Generator().manual_seed(1)
    shape = (batch, model.config.num_key_value_heads, 1, attention.head_dim)
    dtype = model.dtype
    key, value = (torch.randn(shape, generator=generator).to(dtype) for _ in range(2))
    query = torch.randn(batch, model.config.num_attention_heads, 1, attention.head_dim, generator=generator).to(dtype)
    positions = (mask.sum(-1, keepdim=True) if pad else torch.full((batch, 1), prompt_len)).to(torch.int32)
    exact = layer.append(key, value, positions)
    full_mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=-1).bool()[:, None, None, :]
    return attention, layer, query, exact, (full_mask if pad else None)


@kernel_test
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,group_size,window,pad,bits",
    [
        (4, 4, 1, 0, 0, None),
        (6, 2, 1, 0, 3, None),
        (6, 2, 2, 0, 3, None),
        (6, 3, 3, 4, 2, None),
        (4, 2, 1, 3, 0, None),
        (6, 3, 3, 4, 2, 8),
        (4, 2, 1, 3, 0, 4),
    ],
    ids=[
        "mha",
        "gqa-padded",
        "gqa-joint-padded",
        "joint-window-padded",
        "gqa-window",
        "joint-window-padded-int8",
        "gqa-window-int4",
    ],
)
def test_kernel_matches_torch_path(num_heads, num_kv_heads, group_size, window, pad, bits):
    """Through `TritonBackend.attend`, with the window merged afterwards as `decode.attend` does."""
    model = tiny_model("qwen2", num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=32)  # biases: centers
    patch_model(
        model, weights_config(key_rank=12, value_rank=10, group_size=group_size, window=window, latent_bits=bits)
    )
    attention, layer, query, exact, mask = filled_layer(model, batch=2, prompt_len=21, pad=pad)
    state = layer_state(attention, layer)
    rope = Rope(model.model.rotary_emb, layer.positions)
    from hf_svdkv.decode.triton_kernel import TritonBackend

    outputs = []
    for latent, lse in (
        blockwise_attention(query, layer, state, rope.factors, scaling=attention.scaling, attention_mask=mask),
        TritonBackend().attend(query, layer, state, rope, scaling=attention.scaling, attention_mask=mask),
    ):
        outputs.append(
            attend_window(query, latent, lse, layer, state, rope, exact, scaling=attention.scaling, attention_mask=mask)
        )
    expected, got = outputs
    torch.testing.assert_close(got.latent, expected.latent, atol=1e-5, rtol=1e-4)
    if window:
        torch.testing.assert_close(got.exact, expected.exact, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        project_output(attention, state, got), project_output(attention, state, expected), atol=1e-5, rtol=1e-4
    )


@kernel_test
@pytest.mark.parametrize("bits", [None, 4], ids=["bf16", "int4"])
def test_kernel_bf16_and_many_splits(bits):
    from hf_svdkv.decode import triton_kernel

    model = tiny_model("llama", num_heads=6, num_kv_heads=2, head_dim=32, dtype=torch.bfloat16)
    patch_model(model, weights_config(key_rank=16, value_rank=16, latent_bits=bits))
    attention, layer, query, _, mask = filled_layer(model, batch=2, prompt_len=45, pad=5)
    state = layer_state(attention, layer)
    rotary = model.model.rotary_emb
    expected, _ = blockwise_attention(
        query, layer, state, Rope(rotary, layer.positions).factors, scaling=attention.scaling, attention_mask=mask
    )
    inv_freq = rotary.inv_freq.float()
    valid = mask[:, 0, 0, : layer.keys.shape[-2]].to(torch.uint8)
    out, lse = triton_kernel.decode_latents(
        query[:, :, 0], layer, state, inv_freq, rotary.attention_scaling, attention.scaling, valid, block_t=16
    )
    torch.testing.assert_close(out, expected[:, 0], atol=2e-2, rtol=2e-2)  # bf16 keys and probabilities
    assert torch.isfinite(lse).all()


@kernel_test
@pytest.mark.parametrize("rope_by_tile", [True, False], ids=["angle-addition", "direct"])
def test_kernel_rotation_with_and_without_gaps(rope_by_tile):
    """Tiles of consecutive positions are rotated by angle addition from their first position, tiles with a gap token
    by token; both must match the torch path, on many tiles and far positions."""
    from hf_svdkv.decode import triton_kernel

    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=32)
    patch_model(model, weights_config(key_rank=12, value_rank=10))
    attention, layer, query, _, mask = filled_layer(model, batch=2, prompt_len=70, pad=9)
    layer.positions[:] += 3000  # far positions: angle errors would show
    layer.positions[1, 37:] += 5  # a gap inside row 1's third tile of 16, as custom position ids make
    state = layer_state(attention, layer)
    rotary = model.model.rotary_emb
    expected, _ = blockwise_attention(
        query, layer, state, Rope(rotary, layer.positions).factors, scaling=attention.scaling, attention_mask=mask
    )
    valid = mask[:, 0, 0, : layer.keys.shape[-2]].to(torch.uint8)
    out, lse = triton_kernel.decode_latents(
        query[:, :, 0],
        layer,
        state,
        rotary.inv_freq.float(),
        rotary.attention_scaling,
        attention.scaling,
        valid,
        block_t=16,
        rope_by_tile=rope_by_tile,
    )
    torch.testing.assert_close(out, expected[:, 0], atol=1e-5, rtol=1e-4)
    assert torch.isfinite(lse).all()


@kernel_test
@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,group_size,key_rank,value_rank,pad",
    [(4, 4, 1, 12, 10, 0), (6, 2, 1, 9, 13, 3), (6, 2, 2, 13, 9, 0), (6, 3, 3, 13, 12, 2)],
    ids=["mha", "gqa-odd-padded", "gqa-joint", "joint-odd-two-groups-padded"],
)
def test_kernel_reads_integer_latents(bits, num_heads, num_kv_heads, group_size, key_rank, value_rank, pad):
    """Codes, scales and zero points dequantized in the kernel match the torch path, which dequantizes them with
    `QuantizedTensor.dequantize`: odd ranks (a 4-bit row's padding code, a partial group of 32 channels), latents over
    one group (3 joint heads at 13/12: keys of rank 39 in two chunks, value tiles of rank 36 across two groups), left
    padding, several splits of 16 tokens."""
    from hf_svdkv.decode import triton_kernel

    model = tiny_model("qwen2", num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=32)
    patch_model(
        model, weights_config(key_rank=key_rank, value_rank=value_rank, group_size=group_size, latent_bits=bits)
    )
    attention, layer, query, _, mask = filled_layer(model, batch=2, prompt_len=45, pad=pad)
    assert layer.keys.bits == layer.values.bits == bits and layer.keys.rank == key_rank * group_size
    state = layer_state(attention, layer)
    rotary = model.model.rotary_emb
    expected, expected_lse = blockwise_attention(
        query, layer, state, Rope(rotary, layer.positions).factors, scaling=attention.scaling, attention_mask=mask
    )
    valid = None if mask is None else mask[:, 0, 0, : layer.keys.length].to(torch.uint8)
    out, lse = triton_kernel.decode_latents(
        query[:, :, 0],
        layer,
        state,
        rotary.inv_freq.float(),
        rotary.attention_scaling,
        attention.scaling,
        valid,
        block_t=16,
    )
    torch.testing.assert_close(out, expected[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, expected_lse[..., 0], atol=1e-5, rtol=1e-4)
