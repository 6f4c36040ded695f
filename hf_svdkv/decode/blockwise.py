"""The torch backend: attention over a layer's latent tokens a block at a time, for any number of queries.

Per block of stored tokens: rebuild its keys from their latents, rotate them at their positions (RoPE does not
commute with the projection), score them against every query head that reads them, and fold the block into a running
softmax over the *value latents* (flash-style). No layer's keys or values ever exist at full size, no [query x tokens]
mask is built, and the transient stays below `window.CHUNK_ELEMENTS` for any length of the input or of the cache. It
serves every call the kernels do not: prompts continued in chunks, teacher-forced continuations, decoding where no
kernel applies (no compiler, float16 latents, a dynamic rope type on CUDA).
"""

from __future__ import annotations

import math
import threading

import torch

from ..svd_cache import SVDCacheLayer
from . import window
from .base import DecodeBackend
from .rope import Rope, interleave, rotate
from .state import LayerState
from .window import block_mask, sink_flags

_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of `shape`, reusing one buffer per name (per thread) on CPU: a large temporary
    allocated afresh on every call is mapped afresh too, and its page faults cost more than the work done in it.
    The buffer is bounded by window.CHUNK_ELEMENTS; CUDA's caching allocator already reuses memory."""
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


def blockwise_attention(
    query: torch.Tensor,
    layer: SVDCacheLayer,
    state: LayerState,
    rope: torch.Tensor,
    *,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`DecodeBackend.attend` in torch: query [batch, heads, q, d] (after RoPE) over the layer's latent tokens;
    `rope` = the factors of `layer.positions`. Returns (output over value latents [batch, q, heads, value_rank],
    log-sum-exp [batch, heads, q]). Scores and softmax in float32."""
    batch, num_heads, query_len, head_dim = query.shape
    num_kv_heads = state.num_kv_heads
    per_kv = num_heads // num_kv_heads
    rows = per_kv * query_len
    chunk_size = chunk_size or max(16, window.CHUNK_ELEMENTS // (batch * num_kv_heads * max(head_dim, rows)))
    total, latent_len = layer.get_seq_length(), layer.keys.length
    device = query.device
    # [batch, kv_heads, heads per kv head * q, d]: every query head reading a KV head scores its keys in one matmul.
    queries = interleave(query.float() * scaling).reshape(batch, num_kv_heads, rows, head_dim)

    dtype = state.key_weight.dtype
    key_groups, width = state.key_weight.shape[:2]
    per_group = width // head_dim  # KV heads sharing one key basis
    value_groups = layer.projection.value.num_groups
    # The running softmax: max and sum per query row, and the output over value latents (rows grouped by value basis).
    running_max = queries.new_full((batch, num_kv_heads, rows), -math.inf)
    running_sum = queries.new_zeros((batch, num_kv_heads, rows))
    latent = queries.new_zeros((batch, value_groups, num_kv_heads // value_groups * rows, layer.projection.value.rank))

    # No latent token younger than the window is ever read as a latent: those blocks are skipped.
    for start in range(0, min(latent_len, total - layer.window), chunk_size):
        end = min(start + chunk_size, latent_len)
        size = end - start
        rebuilt = _scratch("rebuilt", (batch, key_groups, size, width), dtype, device)
        torch.matmul(layer.keys.read(start, end, dtype), state.key_weight.mT, out=rebuilt)
        if dtype == torch.float32 and per_group == 1:
            keys = rebuilt
        else:  # float32 and head-major [batch, kv_heads, chunk, d]: one pass converts and splits each group's heads
            keys = _scratch("keys", (batch, num_kv_heads, size, head_dim), torch.float32, device)
            grouped = rebuilt.view(batch, key_groups, size, per_group, head_dim).transpose(2, 3)
            keys.view(batch, key_groups, per_group, size, head_dim).copy_(grouped)
        if state.key_bias is not None:
            keys += state.key_bias.view(num_kv_heads, 1, head_dim)
        rotate(keys, rope[:, None, start:end])
        scores = torch.matmul(queries, keys.mT)  # [batch, kv_heads, heads per kv * q, chunk]
        sinks = sink_flags(layer, start, end)
        allowed = block_mask(attention_mask, query_len, total, start, end, layer.window, device, sinks)
        if allowed is not None:
            # [batch, kv_heads, per_kv, q, n]: masks are per (batch, query token), shared by a KV head's query heads.
            scores = scores.view(batch, num_kv_heads, per_kv, query_len, size).masked_fill(
                ~allowed[:, :, None], -math.inf
            )
            scores = scores.view(batch, num_kv_heads, rows, size)
        new_max = torch.maximum(running_max, scores.amax(-1))
        # A row that has read nothing yet keeps max -inf: shift by 0 there, so exp gives 0 rather than NaN.
        shift = torch.where(new_max == -math.inf, 0.0, new_max)
        weights = torch.exp(scores - shift[..., None])
        rescale = torch.exp(running_max - shift)
        running_sum.mul_(rescale).add_(weights.sum(-1))
        latent.mul_(rescale.view(batch, value_groups, -1, 1))
        running_max = new_max
        # Rows of a value group: its KV heads' query heads and query tokens.
        grouped_weights = weights.view(batch, value_groups, -1, size).to(dtype)
        latent.add_(torch.matmul(grouped_weights, layer.values.read(start, end, dtype)).float())

    # A query that reads nothing (a padding position) gets zeros and a log-sum-exp of -inf, not NaN.
    latent.div_(torch.where(running_sum > 0, running_sum, 1.0).view(batch, value_groups, -1, 1))
    lse = running_max + running_sum.log()
    # [batch, value_groups, kv heads per group * per_kv * q, rank] -> [batch, q, heads, rank]
    latent = latent.reshape(batch, num_heads, query_len, -1).transpose(1, 2)
    return latent, lse.view(batch, num_heads, query_len)


class BlockwiseBackend(DecodeBackend):
    """Every call, any device, any latent format (`blockwise_attention`)."""

    name = "torch"

    def supports(self, query: torch.Tensor, layer: SVDCacheLayer, state: LayerState, rope: Rope) -> bool:
        return True

    def attend(self, query, layer, state, rope, *, scaling, attention_mask):
        return blockwise_attention(query, layer, state, rope.factors, scaling=scaling, attention_mask=attention_mask)
