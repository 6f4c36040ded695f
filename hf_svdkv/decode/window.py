"""Which copy of each token a query reads, and the one merge step that adds the full-precision copies.

A query reads a token's exact copy if the token is a sink (among its row's first `sinks`) or less than `window` tokens
old, its latent otherwise (the reference path's `attention.window_mask` says the same with one dense mask). Backends
attend over the latent tokens only and return the log-sum-exp of their scores; `attend_window` scores the exact copies
(a few tokens) and merges the two softmaxes through it, for any number of queries.
"""

from __future__ import annotations

import math

import torch

from ..svd_cache import ExactTokens, SVDCacheLayer
from .rope import Rope, interleave, rotate
from .state import LatentAttentionOutput, LayerState

# Elements (float32) of the largest transient of attention over a layer (a block's rebuilt keys or scores in
# `blockwise`, a span of queries' scores against the exact copies here): 8 MB, so the transient stays far below the
# cache it reads (the whole 8k-token context of the default model at batch 1), while each op is large enough that
# per-op overhead does not dominate on CPU. Read at call time, so tests can lower it.
CHUNK_ELEMENTS = 1 << 21


def _model_mask(mask: torch.Tensor | None, total: int, columns: slice | torch.Tensor) -> torch.Tensor | None:
    """The model's mask (None, 4-D bool, or eager's additive float: padding, causality, a sliding window) as bool, for
    the token `columns` only (a mask may cover more columns than there are tokens: the last ones count)."""
    if mask is None:
        return None
    offset = mask.shape[-1] - total
    if isinstance(columns, slice):
        mask = mask[..., offset + columns.start : offset + columns.stop]
    else:
        mask = mask.index_select(-1, columns + offset)
    return mask if mask.dtype == torch.bool else mask == 0


def block_mask(
    mask: torch.Tensor | None,
    query_len: int,
    total: int,
    start: int,
    end: int,
    window: int,
    device: torch.device,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Which of the tokens [start, end) each of the last `query_len` of `total` tokens reads as latents: [batch or 1,
    1, q, end - start] bool, or None when every query reads every one of them. `sinks` [batch, end - start] flags the
    tokens read from their exact sink copy instead (`sink_flags`). Only this block's slice of anything is built."""
    allowed = _model_mask(mask, total, slice(start, end))
    first_query = total - query_len
    # Ages range over [first_query - (end - 1), total - 1 - start]: the rule only bites where that range goes below
    # the window, or where the block holds sinks.
    if first_query - (end - 1) < window:
        age = torch.arange(first_query, total, device=device)[:, None] - torch.arange(start, end, device=device)
        allowed = (age >= window)[None, None] if allowed is None else allowed & (age >= window)
    if sinks is not None:
        allowed = ~sinks[:, None, None] if allowed is None else allowed & ~sinks[:, None, None]
    return allowed


def sink_flags(layer: SVDCacheLayer, start: int, end: int) -> torch.Tensor | None:
    """Which of the tokens [start, end) are sinks, per row [batch, end - start], or None when none of them is."""
    if start >= layer.sink_keys.shape[-2]:
        return None
    return layer.sink_flags(torch.arange(start, end, device=layer.positions.device))


def exact_mask(
    mask: torch.Tensor | None, query_len: int, total: int, exact: ExactTokens, window: int, sinks: torch.Tensor | None
) -> torch.Tensor:
    """Which of the exact copies of tokens `exact.index` [n] each query reads: [batch or 1, 1, q, n] bool. A copy is
    read while its token is less than `window` old, or for good when `sinks` [batch, n] flags it a sink."""
    index = exact.index
    age = torch.arange(total - query_len, total, device=index.device)[:, None] - index[None, :]
    rule = ((age >= 0) & (age < window))[None, None]
    if sinks is not None:
        rule = rule | ((age >= 0)[None, None] & sinks[:, None, None])
    allowed = _model_mask(mask, total, index)
    return rule if allowed is None else allowed & rule


def attend_window(
    query: torch.Tensor,
    latent: torch.Tensor,
    lse: torch.Tensor,
    layer: SVDCacheLayer,
    state: LayerState,
    rope: Rope,
    exact: ExactTokens | None,
    *,
    scaling: float,
    attention_mask: torch.Tensor | None,
) -> LatentAttentionOutput:
    """Merge a backend's attention over the latent tokens (`latent` [batch, q, heads, value_rank], normalised, and its
    log-sum-exp `lse` [batch, heads, q]) with the exact copies `exact` (the sinks and the window's tail, as
    `SVDCacheLayer.append` returned them): one softmax over both, as if scored together."""
    if exact is None:
        return LatentAttentionOutput(latent)
    batch, num_heads, query_len, head_dim = query.shape
    num_kv_heads = state.num_kv_heads
    count, total = exact.index.numel(), layer.get_seq_length()
    keys = rotate(interleave(exact.keys.float()), rope.at(exact.index)[:, None])
    values = exact.values.float() - state.value_center[:, None, :]
    allowed = exact_mask(attention_mask, query_len, total, exact, layer.window, layer.sink_flags(exact.index))
    # A prompt continued in chunks brings every new token as an exact copy: its [queries x copies] scores are taken a
    # span of queries at a time, so the transient stays within CHUNK_ELEMENTS.
    span = max(1, CHUNK_ELEMENTS // (batch * num_heads * count))
    spans = [slice(first, first + span) for first in range(0, query_len, span)]
    latents, outputs = zip(
        *(
            _merge_exact(
                query[:, :, q], latent[:, q], lse[..., q], keys, values, allowed[..., q, :], num_kv_heads, scaling
            )
            for q in spans
        ),
        strict=True,
    )
    latent, exact_out = torch.cat(latents, dim=1), torch.cat(outputs, dim=1)
    return LatentAttentionOutput(latent, exact_out)


def _merge_exact(
    query: torch.Tensor,
    latent: torch.Tensor,
    lse: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: torch.Tensor,
    num_kv_heads: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend_window` for a span of queries: (latent part rescaled, exact part [batch, q, heads, head_dim])."""
    batch, num_heads, query_len, head_dim = query.shape
    rows, count = num_heads // num_kv_heads * query_len, keys.shape[-2]
    queries = interleave(query.float() * scaling).reshape(batch, num_kv_heads, rows, head_dim)
    scores = torch.matmul(queries, keys.mT)  # [batch, kv_heads, rows, n]
    scores = scores.view(batch, num_kv_heads, -1, query_len, count).masked_fill_(~allowed[:, :, None], -math.inf)
    scores = scores.view(batch, num_kv_heads, rows, count)
    both = torch.logaddexp(lse.reshape(batch, num_kv_heads, rows), torch.logsumexp(scores, dim=-1))
    # A query that reads nothing at all (a padding position) gets zeros, not NaN.
    both = torch.where(both == -math.inf, 0.0, both)
    share = torch.exp(lse - both.view(batch, num_heads, query_len))  # of the latent part in the merged softmax
    latent = latent * share.transpose(1, 2)[..., None]
    weights = scores.sub_(both[..., None]).exp_()
    exact_out = torch.matmul(weights, values)  # [batch, kv, rows, d]
    return latent, exact_out.view(batch, num_heads, query_len, head_dim).transpose(1, 2)


def valid_latent_tokens(mask: torch.Tensor | None, layer: SVDCacheLayer) -> torch.Tensor | None:
    """For one query token: which latent tokens it reads [batch, latent tokens] uint8 (padding and sinks hidden), or
    None when it reads them all."""
    total = layer.get_seq_length()
    latent_len = layer.keys.length
    allowed = block_mask(mask, 1, total, 0, latent_len, layer.window, layer.device, sink_flags(layer, 0, latent_len))
    return None if allowed is None else allowed[:, 0, 0].to(torch.uint8)
