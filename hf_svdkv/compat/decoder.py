"""`CompressedAutoregressiveDecoder`: text in, text out, through `generate()` with a compressed (or full) KV cache."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..svd_cache import SVDCompressedCache
from ..tools.memory import cache_nbytes
from .inference_config import InferenceConfig
from .model_loader import LLaMAModelLoader
from .patching import patched_for
from .profile_builder import LLaMACompressionProfileBuilder


@dataclass
class GenerationResult:
    """One prompt's generation. `tokens` are the new token ids (up to, not including, an end-of-sequence token)."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    compressed: bool
    kv_cache_bytes: int  # the cache's bytes at the end, this row's share of the batch
    kv_bytes_per_token: float
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def input_device(model: torch.nn.Module) -> torch.device | None:
    """Where inputs go: the model's device, or None under an accelerate device map (its hooks move them)."""
    return None if getattr(model, "hf_device_map", None) else model.device


class CompressedAutoregressiveDecoder:
    """Generates from text prompts with `InferenceConfig`'s settings.

    Args:
        inference_config: lengths and sampling (default: `InferenceConfig()`).
        model_loader: the model (default: a `LLaMAModelLoader` for ``inference_config.model_config``).
        profile_builder: the compression bases (default: a builder for ``inference_config.compression_config``).
        profile: which of the builder's profiles to use (default: the builder's default).
    """

    def __init__(
        self,
        inference_config: InferenceConfig | None = None,
        model_loader: LLaMAModelLoader | None = None,
        profile_builder: LLaMACompressionProfileBuilder | None = None,
        profile: str | None = None,
    ):
        self.config = inference_config or InferenceConfig()
        self.model_loader = model_loader or LLaMAModelLoader(self.config.model_config)
        self.profile_builder = profile_builder or LLaMACompressionProfileBuilder(
            self.model_loader, self.config.compression_config
        )
        self.profile = profile

    def generate(
        self,
        prompt: str | list[str],
        max_length: int | None = None,
        use_compression: bool = True,
        *,
        max_new_tokens: int | None = None,
    ) -> GenerationResult | list[GenerationResult]:
        """Continue `prompt` (a string, or a list of them) up to `max_length` tokens in all (prompt included; default
        `max_sequence_length`), or by `max_new_tokens`. One result per prompt. An empty prompt starts from BOS."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if max_length is not None and max_length > self.config.max_sequence_length:
            raise ValueError(
                f"max_length {max_length} exceeds InferenceConfig.max_sequence_length {self.config.max_sequence_length}"
            )
        size = self.config.batch_size
        results = []
        for start in range(0, len(prompts), size):
            results.extend(
                self._generate_batch(prompts[start : start + size], max_length, max_new_tokens, use_compression)
            )
        return results[0] if isinstance(prompt, str) else results

    def _generate_batch(
        self, prompts: list[str], max_length: int | None, max_new_tokens: int | None, use_compression: bool
    ) -> list[GenerationResult]:
        model, tokenizer = self.model_loader.model, self.model_loader.tokenizer
        rows = tokenizer(prompts)["input_ids"]
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.generation_config.bos_token_id
        for i, row in enumerate(rows):
            if not row:  # an empty prompt: start from the BOS token, as generate() does without input
                if bos is None:
                    raise ValueError(
                        f"prompt {i} is empty and the model has no BOS token to start from: give some text"
                    )
                rows[i] = [bos]
        side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoder-only models pad on the left
        try:
            encoded = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = side
        prompt_len = encoded["input_ids"].shape[1]
        limit = (
            prompt_len + max_new_tokens if max_new_tokens is not None else max_length or self.config.max_sequence_length
        )
        if limit > self.config.max_sequence_length:
            raise ValueError(
                f"the prompt ({prompt_len} tokens) plus max_new_tokens={max_new_tokens} exceeds "
                f"InferenceConfig.max_sequence_length {self.config.max_sequence_length}"
            )
        if prompt_len >= limit:
            raise ValueError(f"the prompt is {prompt_len} tokens: max_length {limit} leaves no room to generate")

        if use_compression:
            bases = self.profile_builder.bases(self.profile)
            cache, context = SVDCompressedCache(bases=bases), patched_for(model, bases)
        else:
            cache, context = DynamicCache(config=model.config), nullcontext()
        sampling = {"do_sample": False}
        if self.config.do_sample:
            sampling = {"do_sample": True, "temperature": self.config.temperature, "top_p": self.config.top_p}
            if self.config.seed is not None:
                torch.manual_seed(self.config.seed)
        device = input_device(model)
        inputs = {k: v.to(device) if device is not None else v for k, v in encoded.items()}
        start = time.perf_counter()
        with torch.inference_mode(), context:
            output = model.generate(
                **inputs, max_length=limit, past_key_values=cache, pad_token_id=tokenizer.pad_token_id, **sampling
            )
        seconds = time.perf_counter() - start

        rows = output.shape[0]
        nbytes = cache_nbytes(cache)
        per_token = nbytes / (rows * cache.get_seq_length()) if cache.get_seq_length() else 0.0
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        results = []
        for row in output[:, prompt_len:].tolist():
            end = next((i for i, t in enumerate(row) if t in eos), len(row))
            tokens = row[:end]
            results.append(
                GenerationResult(
                    text=tokenizer.decode(tokens, skip_special_tokens=True),
                    tokens=tokens,
                    prompt_tokens=prompt_len,
                    compressed=use_compression,
                    kv_cache_bytes=nbytes // rows,
                    kv_bytes_per_token=per_token,
                    seconds=seconds,
                )
            )
        return results
