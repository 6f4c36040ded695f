"""Attention straight over the latents of an `SVDCacheLayer`: the same function as the reference path in
`attention.py`, without rebuilding the whole cache at full size on every step.

- Values never leave the latent space: a query head attends over its group's value latents, and the group's up
  projection (and center, which softmax weights summing to 1 turn into a bias) is folded into `o_proj` once.
- Keys are rebuilt and rotated chunk by chunk (RoPE does not commute with the projection), scored against every
  query head that reads them, and dropped: at most one chunk of full-size keys exists at a time.
- Tokens inside the full-precision window are read from their exact copies, by the same rule as `window_mask`.

Single-token decoding goes through a fused kernel where one is available: Triton's (`triton_decode`) on CUDA, the
C++ one of `cpu_decode` on a CPU with a C++ compiler; both share `kernel_attention` for the exact window.

Entry points, called by `attention.compressed_attention_forward`: `use_latent_attention` (can this call take the
fast path?) and `latent_attention_forward` (store the new tokens with `SVDCacheLayer.append`, attend, project: the
attention module's output). `latent_attention` and `fold_value_up_into_o_proj` are the pieces, for tests and other
kernels.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import SVDCacheLayer, SVDCompressedCache
from .projection import Projection

# Keys rebuilt at a time, in elements (float32): 8 MB, so the transient stays far below the cache it reads (the
# whole 8k-token context of the default model at batch 1), while each op is large enough that per-op overhead
# does not dominate on CPU.
CHUNK_ELEMENTS = 1 << 21
# Query tokens above which the reference path (every key and value rebuilt at full size, then the model's attention
# backend) serves instead: None = never. The latent path computes the same function a block of tokens at a time, so its
# memory stays bounded for any length; tests lower this to compare the two.
MAX_QUERY_LEN: int | None = None
# rope types whose frequencies depend on the sequence length: the rotary module itself must compute them.
_DYNAMIC_ROPE = ("dynamic", "longrope")
# attention backends whose masks (None, 4-D bool or additive float) `_allowed` reads.
_MASK_BACKENDS = ("eager", "sdpa")


# --- values folded into o_proj ------------------------------------------------------------------------------------
def _per_query_head(projection: Projection, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query head's slice of its KV head's up projection [heads, rank, head_dim] and center [heads, head_dim]."""
    groups, rank, _ = projection.up.shape
    up = projection.up.reshape(groups, rank, num_kv_heads // groups, head_dim).transpose(1, 2).reshape(num_kv_heads, rank, head_dim)
    center = projection.center.reshape(num_kv_heads, head_dim)
    repeats = num_heads // num_kv_heads
    return up.repeat_interleave(repeats, dim=0), center.repeat_interleave(repeats, dim=0)


def fold_value_up_into_o_proj(
    o_proj_weight: torch.Tensor, value_projection: Projection, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`o_proj` acting on value latents: (weight [hidden, num_heads * value_rank], bias [hidden]).

    Query head j reads KV head h's values v = c @ U_h + m_h, so W_o,j v_j = (W_o,j U_hᵀ) c + W_o,j m_h; summed over
    heads, the first term is the folded weight and the second, since softmax weights sum to 1, a constant bias.
    Computed in float64 (the product of two roundings is then rounded once), returned in float32."""
    hidden = o_proj_weight.shape[0]
    up, center = (t.double() for t in _per_query_head(value_projection, num_heads, num_kv_heads, head_dim))
    weight = o_proj_weight.double().reshape(hidden, num_heads, head_dim)
    folded = torch.einsum("ojd,jrd->ojr", weight, up).reshape(hidden, -1)
    bias = torch.einsum("ojd,jd->o", weight, center)
    return folded.float(), bias.float()


def _latents(stored, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Tokens [start, end) of a layer's key or value latents, dequantized if stored as integer codes."""
    if isinstance(stored, torch.Tensor):
        return stored[..., start:end, :].to(dtype)
    return stored.apply(lambda t: t[..., start:end, :]).dequantize(dtype)


_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of `shape`, reusing one buffer per name (per thread) on CPU: a large temporary
    allocated afresh on every call is mapped afresh too, and its page faults cost more than the work done in it.
    The buffer is bounded by CHUNK_ELEMENTS; CUDA's caching allocator already reuses memory."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (name, dtype, torch.is_inference_mode_enabled())  # inference tensors cannot be written outside that mode
    numel = math.prod(shape)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel + numel // 4 + 4096, dtype=dtype)  # room for a growing cache: a token per step
        buffers[key] = buffer
    return buffer[:numel].view(shape)


# --- RoPE as complex multiplication -------------------------------------------------------------------------------
def _interleave(x: torch.Tensor) -> torch.Tensor:
    """[..., d] in rotate-half order (x1 | x2) -> (x1_0, x2_0, x1_1, x2_1, ...): pairs become complex numbers
    x1 + i x2, and RoPE is a multiplication by cos + i sin, one pass instead of rotate_half's four."""
    half = x.shape[-1] // 2
    return torch.stack([x[..., :half], x[..., half:]], dim=-1).flatten(-2)


def _rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [..., d] interleaved float32, rotated in place and returned; rope [..., d/2] complex, broadcast to x."""
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(rope)).flatten(-2)


_ROPE_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rope_factors(rotary: nn.Module, positions: torch.Tensor, memo_key: object | None = None) -> torch.Tensor:
    """cos + i sin of every cached position [batch, seq, head_dim / 2], complex64, from the model's rotary module
    (so every rope type and its attention scaling match the reference path exactly).

    Every layer of a cache holds the same positions, so with `memo_key` (any object that lives for one forward, such
    as that forward's `position_embeddings[0]`) the first layer computes them and the others reuse them. The next
    forward's positions usually extend these by a token: then only the new positions are computed (unless the rope
    type's frequencies depend on the sequence length)."""
    memo = _ROPE_MEMO.get(rotary)
    if memo is not None and memo_key is not None and memo[0] is memo_key and memo[2].shape[:2] == positions.shape:
        return memo[2]
    known = 0
    if memo is not None and memo_key is not None and not _dynamic_rope(rotary):
        previous = memo[1]
        length = previous.shape[-1]
        if (
            previous.shape[0] == positions.shape[0]
            and length <= positions.shape[-1]
            and previous.device == positions.device
            and torch.equal(previous, positions[:, :length])
        ):
            known = length
    dummy = torch.empty(0, device=positions.device, dtype=torch.float32)  # only its device and dtype are read
    cos, sin = rotary(dummy, positions[:, known:])
    half = cos.shape[-1] // 2
    factors = torch.complex(cos[..., :half].float(), sin[..., :half].float())
    if known:
        factors = torch.cat([memo[2][:, :known], factors], dim=1)
    if memo_key is not None:
        _ROPE_MEMO[rotary] = (memo_key, positions, factors)
    return factors


def _dynamic_rope(rotary: nn.Module) -> bool:
    return any(kind in str(getattr(rotary, "rope_type", "default")) for kind in _DYNAMIC_ROPE)


# --- the attention ------------------------------------------------------------------------------------------------
@dataclass
class LatentAttentionOutput:
    """Attention output of every query head, before `o_proj`, in two parts whose softmax weights are already applied:
    `latent` [batch, q, heads, value_rank] over value latents (project with the folded weight and bias) and
    `exact` [batch, q, heads, head_dim] over exact window values minus their center (project with o_proj's weight)."""

    latent: torch.Tensor
    exact: torch.Tensor | None = None


def _allowed(mask: torch.Tensor | None, query_len: int, total: int, device: torch.device) -> torch.Tensor | None:
    """[batch or 1, 1, q, total] bool from the model's mask (bool, or eager's additive float), causal if None."""
    if mask is None:
        if query_len == 1:
            return None
        query_index = torch.arange(total - query_len, total, device=device)[:, None]
        return (query_index >= torch.arange(total, device=device))[None, None]
    mask = mask[..., -total:]
    return mask if mask.dtype == torch.bool else mask == 0


def _column_masks(
    mask: torch.Tensor | None, query_len: int, total: int, latent_len: int, exact_len: int, window: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Which latent columns (tokens [0, latent_len)) and exact columns (the last exact_len tokens) each query reads:
    a token's exact copy while it is less than `window` tokens old, its latent otherwise (as `window_mask`)."""
    allowed = _allowed(mask, query_len, total, device)
    if not exact_len:
        return (None if allowed is None else allowed[..., :latent_len]), None
    age = torch.arange(total - query_len, total, device=device)[:, None] - torch.arange(total, device=device)[None, :]
    if allowed is None:
        allowed = (age >= 0)[None, None]
    latent = allowed[..., :latent_len] & (age[:, :latent_len] >= window)
    exact = allowed[..., total - exact_len :] & (age[:, total - exact_len :] < window)
    return latent, exact


@dataclass
class _LayerState:
    """Per cache layer, built once: bases laid out for the chunked kernels and the folded output projection."""

    projection: object  # the layer's LayerBases this was built from (identity-checked)
    o_proj_weight: torch.Tensor  # the o_proj weight this was built from (identity-checked)
    # Keys of a group = latents @ key_weight[g].T + key_bias[g]: [key_groups, heads per group * d, rank] in the
    # latents' dtype and [key_groups, heads per group * d] float32, each head interleaved; no bias when the center is 0.
    key_weight: torch.Tensor
    key_bias: torch.Tensor | None
    key_rows: torch.Tensor  # [key_groups, rank, width] float32, heads interleaved: the rows cpu_decode's kernel reads
    key_tiles: torch.Tensor | None  # key_rows as cpu_decode's AMX tiles (bfloat16 latents on CPU), else None
    value_center: torch.Tensor  # [kv_heads, head_dim] float32: subtracted from exact values (the bias adds it back)
    out_weight: torch.Tensor  # folded o_proj [hidden, heads * value_rank] in the model dtype
    out_bias: torch.Tensor  # [hidden]


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layer_state(module: nn.Module, layer: SVDCacheLayer) -> _LayerState:
    state = _STATES.get(layer)
    weight = module.o_proj.weight
    if state is not None and state.projection is layer.projection and state.o_proj_weight is weight:
        return state
    key, value = layer.projection.key, layer.projection.value
    head_dim = layer.head_dim
    groups, rank, width = key.up.shape
    key_rows = _interleave(key.up.reshape(groups, rank, -1, head_dim)).reshape(groups, rank, width)
    key_rows_f32 = key_rows.float().contiguous()
    key_bias = _interleave(key.center.reshape(groups, -1, head_dim)).reshape(groups, width)
    num_heads = module.config.num_attention_heads
    num_kv_heads = value.num_groups * (value.up.shape[-1] // head_dim)
    out_weight, out_bias = fold_value_up_into_o_proj(weight, value, num_heads, num_kv_heads, head_dim)
    if module.o_proj.bias is not None:
        out_bias = out_bias + module.o_proj.bias.float()
    state = _LayerState(
        projection=layer.projection,
        o_proj_weight=weight,
        key_weight=key_rows.mT.to(layer.dtype).contiguous(),
        key_bias=key_bias.float() if key_bias.any() else None,
        key_rows=key_rows_f32,
        key_tiles=_cpu_key_tiles(key_rows_f32, layer),
        value_center=value.center.reshape(num_kv_heads, head_dim).float(),
        out_weight=out_weight.to(weight.dtype),
        out_bias=out_bias.to(weight.dtype),
    )
    _STATES[layer] = state
    return state


def _cpu_key_tiles(key_rows: torch.Tensor, layer: SVDCacheLayer) -> torch.Tensor | None:
    if layer.device.type != "cpu" or layer.dtype != torch.bfloat16:
        return None
    from .cpu_decode import up_tiles

    return up_tiles(key_rows)


def _block_mask(
    mask: torch.Tensor | None, query_len: int, total: int, start: int, end: int, window: int, exact: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """Which of the tokens [start, end) each query reads as latents (`exact` False) or as exact copies (True):
    [batch or 1, 1, q, end - start] bool, or None when every query reads every one of them. A token is read exactly
    while it is less than `window` tokens old, as a latent afterwards (as `window_mask`); the model's mask (padding,
    causality, a sliding window) applies to both. Only this block's slice of anything is built."""
    allowed = None
    if mask is not None:
        offset = mask.shape[-1] - total  # a mask may cover more columns than there are tokens: the last ones count
        mask = mask[..., offset + start : offset + end]
        allowed = mask if mask.dtype == torch.bool else mask == 0
    first_query = total - query_len
    # Ages range over [first_query - (end - 1), total - 1 - start]: the age rule only bites where that range crosses
    # the threshold (window for latents, 0 and window for exact copies).
    oldest, youngest = total - 1 - start, first_query - (end - 1)
    needs_age = youngest < window if not exact else (youngest < 0 or oldest >= window)
    if needs_age:
        age = torch.arange(first_query, total, device=device)[:, None] - torch.arange(start, end, device=device)[None, :]
        rule = (age >= 0) & (age < window) if exact else age >= window
        allowed = rule[None, None] if allowed is None else allowed & rule
    return allowed


def latent_attention(
    query: torch.Tensor,
    layer: SVDCacheLayer,
    state: _LayerState,
    rope: torch.Tensor,
    *,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    exact: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int | None = None,
) -> LatentAttentionOutput:
    """Attention of `query` [batch, heads, q, head_dim] (after RoPE) over a layer that already holds the new tokens
    (`SVDCacheLayer.append`); `rope` = `rope_factors` of `layer.positions`; `exact` = the exact tail `append`
    returned. Flash-style: the latent tokens are taken a block at a time (keys rebuilt and rotated, scored, folded
    into a running softmax over the value latents), then the exact window, so no layer's keys or values ever exist
    at full size and no [query x tokens] mask is built. Scores and softmax in float32."""
    batch, num_heads, query_len, head_dim = query.shape
    num_kv_heads = state.value_center.shape[0]
    per_kv = num_heads // num_kv_heads
    rows = per_kv * query_len
    chunk_size = chunk_size or max(16, CHUNK_ELEMENTS // (batch * num_kv_heads * max(head_dim, rows)))
    total = layer.get_seq_length()
    latent_len = layer.keys.shape[-2]
    exact_len = 0 if exact is None else exact[0].shape[-2]
    device = query.device
    # [batch, kv_heads, heads per kv head * q, d]: every query head reading a KV head scores its keys in one matmul.
    queries = _interleave(query.float() * scaling).reshape(batch, num_kv_heads, rows, head_dim)

    dtype = state.key_weight.dtype
    key_groups, width = state.key_weight.shape[:2]
    per_group = width // head_dim  # KV heads sharing one key basis
    value_groups = layer.projection.value.num_groups
    # The running softmax: max and sum per query row, and the output over value latents (rows grouped by value basis).
    running_max = queries.new_full((batch, num_kv_heads, rows), -math.inf)
    running_sum = queries.new_zeros((batch, num_kv_heads, rows))
    latent = queries.new_zeros((batch, value_groups, num_kv_heads // value_groups * rows, layer.projection.value.rank))

    def fold(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """Fold a block's scores [batch, kv_heads, rows, n] into the running max and sum; rescale the latent output;
        return the block's unnormalised weights."""
        nonlocal running_max
        if allowed is not None:
            # [batch, kv_heads, per_kv, q, n]: masks are per (batch, query token), shared by a KV head's query heads.
            scores = scores.view(batch, num_kv_heads, per_kv, query_len, -1).masked_fill(~allowed[:, :, None], -math.inf)
            scores = scores.view(batch, num_kv_heads, rows, -1)
        new_max = torch.maximum(running_max, scores.amax(-1))
        # A row that has seen nothing yet keeps max -inf: shift by 0 there, so exp gives 0 rather than NaN.
        shift = torch.where(new_max == -math.inf, 0.0, new_max)
        weights = torch.exp(scores - shift[..., None])
        rescale = torch.exp(running_max - shift)
        running_sum.mul_(rescale).add_(weights.sum(-1))
        latent.mul_(rescale.view(batch, value_groups, -1, 1))
        running_max = new_max
        return weights

    last_visible = total - 1 - layer.window  # no latent token younger than the window is ever read as a latent
    for start in range(0, min(latent_len, last_visible + 1), chunk_size):
        end = min(start + chunk_size, latent_len)
        size = end - start
        latents = _latents(layer.keys, start, end, dtype)  # [batch, key_groups, chunk, rank]
        rebuilt = _scratch("rebuilt", (batch, key_groups, size, width), dtype, device)
        torch.matmul(latents, state.key_weight.mT, out=rebuilt)
        if dtype == torch.float32 and per_group == 1:
            keys = rebuilt
        else:  # float32 and head-major [batch, kv_heads, chunk, d]: one pass converts and splits each group's heads
            keys = _scratch("keys", (batch, num_kv_heads, size, head_dim), torch.float32, device)
            grouped = rebuilt.view(batch, key_groups, size, per_group, head_dim).transpose(2, 3)
            keys.view(batch, key_groups, per_group, size, head_dim).copy_(grouped)
        if state.key_bias is not None:
            keys += state.key_bias.view(num_kv_heads, 1, head_dim)
        _rotate(keys, rope[:, None, start:end])
        # Every query head reading a KV head, against that head's keys: [batch, kv_heads, heads per kv * q, chunk].
        scores = torch.matmul(queries, keys.mT)
        allowed = _block_mask(attention_mask, query_len, total, start, end, layer.window, False, device)
        weights = fold(scores, allowed)
        # Rows of a value group: its KV heads' query heads and query tokens.
        grouped_weights = weights.view(batch, value_groups, -1, size).to(dtype)
        latent.add_(torch.matmul(grouped_weights, _latents(layer.values, start, end, dtype)).float())

    exact_out = None
    if exact is not None and exact_len:
        exact_keys = _rotate(_interleave(exact[0].float()), rope[:, None, total - exact_len :])
        scores = torch.matmul(queries, exact_keys.transpose(-1, -2))
        allowed = _block_mask(attention_mask, query_len, total, total - exact_len, total, layer.window, True, device)
        weights = fold(scores, allowed)
        centered = exact[1].float() - state.value_center[:, None, :]
        exact_out = torch.matmul(weights, centered)  # [batch, kv_heads, per_kv * q, d]

    # A padding query that sees nothing gets zeros, not NaN: its NaN would reach every row through the values.
    norm = torch.where(running_sum > 0, running_sum, 1.0).reciprocal_()
    latent = latent.mul_(norm.view(batch, value_groups, -1, 1))
    # [batch, value_groups, kv heads per group * per_kv * q, rank] -> [batch, q, heads, rank]
    latent = latent.reshape(batch, num_heads, query_len, -1).transpose(1, 2)
    if exact is None:
        return LatentAttentionOutput(latent)
    if exact_out is None:
        exact_out = queries.new_zeros((batch, num_kv_heads, rows, head_dim))
    exact_out = exact_out.mul_(norm[..., None])
    return LatentAttentionOutput(latent, exact_out.reshape(batch, num_heads, query_len, head_dim).transpose(1, 2))


def kernel_attention(
    decode: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    query: torch.Tensor,
    layer: SVDCacheLayer,
    state: _LayerState,
    rotary: nn.Module,
    *,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    exact: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LatentAttentionOutput:
    """`latent_attention` for one query token [batch, heads, 1, d] through a fused kernel over the latent tokens:
    `decode(query [batch, heads, d], valid [batch, latent tokens] uint8 or None)` returns the output over value
    latents [batch, heads, value_rank] and its log-sum-exp [batch, heads]. The exact window tail (a few tokens) is
    scored here and merged through the log-sum-exp."""
    batch, num_heads, _, head_dim = query.shape
    total, latent_len = layer.get_seq_length(), layer.keys.shape[-2]
    exact_len = 0 if exact is None else exact[0].shape[-2]
    latent_mask, exact_mask = _column_masks(attention_mask, 1, total, latent_len, exact_len, layer.window, query.device)
    valid = None if latent_mask is None else latent_mask[:, 0, 0].to(torch.uint8).expand(batch, -1)
    if latent_len:
        latent, lse = decode(query[:, :, 0], valid)
    else:
        latent = query.new_zeros((batch, num_heads, layer.values.shape[-1]), dtype=torch.float32)
        lse = query.new_full((batch, num_heads), -math.inf, dtype=torch.float32)
    if exact is None:
        return LatentAttentionOutput(latent[:, None])

    num_kv_heads = state.value_center.shape[0]
    queries = _interleave(query.float() * scaling).view(batch, num_kv_heads, -1, head_dim)
    rope = rope_factors(rotary, layer.positions[:, total - exact_len :])
    exact_keys = _rotate(_interleave(exact[0].float()), rope[:, None])
    scores = torch.matmul(queries, exact_keys.transpose(-1, -2)).view(batch, num_heads, exact_len)
    if exact_mask is not None:
        scores = scores.masked_fill(~exact_mask[:, 0], -math.inf)
    total_lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=-1))
    latent = latent * torch.exp(lse - total_lse)[..., None]
    probs = torch.exp(scores - total_lse[..., None]).view(batch, num_kv_heads, -1, exact_len)
    exact_out = torch.matmul(probs, exact[1].float() - state.value_center[:, None, :]).view(batch, num_heads, head_dim)
    return LatentAttentionOutput(latent[:, None], exact_out[:, None])


def project_output(module: nn.Module, state: _LayerState, out: LatentAttentionOutput) -> torch.Tensor:
    """The attention module's output [batch, q, hidden]: folded o_proj on the latent part, o_proj's own weight on
    the exact part."""
    dtype = state.out_weight.dtype
    result = F.linear(out.latent.flatten(-2).to(dtype), state.out_weight, state.out_bias)
    if out.exact is not None:
        result = result + F.linear(out.exact.flatten(-2).to(dtype), module.o_proj.weight)
    return result


# --- wiring -------------------------------------------------------------------------------------------------------
def _triton_ready(query: torch.Tensor, layer: SVDCacheLayer, rotary: nn.Module) -> bool:
    if query.device.type != "cuda" or query.shape[2] != 1 or not isinstance(layer.keys, torch.Tensor):
        return False
    if _dynamic_rope(rotary):
        return False
    from . import triton_decode

    return triton_decode.available()


def _cpu_kernel_ready(query: torch.Tensor, layer: SVDCacheLayer, state: _LayerState) -> bool:
    if query.device.type != "cpu" or query.shape[2] != 1:
        return False
    from . import cpu_decode

    num_heads, head_dim = query.shape[1], query.shape[3]
    return cpu_decode.supports(layer, head_dim, num_heads, state.value_center.shape[0]) and cpu_decode.available()


def use_latent_attention(module: nn.Module, cache: SVDCompressedCache, query_len: int) -> bool:
    """Whether this attention call can take the latent path: inference (no dropout), at most MAX_QUERY_LEN new tokens
    (if set), an `o_proj` that is a plain linear layer (its weight can be folded), a cache that is not offloaded layer by layer,
    and the eager or sdpa backend (whose 4-D masks this path reads; flash attention's masks are 2-D).
    The caller also keeps the reference path when attention weights are requested: this path never forms them."""
    return (
        not module.training
        and getattr(module.config, "_attn_implementation", None) in _MASK_BACKENDS
        and (MAX_QUERY_LEN is None or query_len <= MAX_QUERY_LEN)
        and isinstance(module.o_proj, nn.Linear)
        and module.o_proj.weight.is_floating_point()
        and not getattr(cache, "offloading", False)
    )


# (key rank, value rank, query heads) the Triton kernel could not be compiled for on this GPU.
_TRITON_TOO_LARGE: set[tuple[int, int, int]] = set()


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
    """Store the new tokens and return the attention module's output [batch, q, hidden] (o_proj included).

    query [batch, heads, q, d] after RoPE; key_states / value_states [batch, kv_heads, q, d] before RoPE, as
    `SVDCompressedCache.update` takes them; positions [batch, q]; the model's attention mask."""
    exact = layer.append(key_states, value_states, positions)
    state = _layer_state(module, layer)
    out = None
    kernel_shape = (layer.keys.shape[-1], layer.values.shape[-1], query.shape[1])
    if _triton_ready(query, layer, rotary) and kernel_shape not in _TRITON_TOO_LARGE:
        from triton.runtime.errors import OutOfResources

        from .triton_decode import triton_latent_attention

        try:
            out = triton_latent_attention(query, layer, state, rotary, scaling=module.scaling, attention_mask=attention_mask, exact=exact)
        except OutOfResources:
            # Large ranks (e.g. full rank) need more shared memory than the kernel's tiles fit on this GPU: the
            # torch path computes the same function.
            _TRITON_TOO_LARGE.add(kernel_shape)
    if out is None and _cpu_kernel_ready(query, layer, state):
        from . import cpu_decode

        rope = rope_factors(rotary, layer.positions, memo_key)

        def decode(one_query: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            return cpu_decode.decode_latents(one_query, layer, state, rope, module.scaling, valid)

        out = kernel_attention(decode, query, layer, state, rotary, scaling=module.scaling, attention_mask=attention_mask, exact=exact)
    if out is None:
        rope = rope_factors(rotary, layer.positions, memo_key)
        out = latent_attention(query, layer, state, rope, scaling=module.scaling, attention_mask=attention_mask, exact=exact)
    return project_output(module, state, out)
