"""`InferenceConfig`: the seed's generation settings."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from ..tools.loading import ModelConfig
from .config import CompressionConfig


@dataclass
class InferenceConfig:
    """How `CompressedAutoregressiveDecoder` generates.

    Args:
        max_sequence_length: the most tokens (prompt + generated) a sequence may reach.
        batch_size: prompts generated together (a longer list is done in batches of this size).
        temperature: 0 = greedy decoding; above 0, sampling at this temperature.
        top_p: nucleus sampling mass (1.0 = off); only with temperature > 0.
        seed: seeds torch before sampling, for reproducible samples (None = not seeded).
        model_config: which model to load when the decoder is given no loader (None = `ModelConfig.from_env()`).
        compression_config: ranks when the decoder is given no profile builder (None = the core's `med` profile).
    """

    max_sequence_length: int = 2048
    batch_size: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    model_config: ModelConfig | None = None
    compression_config: CompressionConfig | None = None

    def __post_init__(self) -> None:
        for name in ("max_sequence_length", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, numbers.Real) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, numbers.Real) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0
