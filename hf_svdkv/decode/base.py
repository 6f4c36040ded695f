"""The interface every way of attending over a layer's latents implements (kvpress's `presses/`: one small class per
idea, a shared base). `decode.BACKENDS` lists them in order of preference; the first that supports a call serves it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..svd_cache import ExactTokens, SVDCacheLayer
from .rope import Rope
from .state import LatentAttentionOutput, LayerState
from .window import attend_window


class Unsupported(Exception):
    """Raised by `attend` when a backend finds, running, that it cannot serve this call (the next one then does)."""


class DecodeBackend(ABC):
    """Attention of new query tokens over the tokens a layer holds as latents; the exact copies (window, sinks) are
    merged in by `attend_window` unless the backend scores them itself (`attend_with_exact`)."""

    name: str

    @abstractmethod
    def supports(self, query: torch.Tensor, layer: SVDCacheLayer, state: LayerState, rope: Rope) -> bool:
        """Whether this backend can serve this call (device, query length, latent format, shapes)."""

    @abstractmethod
    def attend(
        self,
        query: torch.Tensor,
        layer: SVDCacheLayer,
        state: LayerState,
        rope: Rope,
        *,
        scaling: float,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of `query` [batch, heads, q, d] (after RoPE, the new tokens already stored) over the latent
        tokens each query reads (`window.block_mask`): the output over value latents [batch, q, heads, value_rank],
        normalised over those tokens, and its natural-log log-sum-exp [batch, heads, q] (-inf where a query reads
        none)."""

    def attend_with_exact(
        self,
        query: torch.Tensor,
        layer: SVDCacheLayer,
        state: LayerState,
        rope: Rope,
        exact: ExactTokens | None,
        *,
        scaling: float,
        attention_mask: torch.Tensor | None,
    ) -> LatentAttentionOutput:
        """`attend`, then the exact copies `exact` (as `SVDCacheLayer.append` returned them) merged in: one softmax
        over every token each query reads. A backend that scores the exact copies in the same pass overrides this."""
        latent, lse = self.attend(query, layer, state, rope, scaling=scaling, attention_mask=attention_mask)
        return attend_window(
            query, latent, lse, layer, state, rope, exact, scaling=scaling, attention_mask=attention_mask
        )
