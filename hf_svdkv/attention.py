"""Llama-family attention that stores keys before RoPE in an `SVDCompressedCache` and rotates them back at
the positions they were written at. Any other cache goes through the module's original forward untouched.

A forward into an empty cache (a prompt) attends over its own exact keys and values with the model's attention
backend and causal mask, as the stock attention does, and stores them compressed: nothing is rebuilt (the cache's
`exact_prefill`, default). Later forwards (decoding, teacher-forced tokens, later chunks of a chunked prefill) attend
over the stored tokens as latents, a block at a time (`decode/`). The reference path below computes the
same function by rebuilding every key and value at full size and running the model's attention backend; it serves
what the latent path cannot (training, attention weights, other backends, offloaded weights) and tests."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import decode
from .bases import SVDBases
from .svd_cache import SVDCacheLayer, SVDCompressedCache

# Query tokens above which the reference path serves instead of the latent path: None = never. The latent path
# computes the same function a block of tokens at a time, so its memory stays bounded for any length; tests lower this
# to compare the two.
MAX_QUERY_LEN: int | None = None
# attention backends whose masks (None, 4-D bool or additive float) the latent path reads; flash attention's are 2-D.
MASK_BACKENDS = ("eager", "sdpa")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, seq, head_dim]; cos/sin [batch, seq, head_dim] (transformers' rotate-half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def window_mask(
    mask: torch.Tensor | None,
    query_len: int,
    total: int,
    exact_index: torch.Tensor,
    window: int,
    sinks: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Extend a [batch, 1, query, total] mask to the full-precision copies of tokens `exact_index` appended to the
    keys: a query reads a token's exact copy when it is a sink (`sinks` [batch, total] flags them) or less than
    `window` tokens old, its latent copy otherwise (as `decode.window` decides it block by block)."""
    if not exact_index.numel():
        return mask
    device = mask.device if mask is not None else device
    index = torch.arange(total, device=device)
    age = torch.arange(total - query_len, total, device=device)[:, None] - index[None, :]
    if mask is None:
        allowed = (age >= 0)[None, None]
    elif mask.dtype == torch.bool:
        allowed = mask[..., mask.shape[-1] - total :]
    else:  # eager's additive mask: 0 where attended, the dtype's minimum elsewhere
        allowed = mask[..., mask.shape[-1] - total :] == 0
    exact_index = exact_index.to(device)
    exact_age = age[:, exact_index]
    sink = torch.zeros((1, total), dtype=torch.bool, device=device) if sinks is None else sinks.to(device)
    sink = sink[:, None, None]  # [batch or 1, 1, 1, total]
    exact = allowed[..., exact_index] & (exact_age >= 0) & (sink[..., exact_index] | (exact_age < window))
    allowed = torch.cat([allowed & (age >= window) & ~sink, exact], dim=-1)
    if mask is not None and mask.dtype == torch.bool:
        return allowed
    mask_dtype = mask.dtype if mask is not None else dtype
    return torch.zeros((), dtype=mask_dtype, device=device).masked_fill(~allowed, torch.finfo(mask_dtype).min)


def _eager_attention(module: nn.Module) -> Callable:
    # The module's own modeling file defines the eager kernel transformers falls back to for it.
    return sys.modules[type(module).__module__].eager_attention_forward


def use_latent_attention(module: nn.Module, cache: SVDCompressedCache, query_len: int) -> bool:
    """Whether this attention call can take the latent path: inference (no dropout), at most MAX_QUERY_LEN new tokens
    (if set), an `o_proj` that is a plain linear layer (its weight can be folded), a cache that is not offloaded layer
    by layer, and the eager or sdpa backend. The caller also keeps the reference path when attention weights are
    requested (the latent path never forms them) or o_proj's weight is offloaded."""
    return (
        not module.training
        and getattr(module.config, "_attn_implementation", None) in MASK_BACKENDS
        and (MAX_QUERY_LEN is None or query_len <= MAX_QUERY_LEN)
        and isinstance(module.o_proj, nn.Linear)
        and module.o_proj.weight.is_floating_point()
        and not getattr(cache, "offloading", False)
    )


def latent_attention_forward(
    module: nn.Module,
    layer: SVDCacheLayer,
    rotary: nn.Module,
    query: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    memo_key: object | None = None,
) -> torch.Tensor:
    """Store the new tokens and return the attention module's output [batch, q, hidden] (o_proj included), attending
    over the latents (`decode`). query [batch, heads, q, d] after RoPE; key_states / value_states [batch, kv_heads, q,
    d] before RoPE; positions [batch, q]; the model's attention mask."""
    exact = layer.append(key_states, value_states, positions)
    state = decode.layer_state(module, layer)
    rope = decode.Rope(rotary, layer.positions, memo_key)
    out = decode.attend(query, layer, state, rope, exact, scaling=module.scaling, attention_mask=attention_mask)
    return decode.project_output(module, state, out)


@dataclass
class AttentionPatch:
    """What one patched attention module needs besides itself."""

    original_forward: Callable
    rotary_emb: nn.Module
    bases: SVDBases
    cache_argument: str = "past_key_values"  # what original_forward calls its cache (architectures.cache_argument)

    def check_cache(self, cache: SVDCompressedCache) -> None:
        # A cache built from other bases would decode latents with the wrong basis: refuse it once, loudly.
        if cache.bases is not self.bases and id(self.bases) not in cache.checked_against:
            self.bases.check_same_model(cache.bases)
            cache.checked_against.add(id(self.bases))


def compressed_attention_forward(
    module: nn.Module,
    patch: AttentionPatch,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    cache=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # transformers 5.24 renamed the attention's `past_key_values` argument to `cache`: accept either.
    past_key_values = cache if cache is not None else past_key_values
    if not isinstance(past_key_values, SVDCompressedCache):
        return patch.original_forward(
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            **{patch.cache_argument: past_key_values},
            **kwargs,
        )
    patch.check_cache(past_key_values)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError("hf_svdkv attention needs position_ids (the decoder model passes them to its layers)")

    batch, seq = hidden_states.shape[:-1]
    if seq == 0:
        raise ValueError(
            "hf_svdkv: the input has no tokens (an empty prompt?); give at least one, e.g. the tokenizer's BOS token"
        )
    hidden_shape = (batch, seq, -1, module.head_dim)
    query = module.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = module.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    query = apply_rope(query, cos, sin)
    positions = position_ids.expand(batch, -1)
    layer = past_key_values.layers[module.layer_idx]
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, _eager_attention(module)
    )
    sliding_window = getattr(module, "sliding_window", getattr(module.config, "sliding_window", None))
    dropout = 0.0 if not module.training else module.attention_dropout
    if (
        past_key_values.exact_prefill
        and not layer.get_seq_length()
        and not getattr(past_key_values, "offloading", False)
    ):
        # A prompt: its keys and values are in hand, exact. Attend over them as the stock attention would (same
        # backend, same mask, its causal fast path) and store them compressed without rebuilding anything.
        layer.append(key, value, positions)
        key = apply_rope(key, cos, sin)
        attn_output, attn_weights = attention_interface(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=module.scaling,
            sliding_window=sliding_window,
            **kwargs,
        )
        return module.o_proj(attn_output.reshape(batch, seq, -1).contiguous()), attn_weights
    # The latent path reads o_proj's weight directly: where accelerate offloaded it (a `meta` placeholder outside
    # o_proj's own forward) only the reference path is right.
    offloaded = module.o_proj.weight.device.type == "meta"
    if use_latent_attention(module, past_key_values, seq) and not kwargs.get("output_attentions") and not offloaded:
        # Attend over the latents directly, a block of tokens at a time: nothing is rebuilt at full size (decode/).
        output = latent_attention_forward(
            module, layer, patch.rotary_emb, query, key, value, positions, attention_mask, memo_key=cos
        )
        return output, None
    key, value = past_key_values.update(key, value, module.layer_idx, positions=positions)
    cached_cos, cached_sin = patch.rotary_emb(value, layer.key_positions())
    # Under an accelerate device map the rotary module may run on another device than this layer.
    cached_cos, cached_sin = cached_cos.to(key.device), cached_sin.to(key.device)
    key = apply_rope(key, cached_cos, cached_sin)
    attention_mask = window_mask(
        attention_mask,
        seq,
        layer.get_seq_length(),
        layer.exact_index,
        layer.window,
        layer.sink_flags(torch.arange(layer.get_seq_length())),
        query.dtype,
        query.device,
    )

    attn_output, attn_weights = attention_interface(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=module.scaling,
        sliding_window=sliding_window,
        **kwargs,
    )
    attn_output = attn_output.reshape(batch, seq, -1).contiguous()
    return module.o_proj(attn_output), attn_weights
