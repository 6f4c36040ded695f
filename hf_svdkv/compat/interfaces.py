"""The seed's abstract interfaces: what a model loader and a value compressor must provide."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..compression_config import PROFILE_HEAD_DIM, PROFILES

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class ModelLoaderInterface(ABC):
    """Loads a model and hands out its weights by layer. `LLaMAModelLoader` is the library's implementation."""

    @abstractmethod
    def load_model(self) -> None:
        """Load the model (idempotent)."""

    @abstractmethod
    def get_model_weights(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """Every weight of decoder layer `layer_idx`, by parameter name (e.g. ``self_attn.k_proj.weight``)."""

    def get_attention_weights(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """The q/k/v/o projection weights of one layer as ``{"q_proj": W_q, ...}``, picked from `get_model_weights`."""
        weights = self.get_model_weights(layer_idx)
        picked = {}
        for name in ATTENTION_PROJECTIONS:
            found = [
                w for key, w in weights.items() if key in (name, f"{name}.weight") or key.endswith(f".{name}.weight")
            ]
            if len(found) != 1:
                raise KeyError(f"layer {layer_idx} weights have {len(found)} entries for {name}: expected exactly one")
            picked[name] = found[0]
        return picked


class CompressionInterface(ABC):
    """Compresses one KV head's values for a named profile.

    Subclasses implement `compress_values`; `custom_preprocessing` (identity) and `get_rank_for_profile` are
    hooks with defaults. Ranks come from ``self.compression_config`` when a subclass sets one (a
    `CompressionConfig` with `value_compression_ranks`, or core ranks), else from `PROFILE_RANKS`.
    """

    # The seed's value ranks per profile (for head_dim 128; the core's `low` / `med` / `high` profiles).
    PROFILE_RANKS: dict[str, int] = {name: ranks["value_rank"] for name, ranks in PROFILES.items()}
    PROFILE_HEAD_DIM: int = PROFILE_HEAD_DIM

    @abstractmethod
    def compress_values(self, values: torch.Tensor, profile: str) -> torch.Tensor:
        """Compress `values` (one head: [..., tokens, head_dim]) at the rank of `profile`."""

    def custom_preprocessing(self, values: torch.Tensor) -> torch.Tensor:
        """Hook run before compression; the default leaves the values as they are."""
        return values

    def get_rank_for_profile(self, profile: str) -> int:
        """The value rank of `profile`: from ``self.compression_config`` if set, else `PROFILE_RANKS`."""
        config = getattr(self, "compression_config", None)
        ranks = dict(self.PROFILE_RANKS)
        if config is not None and config.value_compression_ranks:
            ranks = dict(config.value_compression_ranks)
        elif config is not None and config.value_rank is not None:
            ranks = {config.profile or "custom": config.value_rank}
        if profile not in ranks:
            raise ValueError(f"unknown profile {profile!r}: choose one of {', '.join(ranks)}")
        return ranks[profile]
