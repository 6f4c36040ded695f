"""Which copy of each token a query reads, and the one merge step that adds the full-precision window.

With a window W, a query reads a token's exact copy while it is less than W tokens old and its latent afterwards (the
reference path's `attention.window_mask` says the same with one dense mask). Backends attend over the latent tokens
only and return the log-sum-exp of their scores; `attend_window` scores the exact copies (a few tokens) and merges the
two softmaxes through it, for any number of queries.
"""

from __future__ import annotations

import math

import torch

from ..svd_cache import SVDCacheLayer
from .rope import Rope, interleave, rotate
from .state import LatentAttentionOutput, LayerState


def block_mask(
    mask: torch.Tensor | None,
    query_len: int,
    total: int,
    start: int,
    end: int,
    window: int,
    exact: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """Which of the tokens [start, end) each of the last `query_len` of `total` tokens reads as latents (`exact`
    False) or as exact copies (True): [batch or 1, 1, q, end - start] bool, or None when every query reads every one
    of them. The model's mask (None, 4-D bool, or eager's additive float: padding, causality, a sliding window)
    applies to both. Only this block's slice of anything is built."""
    allowed = None
    if mask is not None:
        offset = mask.shape[-1] - total  # a mask may cover more columns than there are tokens: the last ones count
        mask = mask[..., offset + start : offset + end]
        allowed = mask if mask.dtype == torch.bool else mask == 0
    first_query = total - query_len
    # Ages range over [first_query - (end - 1), total - 1 - start]: the rule only bites where that range crosses its
    # threshold (window for latents; 0 and window for exact copies).
    oldest, youngest = total - 1 - start, first_query - (end - 1)
    if youngest < window if not exact else (youngest < 0 or oldest >= window):
        age = (
            torch.arange(first_query, total, device=device)[:, None] - torch.arange(start, end, device=device)[None, :]
        )
        rule = (age >= 0) & (age < window) if exact else age >= window
        allowed = rule[None, None] if allowed is None else allowed & rule
    return allowed


def attend_window(
    query: torch.Tensor,
    latent: torch.Tensor,
    lse: torch.Tensor,
    layer: SVDCacheLayer,
    state: LayerState,
    rope: Rope,
    exact: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    scaling: float,
    attention_mask: torch.Tensor | None,
) -> LatentAttentionOutput:
    """Merge a backend's attention over the latent tokens (`latent` [batch, q, heads, value_rank], normalised, and its
    log-sum-exp `lse` [batch, heads, q]) with the exact window tail `exact` (pre-RoPE keys, values [batch, kv_heads,
    E, d], as `SVDCacheLayer.append` returned it): one softmax over both, as if scored together."""
    if exact is None or not exact[0].shape[-2]:
        return LatentAttentionOutput(latent)
    batch, num_heads, query_len, head_dim = query.shape
    num_kv_heads = state.num_kv_heads
    rows = num_heads // num_kv_heads * query_len
    exact_len, total = exact[0].shape[-2], layer.get_seq_length()
    queries = interleave(query.float() * scaling).reshape(batch, num_kv_heads, rows, head_dim)
    keys = rotate(interleave(exact[0].float()), rope.tail(exact_len)[:, None])
    scores = torch.matmul(queries, keys.mT)  # [batch, kv_heads, rows, E]
    allowed = block_mask(attention_mask, query_len, total, total - exact_len, total, layer.window, True, query.device)
    if allowed is not None:
        scores = scores.view(batch, num_kv_heads, -1, query_len, exact_len).masked_fill(~allowed[:, :, None], -math.inf)
        scores = scores.view(batch, num_kv_heads, rows, exact_len)
    both = torch.logaddexp(lse.reshape(batch, num_kv_heads, rows), torch.logsumexp(scores, dim=-1))
    # A query that reads nothing at all (a padding position) gets zeros, not NaN.
    both = torch.where(both == -math.inf, 0.0, both)
    share = torch.exp(lse - both.view(batch, num_heads, query_len))  # of the latent part in the merged softmax
    latent = latent * share.transpose(1, 2)[..., None]
    weights = torch.exp(scores - both[..., None])
    exact_out = torch.matmul(weights, exact[1].float() - state.value_center[:, None, :])  # [batch, kv, rows, d]
    return LatentAttentionOutput(latent, exact_out.view(batch, num_heads, query_len, head_dim).transpose(1, 2))


def valid_latent_tokens(mask: torch.Tensor | None, layer: SVDCacheLayer) -> torch.Tensor | None:
    """For one query token: which latent tokens it reads [batch, latent tokens] uint8 (padding hidden), or None."""
    allowed = block_mask(mask, 1, layer.get_seq_length(), 0, layer.keys.length, layer.window, False, layer.device)
    return None if allowed is None else allowed[:, 0, 0].to(torch.uint8)
