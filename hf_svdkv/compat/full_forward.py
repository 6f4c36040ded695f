"""`LLaMAFullForward`: one forward pass of the whole model with a compressed (or full) KV cache."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..svd_cache import SVDCompressedCache
from ..tools.memory import cache_nbytes
from .decoder import input_device
from .model_loader import LLaMAModelLoader
from .patching import patched_for
from .profile_builder import LLaMACompressionProfileBuilder


class LLaMAFullForward:
    """Runs the model (embeddings, every layer, LM head) on token ids, filling an `SVDCompressedCache` or a
    `DynamicCache`. Gradients are off (inference).

    Args:
        model_loader: the model (default: `LLaMAModelLoader()` from the environment).
        profile_builder: the compression bases (default: the core's `med` profile).
        profile: which of the builder's profiles to use (default: the builder's default).
    """

    def __init__(
        self,
        model_loader: LLaMAModelLoader | None = None,
        profile_builder: LLaMACompressionProfileBuilder | None = None,
        profile: str | None = None,
    ):
        self.model_loader = model_loader or LLaMAModelLoader()
        self.profile_builder = profile_builder or LLaMACompressionProfileBuilder(self.model_loader)
        self.profile = profile

    def token_ids(self, input_ids: torch.Tensor | list[int] | str) -> torch.Tensor:
        """[batch, seq] ids from a tensor ([seq] or [batch, seq]), a list of ids or a string (tokenized)."""
        if isinstance(input_ids, str):
            input_ids = self.model_loader.tokenizer(input_ids, return_tensors="pt")["input_ids"]
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [seq] or [batch, seq], got shape {tuple(ids.shape)}")
        if ids.shape[1] == 0:
            raise ValueError("input_ids has no tokens: give at least one")
        return ids

    def forward(
        self,
        input_ids: torch.Tensor | list[int] | str,
        use_compression: bool = True,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Logits [batch, seq, vocab] and the filled cache (``outputs.past_key_values``; pass it back to continue)."""
        model = self.model_loader.model
        ids = self.token_ids(input_ids)
        if use_compression:
            if past_key_values is not None and not isinstance(past_key_values, SVDCompressedCache):
                raise ValueError(
                    f"use_compression=True continues an SVDCompressedCache, got a {type(past_key_values).__name__}"
                )
            bases = self.profile_builder.bases(self.profile)
            # exact_prefill=False: the seed's compressed forward attends over the compressed keys and values, prompt
            # included (what it measures is the compression, see compare()).
            cache = (
                past_key_values if past_key_values is not None else SVDCompressedCache(bases=bases, exact_prefill=False)
            )
            context = patched_for(model, cache.bases)
        else:
            if isinstance(past_key_values, SVDCompressedCache):
                raise ValueError("use_compression=False cannot continue an SVDCompressedCache")
            cache = past_key_values if past_key_values is not None else DynamicCache(config=model.config)
            context = nullcontext()
        device = input_device(model)
        if device is not None:
            ids = ids.to(device)
            attention_mask = attention_mask.to(device) if attention_mask is not None else None
        with torch.no_grad(), context:
            return model(ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)

    __call__ = forward

    def compare(self, input_ids: torch.Tensor | list[int] | str) -> dict[str, float]:
        """The same ids with and without compression: next-token agreement, logit error and cache bytes."""
        full = self.forward(input_ids, use_compression=False)
        compressed = self.forward(input_ids, use_compression=True)
        a, b = full.logits.float(), compressed.logits.float()
        full_bytes, compressed_bytes = cache_nbytes(full.past_key_values), cache_nbytes(compressed.past_key_values)
        return {
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "max_abs_logit_diff": (a - b).abs().max().item(),
            "relative_logit_error": ((a - b).norm() / a.norm()).item(),
            "kv_bytes_full": full_bytes,
            "kv_bytes_compressed": compressed_bytes,
            "memory_savings": 1 - compressed_bytes / full_bytes,
        }
