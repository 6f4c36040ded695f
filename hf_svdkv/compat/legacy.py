"""`LegacyCompressionWrapper`: the pre-refactor `LLaMACompressionProfiles` API over a profile builder."""

from __future__ import annotations

from typing import Any

import torch

from .config import CompressionConfig
from .model_loader import LLaMAModelLoader
from .profile_builder import LLaMACompressionProfileBuilder

# The legacy class's fixed ranks (per KV head).
LEGACY_VALUE_RANKS = {"low": 32, "med": 48, "high": 64}
LEGACY_KEY_RANK = 32


class LegacyCompressionWrapper:
    """Old attribute and method names (`compress_values(values, profile_name, head_idx)`, `compress_keys`,
    `reconstruct_keys`, `get_compression_stats`, `profiles`, `hidden_size`, ...) delegating to a
    `LLaMACompressionProfileBuilder`.

    Args:
        new_implementation: a `LLaMACompressionProfileBuilder`, or a model loader (or model path), for which a
            builder with the legacy ranks (values 32 / 48 / 64, keys 32) is made.
        layer_idx: the layer whose bases the per-head methods use (-1 = last, the legacy default).
    """

    def __init__(self, new_implementation: Any, layer_idx: int = -1):
        if isinstance(new_implementation, LLaMACompressionProfileBuilder):
            builder = new_implementation
        else:
            loader = LLaMAModelLoader(new_implementation) if isinstance(new_implementation, str) else new_implementation
            if not hasattr(loader, "load_model"):
                raise TypeError(
                    f"expected a profile builder, a model loader or a model path, got {type(loader).__name__}"
                )
            config = CompressionConfig(
                value_compression_ranks=dict(LEGACY_VALUE_RANKS), key_compression_rank=LEGACY_KEY_RANK
            )
            builder = LLaMACompressionProfileBuilder(loader, config)
        self.profile_builder = builder
        self.model_loader = builder.model_loader
        self.profiles = builder.build_compression_profiles(layer_idx)
        self.layer_idx = builder.layer_idx

        geometry = builder.geometry
        self.hidden_size = geometry.hidden_size
        self.head_dim = geometry.head_dim
        self.num_query_heads = geometry.num_heads
        self.num_kv_heads = geometry.num_kv_heads
        self.heads_per_kv_head = geometry.num_heads // geometry.num_kv_heads
        self.vocab_size = builder.model.config.get_text_config(decoder=True).vocab_size
        ranks = builder.profile_ranks()
        self.value_compression_ranks = {name: value for name, (_, value) in ranks.items()}
        self.key_compression_rank = next(iter(ranks.values()))[0]
        first = next(iter(self.profiles.values()))
        self.key_compression_matrices = list(first["key_compression"])  # per KV head [head_dim, key_rank]
        self.key_reconstruction_matrices = list(first["key_reconstruction"])  # per KV head [key_rank, head_dim]

    @property
    def algorithm(self) -> Any:
        return self.profile_builder.algorithm

    def compress_values(self, values: torch.Tensor, profile_name: str, head_idx: int = 0) -> torch.Tensor:
        return self.profile_builder.compress_values(values, profile_name, head_idx, layer_idx=self.layer_idx)

    def reconstruct_values(self, compressed_values: torch.Tensor, profile_name: str, head_idx: int = 0) -> torch.Tensor:
        return self.profile_builder.reconstruct_values(
            compressed_values, profile_name, head_idx, layer_idx=self.layer_idx
        )

    def compress_keys(self, keys: torch.Tensor, head_idx: int = 0) -> torch.Tensor:
        return self.profile_builder.compress_keys(keys, head_idx, layer_idx=self.layer_idx)

    def reconstruct_keys(self, compressed_keys: torch.Tensor, head_idx: int = 0) -> torch.Tensor:
        return self.profile_builder.reconstruct_keys(compressed_keys, head_idx, layer_idx=self.layer_idx)

    def get_profile(self, profile_name: str) -> dict[str, Any]:
        return self.profile_builder.get_profile(profile_name)

    def get_available_profiles(self) -> list[str]:
        return self.profile_builder.get_available_profiles()

    def get_compression_stats(self) -> dict[str, dict[str, Any]]:
        return self.profile_builder.get_compression_stats()

    def print_compression_summary(self) -> None:
        print(
            f"Compression profiles · layer {self.layer_idx} · head_dim {self.head_dim} · "
            f"{self.num_query_heads} query / {self.num_kv_heads} KV heads"
        )
        for name, stats in self.get_compression_stats().items():
            print(
                f"  {name}: key rank {stats['key_rank']}, value rank {stats['value_rank']}, "
                f"{stats['total_compression_ratio']:.2f}x, {stats['memory_savings_percent']:.1f}% KV memory saved"
            )


# The legacy class name (`from profiles_llama_new import LLaMACompressionProfiles`).
LLaMACompressionProfiles = LegacyCompressionWrapper
