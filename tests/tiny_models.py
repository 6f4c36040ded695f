"""Tiny random Llama-family models built from configs: no download, seconds to build."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_svdkv import CompressionConfig

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
VOCAB = 96


def tiny_model(
    arch: str = "llama",
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    num_layers: int = 2,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    config_cls, model_cls = ARCHITECTURES[arch]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=num_heads * head_dim,
        intermediate_size=2 * num_heads * head_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        # Larger than the default 0.02 so attention is peaked and key errors show in the logits.
        initializer_range=0.08,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for linear in (attn.k_proj, attn.v_proj):
                _decay_spectrum(linear.weight)
                if linear.bias is not None:  # Qwen2: nonzero biases, so the basis center is exercised
                    linear.bias.normal_(0.0, 0.5)
    model = model.to(dtype)
    model.generation_config.pad_token_id = 0
    return model


def _decay_spectrum(weight: torch.Tensor) -> None:
    """Give W a geometrically decaying spectrum, as trained k/v projections have, so rank matters."""
    left, _, right = torch.linalg.svd(weight, full_matrices=False)
    singular = 3.0 * 0.85 ** torch.arange(left.shape[1], dtype=weight.dtype)
    weight.copy_(left @ torch.diag(singular) @ right)


def structured_ids(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A repeating motif with a little variation: text-like redundancy a random-noise prompt lacks."""
    generator = torch.Generator().manual_seed(seed)
    motif = torch.randint(3, VOCAB, (batch, 7), generator=generator)
    ids = motif.repeat(1, length // 7 + 1)[:, :length].clone()
    flips = torch.rand(ids.shape, generator=generator) < 0.1
    ids[flips] = torch.randint(3, VOCAB, (int(flips.sum()),), generator=generator)
    return ids


def assert_left_padded_rows_equal_single_runs(model, lengths: tuple[int, ...], new_tokens: int) -> object:
    """Generate greedily for prompts of `lengths` as one left-padded batch and one by one: tokens identical, logits
    within 1e-4. Returns the batched generation output (for checks on its cache)."""
    prompts = [structured_ids(n, seed=n)[0] for n in lengths]
    ids, mask = left_padded(lengths)
    width = ids.shape[1]
    with torch.no_grad():
        batched = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
        for row, prompt in enumerate(prompts):
            single = model.generate(
                prompt[None],
                max_new_tokens=new_tokens,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
            assert torch.equal(batched.sequences[row, width:], single.sequences[0, len(prompt) :])
            for got, ref in zip(batched.logits, single.logits, strict=True):
                torch.testing.assert_close(got[row], ref[0], atol=1e-4, rtol=0)
    return batched


def weights_config(**fields) -> CompressionConfig:
    """A config with data-free (weight-only) bases and, unless given, no window, no sinks and no exact prefill: a tiny
    random model has no text to calibrate on, and most cases here test the latents themselves (a prompt read back from
    its latents, so that one forward equals token-by-token decoding)."""
    return CompressionConfig(**{"method": "weights", "window": 0, "sinks": 0, "exact_prefill": False, **fields})


@dataclass(frozen=True)
class CacheVariant:
    """One way of storing a cache, on a tiny model: the rows of the invariant table (tests/test_invariants.py)."""

    arch: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    key_rank: int
    value_rank: int
    group_size: int = 1
    window: int = 0
    latent_bits: int | str | None = None
    exact_prefill: bool = False
    sinks: int = 0
    target_ratio: float | None = None  # instead of the ranks (mixed-precision latents are allocated under a ratio)

    def model(self, attn_implementation: str = "sdpa", full_rank: bool = False, dtype: torch.dtype = torch.float32):
        """A tiny model of this geometry, patched with weight-only bases of this variant (all of head_dim with
        `full_rank`)."""
        from hf_svdkv import patch_model

        model = tiny_model(
            self.arch,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            attn_implementation=attn_implementation,
            dtype=dtype,
        )
        ranks = (self.head_dim, self.head_dim) if full_rank else (self.key_rank, self.value_rank)
        shape = (
            {"target_ratio": self.target_ratio} if self.target_ratio else {"key_rank": ranks[0], "value_rank": ranks[1]}
        )
        return patch_model(
            model,
            weights_config(
                **shape,
                group_size=self.group_size,
                window=self.window,
                latent_bits=self.latent_bits,
                exact_prefill=self.exact_prefill,
                sinks=self.sinks,
            ),
        )


# Every way a cache is stored: geometry (MHA, GQA, joint bases, head sizes), architecture (Qwen2's k/v biases, Mistral),
# the full-precision window, attention sinks, integer latents, a prompt attended exactly. A new storage format is a new
# row here; every invariant then runs on it.
CACHE_VARIANTS = {
    "plain-mha": CacheVariant("llama", 4, 4, 32, 12, 10),
    "gqa": CacheVariant("llama", 4, 2, 32, 9, 7),
    "joint-mistral": CacheVariant("mistral", 6, 3, 32, 20, 30, group_size=3),
    "d64": CacheVariant("llama", 6, 2, 64, 24, 16),
    "window": CacheVariant("llama", 4, 2, 32, 12, 12, window=5),
    "qwen2-bias-window": CacheVariant("qwen2", 4, 2, 32, 16, 12, group_size=2, window=4),
    "int8": CacheVariant("llama", 4, 2, 32, 12, 12, window=3, latent_bits=8),
    "int4-window": CacheVariant("llama", 4, 2, 32, 16, 16, group_size=2, window=8, latent_bits=4),
    "exact-prefill": CacheVariant("llama", 4, 2, 32, 12, 12, window=6, exact_prefill=True),
    "sinks-window": CacheVariant("llama", 4, 2, 32, 12, 12, window=5, sinks=4),
    "sinks-int4": CacheVariant("llama", 4, 2, 32, 16, 16, group_size=2, latent_bits=4, sinks=3),
    "mixed-window": CacheVariant(
        "llama", 4, 2, 32, 0, 0, group_size=2, window=4, latent_bits="mixed", target_ratio=3.0
    ),
}


def left_padded(lengths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of prompts of `lengths`, left-padded to the longest."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :], mask[row, width - length :] = structured_ids(length, seed=length)[0], 1
    return ids, mask
