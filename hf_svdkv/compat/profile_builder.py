"""`LLaMACompressionProfileBuilder`: the seed's named compression profiles, each a set of core `SVDBases`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..architectures import ModelGeometry, model_geometry
from ..bases import SVDBases
from ..patch import onloaded_kv_weights
from ..projection import Projection
from .config import CompressionConfig
from .interfaces import ModelLoaderInterface
from .svd import SVDCompressionAlgorithm, WeightBasis


class LLaMACompressionProfileBuilder:
    """Weight-only SVD bases for every profile of a `CompressionConfig`, and per-head compression with them.

    With the seed spelling (``value_compression_ranks={"low": 32, "med": 64}, key_compression_rank=32``) each
    named value rank is a profile sharing the key rank; with the core spelling there is one profile (named after
    `profile`, else "custom"). Ranks are per KV head. `bases(profile)` is the core `SVDBases` a profile stands for:
    `patch_model(model, bases=...)` and `SVDCompressedCache(bases=...)` take it as it is. The bases are the core's
    weight-only ones, fitted by `algorithm` (Gram / randomized route when ``use_memory_efficient_svd``).

    Args:
        model_loader: a loader with a ``model`` (a transformers Llama-family model), e.g. `LLaMAModelLoader`.
        compression_config: ranks and grouping (default: the core's `med` profile).
        algorithm: the `SVDCompressionAlgorithm` that fits the bases (default: per the config's
            ``use_memory_efficient_svd``).
    """

    def __init__(
        self,
        model_loader: ModelLoaderInterface,
        compression_config: CompressionConfig | None = None,
        algorithm: SVDCompressionAlgorithm | None = None,
    ):
        config = compression_config if compression_config is not None else CompressionConfig(profile="med")
        if not isinstance(config, CompressionConfig):
            raise TypeError(f"compression_config must be a CompressionConfig, got {type(config).__name__}")
        if config.method != "weights":
            raise ValueError(
                "LLaMACompressionProfileBuilder builds weight-only bases (method='weights'); for calibrated bases use "
                "SVDBases.calibrate(...) and patch_model(model, bases=...)"
            )
        self.model_loader = model_loader
        self.config = config
        self.algorithm = algorithm or SVDCompressionAlgorithm(use_memory_efficient=config.use_memory_efficient_svd)
        self.layer_idx: int | None = None
        self.profiles: dict[str, dict[str, Any]] = {}
        self._bases: dict[str, SVDBases] = {}

    # --- the model ----------------------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        model = getattr(self.model_loader, "model", None)
        if model is None:
            self.model_loader.load_model()
            model = getattr(self.model_loader, "model", None)
        if model is None:
            raise TypeError(
                f"{type(self.model_loader).__name__} has no `model` after load_model(): the builder needs one"
            )
        return model

    @property
    def geometry(self) -> ModelGeometry:
        return model_geometry(self.model)

    # --- profiles -----------------------------------------------------------------------------------------------------
    def profile_ranks(self) -> dict[str, tuple[int, int]]:
        """(key rank, value rank) per KV head of every profile, checked against the model's head size."""
        geometry, config = self.geometry, self.config
        if config.value_compression_ranks:
            key = config.key_rank or config.seed_ranks()[0]
            ranks = {name: (key, value) for name, value in config.value_compression_ranks.items()}
        else:
            ranks = {config.profile or "custom": config.resolve_ranks(geometry.head_dim, geometry.num_kv_heads)}
        for name, pair in ranks.items():
            for kind, rank in zip(("key", "value"), pair, strict=True):
                if rank > geometry.head_dim:
                    raise ValueError(
                        f"profile {name!r}: {kind} rank {rank} exceeds this model's head_dim {geometry.head_dim} "
                        f"(the seed's ranks were for head_dim 128)"
                    )
        return ranks

    def get_available_profiles(self) -> list[str]:
        return list(self.profile_ranks())

    @property
    def default_profile(self) -> str:
        """The profile `patch_model` would use for this config."""
        return self.config.seed_value_profile() or next(iter(self.profile_ranks()))

    def profile_config(self, profile: str | None = None) -> CompressionConfig:
        """The core `CompressionConfig` of one profile (explicit ranks; grouping, window and bits kept)."""
        key, value = self._ranks(profile)
        return dataclasses.replace(
            self.config,
            key_rank=key,
            value_rank=value,
            profile=None,
            target_ratio=None,
            value_compression_ranks=None,
            key_compression_rank=None,
        )

    def bases(self, profile: str | None = None) -> SVDBases:
        """The core bases of a profile, every layer (computed once, then kept)."""
        name = profile or self.default_profile
        if name not in self._bases:
            with onloaded_kv_weights(self.model):
                self._bases[name] = SVDBases.from_model(
                    self.model, self.profile_config(name), algorithm=WeightBasis(self.algorithm)
                )
        return self._bases[name]

    def _ranks(self, profile: str | None) -> tuple[int, int]:
        ranks = self.profile_ranks()
        name = profile or self.default_profile
        if name not in ranks:
            raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(ranks)}")
        return ranks[name]

    def build_compression_profiles(self, layer_idx: int = -1) -> dict[str, dict[str, Any]]:
        """Every profile's compression (down) and reconstruction (up) matrices for one layer; also makes `layer_idx`
        the default of the per-head methods. Matrices are [groups, group_size * head_dim, rank] /
        [groups, rank, ...]."""
        index = self._layer_index(layer_idx)
        head_dim = self.geometry.head_dim
        profiles = {}
        for name, (key_rank, value_rank) in self.profile_ranks().items():
            layer = self.bases(name).layers[index]
            stored = key_rank + value_rank
            profiles[name] = {
                "layer_idx": index,
                "key_rank": key_rank,
                "value_rank": value_rank,
                "key_compression": layer.key.down,
                "key_reconstruction": layer.key.up,
                "key_center": layer.key.center,
                "value_compression": layer.value.down,
                "value_reconstruction": layer.value.up,
                "value_center": layer.value.center,
                "compression_ratio": 2 * head_dim / stored,
                "memory_savings": 1 - stored / (2 * head_dim),
            }
        self.layer_idx, self.profiles = index, profiles
        return profiles

    def get_profile(self, profile: str) -> dict[str, Any]:
        if profile not in self.profiles:
            self.build_compression_profiles(self.layer_idx if self.layer_idx is not None else -1)
        if profile not in self.profiles:
            raise ValueError(f"unknown profile {profile!r}: choose one of {', '.join(self.profiles)}")
        return self.profiles[profile]

    def get_compression_stats(self) -> dict[str, dict[str, Any]]:
        """Per profile: ranks, per-head compression of keys, values and both, and the KV memory saved."""
        g = self.geometry
        stats = {}
        for name, (key_rank, value_rank) in self.profile_ranks().items():
            stats[name] = {
                "key_rank": key_rank,
                "value_rank": value_rank,
                "num_query_heads": g.num_heads,
                "num_kv_heads": g.num_kv_heads,
                "head_dim": g.head_dim,
                "key_compression_ratio": g.head_dim / key_rank,
                "value_compression_ratio": g.head_dim / value_rank,
                "total_compression_ratio": 2 * g.head_dim / (key_rank + value_rank),
                "memory_savings_percent": 100.0 * (1 - (key_rank + value_rank) / (2 * g.head_dim)),
            }
        return stats

    # --- per-head compression -----------------------------------------------------------------------------------------
    def compress_values(
        self, values: torch.Tensor, profile: str, head_idx: int = 0, layer_idx: int | None = None
    ) -> torch.Tensor:
        """Value latents [..., value_rank] of KV head `head_idx`'s values [..., head_dim] (in the values' dtype)."""
        return self._encode(self._projection("value", profile, head_idx, layer_idx), values)

    def reconstruct_values(
        self, latents: torch.Tensor, profile: str, head_idx: int = 0, layer_idx: int | None = None
    ) -> torch.Tensor:
        return self._decode(self._projection("value", profile, head_idx, layer_idx), latents)

    def compress_keys(
        self, keys: torch.Tensor, head_idx: int = 0, layer_idx: int | None = None, profile: str | None = None
    ) -> torch.Tensor:
        """Key latents [..., key_rank] of pre-RoPE keys [..., head_dim] (keys must not be rotated yet)."""
        return self._encode(self._projection("key", profile, head_idx, layer_idx), keys)

    def reconstruct_keys(
        self, latents: torch.Tensor, head_idx: int = 0, layer_idx: int | None = None, profile: str | None = None
    ) -> torch.Tensor:
        return self._decode(self._projection("key", profile, head_idx, layer_idx), latents)

    def _layer_index(self, layer_idx: int | None) -> int:
        count = self.geometry.num_layers
        if layer_idx is None:
            layer_idx = self.layer_idx if self.layer_idx is not None else -1
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not -count <= layer_idx < count:
            raise IndexError(f"layer_idx {layer_idx!r} out of range for a model with {count} layers")
        return layer_idx % count

    def _projection(self, kind: str, profile: str | None, head_idx: int, layer_idx: int | None) -> Projection:
        if (group := self.config.heads_per_group(self.geometry.num_kv_heads)) != 1:
            raise ValueError(
                f"per-head compression needs group_size=1; this config shares a basis across {group} "
                "KV heads: use patch_model / SVDCompressedCache with builder.bases(profile)"
            )
        heads = self.geometry.num_kv_heads
        if isinstance(head_idx, bool) or not isinstance(head_idx, int) or not 0 <= head_idx < heads:
            raise IndexError(f"head_idx {head_idx!r} out of range: the model has {heads} KV heads")
        projection = getattr(self.bases(profile).layers[self._layer_index(layer_idx)], kind)
        return Projection(
            projection.down[head_idx : head_idx + 1],
            projection.up[head_idx : head_idx + 1],
            projection.center[head_idx : head_idx + 1],
        )

    def _encode(self, projection: Projection, states: torch.Tensor) -> torch.Tensor:
        head_dim = projection.down.shape[1]
        if states.shape[-1] != head_dim:
            raise ValueError(f"expected one head's states [..., {head_dim}], got shape {tuple(states.shape)}")
        down, center = projection.down[0].to(states.device), projection.center[0].to(states.device)
        latents = (states.to(down.dtype) - center) @ down
        return latents.to(states.dtype) if states.is_floating_point() else latents

    def _decode(self, projection: Projection, latents: torch.Tensor) -> torch.Tensor:
        rank = projection.up.shape[1]
        if latents.shape[-1] != rank:
            raise ValueError(f"expected latents [..., {rank}] for this profile, got shape {tuple(latents.shape)}")
        up, center = projection.up[0].to(latents.device), projection.center[0].to(latents.device)
        return (latents.to(up.dtype) @ up + center).to(latents.dtype)
