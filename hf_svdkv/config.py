"""What to compress and how much: the one dataclass `patch_model` is driven by."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

# Ranks per KV head for head_dim 128 (the seed's profiles); other head sizes scale them proportionally.
PROFILES: dict[str, dict[str, int]] = {
    "low": {"key_rank": 32, "value_rank": 32},
    "med": {"key_rank": 32, "value_rank": 64},
    "high": {"key_rank": 32, "value_rank": 128},
}
PROFILE_HEAD_DIM = 128
METHODS = ("weights", "calibrated")
LATENT_BITS = (8, 4)


def _check_rank(name: str, rank: object) -> None:
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(f"{name} must be an integer number of latent dimensions per KV head, got {rank!r}")
    if rank <= 0:
        raise ValueError(f"{name} must be positive, got {rank}")


def check_window(window: object) -> None:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"window must be a non-negative integer number of tokens, got {window!r}")


def check_latent_bits(bits: object) -> None:
    if bits is not None and (isinstance(bits, bool) or bits not in LATENT_BITS):
        raise ValueError(f"latent_bits must be one of {LATENT_BITS} or None, got {bits!r}")


@dataclass
class CompressionConfig:
    """Ranks of the key and value latents and how KV heads share a basis.

    Args:
        key_rank: latent dimensions kept per KV head for keys (pre-RoPE). Overrides the profile.
        value_rank: latent dimensions kept per KV head for values. Overrides the profile.
        profile: `low`, `med` or `high`; ranks scaled from head_dim 128 to the model's head_dim.
        group_size: KV heads decomposed jointly. 1 = one basis per head; the number of KV heads = one
            basis for the whole layer. A group of g heads keeps g * rank dimensions, shared freely.
        method: how the bases are computed; `weights` = SVD of W_k / W_v, no data needed; `calibrated` =
            PCA of the pre-RoPE keys and output-aware PCA of the values on calibration text.
        target_ratio: instead of ranks, a memory budget: bytes of a 16-bit full cache / bytes of this cache.
            Ranks are then allocated per layer, and between keys and values, where they cost the least quality.
        window: the most recent tokens each query sees at full precision (0 = every token as a latent).
        latent_bits: store latents as 8- or 4-bit integers (None = in the model dtype).
    """

    key_rank: int | None = None
    value_rank: int | None = None
    profile: str | None = None
    group_size: int = 1
    method: str = "weights"
    target_ratio: float | None = None
    window: int = 0
    latent_bits: int | None = None

    def __post_init__(self) -> None:
        _check_rank("key_rank", self.key_rank)
        _check_rank("value_rank", self.value_rank)
        if self.profile is not None and self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}: choose one of {', '.join(PROFILES)}")
        if self.target_ratio is not None:
            if isinstance(self.target_ratio, bool) or not isinstance(self.target_ratio, numbers.Real) or self.target_ratio <= 1:
                raise ValueError(f"target_ratio must be a number above 1 (x times smaller than a 16-bit cache), got {self.target_ratio!r}")
        elif self.profile is None and (self.key_rank is None or self.value_rank is None):
            raise ValueError("give both key_rank and value_rank, a profile (low, med, high), or a target_ratio")
        check_window(self.window)
        check_latent_bits(self.latent_bits)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, numbers.Integral) or self.group_size <= 0:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")

    def resolve_ranks(self, head_dim: int, num_kv_heads: int) -> tuple[int, int]:
        """Per-KV-head (key_rank, value_rank) for a model, checked against what its heads allow.

        With a target_ratio and no explicit ranks this is the uniform starting point: half the budget each."""
        if num_kv_heads % self.group_size:
            raise ValueError(
                f"group_size {self.group_size} does not divide the model's {num_kv_heads} KV heads"
            )
        ranks = {}
        for name in ("key_rank", "value_rank"):
            rank = getattr(self, name)
            if rank is None and self.profile is None:
                rank = max(1, round(head_dim / self.target_ratio))
            elif rank is None:
                rank = max(1, round(PROFILES[self.profile][name] * head_dim / PROFILE_HEAD_DIM))
            if rank > head_dim:
                raise ValueError(
                    f"{name}={rank} exceeds head_dim={head_dim}: a group of {self.group_size} KV head(s) "
                    f"holds at most {self.group_size * head_dim} dimensions, i.e. {head_dim} per head"
                )
            ranks[name] = rank
        return ranks["key_rank"], ranks["value_rank"]
