"""Attention of new tokens over an `SVDCacheLayer`'s latents: the same function as the reference path of
`attention.py`, without rebuilding the cache at full size.

Backends (`base.DecodeBackend`) attend over the tokens held as latents; `window.attend_window` merges the
full-precision copies (the window, the sinks) through the log-sum-exp, unless the backend scores them in its own
softmax (the C++ kernel does); `state` projects the output over value latents
up (folded into `o_proj` where that pays). BACKENDS is the one place where one is chosen: the first that supports a
call serves it. Kernels serve single-token steps (Triton's on CUDA, the C++ one on CPU); the blockwise torch path
serves every call. A new backend is a new class in this folder and an entry in BACKENDS.
"""

from __future__ import annotations

import math

import torch

from ..svd_cache import ExactTokens, SVDCacheLayer
from .base import DecodeBackend, Unsupported
from .blockwise import BlockwiseBackend
from .cpu import CpuKernelBackend
from .rope import Rope
from .state import LatentAttentionOutput, LayerState, fold_value_up_into_o_proj, layer_state, project_output
from .triton_kernel import TritonBackend
from .window import attend_window

BACKENDS: list[DecodeBackend] = [TritonBackend(), CpuKernelBackend(), BlockwiseBackend()]

__all__ = [
    "BACKENDS",
    "DecodeBackend",
    "LatentAttentionOutput",
    "LayerState",
    "Rope",
    "attend",
    "fold_value_up_into_o_proj",
    "layer_state",
    "project_output",
]


def attend(
    query: torch.Tensor,
    layer: SVDCacheLayer,
    state: LayerState,
    rope: Rope,
    exact: ExactTokens | None,
    *,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
) -> LatentAttentionOutput:
    """Attention of `query` [batch, heads, q, d] (after RoPE) over a layer that already holds the new tokens
    (`SVDCacheLayer.append`, which returned its exact copies `exact`): through the first backend that supports the
    call, the window merged in."""
    batch, num_heads, query_len, _ = query.shape
    if not layer.keys.length:  # every token still in the window
        latent = query.new_zeros((batch, query_len, num_heads, layer.values.rank), dtype=torch.float32)
        lse = query.new_full((batch, num_heads, query_len), -math.inf, dtype=torch.float32)
        return attend_window(
            query, latent, lse, layer, state, rope, exact, scaling=scaling, attention_mask=attention_mask
        )
    for backend in BACKENDS:
        if backend.supports(query, layer, state, rope):
            try:
                return backend.attend_with_exact(
                    query, layer, state, rope, exact, scaling=scaling, attention_mask=attention_mask
                )
            except Unsupported:
                continue
    raise RuntimeError("hf_svdkv: no decode backend supports this call (the blockwise backend serves every call)")
