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
# The seed API's fixed key rank, used when its spelling (value_compression_ranks) gives no key rank.
SEED_KEY_RANK = 32
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
        value_compression_ranks: the seed API's spelling: value ranks per named profile, literal (not scaled to
            the head size), e.g. {"med": 64}. Used where value_rank is not given; `profile`, else the only entry,
            else "med" picks the one `patch_model` uses (the seed's profile builder uses them all).
        key_compression_rank: the seed API's key rank (literal; 32 when only value_compression_ranks is given).
        use_memory_efficient_svd: the seed API's SVD route: Gram-based or randomized instead of a full SVD (used by
            its profile builder and SVDCompressionAlgorithm; `patch_model` with a config uses a full SVD).
    """

    key_rank: int | None = None
    value_rank: int | None = None
    profile: str | None = None
    group_size: int = 1
    method: str = "weights"
    target_ratio: float | None = None
    window: int = 0
    latent_bits: int | None = None
    value_compression_ranks: dict[str, int] | None = None
    key_compression_rank: int | None = None
    use_memory_efficient_svd: bool = True

    def __post_init__(self) -> None:
        _check_rank("key_rank", self.key_rank)
        _check_rank("value_rank", self.value_rank)
        seed_key_rank, seed_value_rank = self.seed_ranks()
        if self.profile is not None and self.profile not in PROFILES and self.profile not in (self.value_compression_ranks or {}):
            raise ValueError(f"unknown profile {self.profile!r}: choose one of {', '.join(PROFILES)}")
        if self.target_ratio is not None:
            if isinstance(self.target_ratio, bool) or not isinstance(self.target_ratio, numbers.Real) or self.target_ratio <= 1:
                raise ValueError(f"target_ratio must be a number above 1 (x times smaller than a 16-bit cache), got {self.target_ratio!r}")
        elif self.profile is None and ((self.key_rank or seed_key_rank) is None or (self.value_rank or seed_value_rank) is None):
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
        for name, seed_rank in zip(("key_rank", "value_rank"), self.seed_ranks(), strict=True):
            rank = getattr(self, name) or seed_rank
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

    def seed_value_profile(self) -> str | None:
        """The entry of `value_compression_ranks` that `patch_model` uses (None without the seed spelling)."""
        ranks = self.value_compression_ranks
        if ranks is None:
            return None
        if self.profile is not None:
            if self.profile not in ranks:
                raise ValueError(f"profile {self.profile!r} is not one of value_compression_ranks ({', '.join(ranks)})")
            return self.profile
        if len(ranks) == 1:
            return next(iter(ranks))
        if "med" in ranks:
            return "med"
        raise ValueError(
            f"value_compression_ranks has several profiles ({', '.join(ranks)}) and no 'med': pick one with profile=..."
        )

    def seed_ranks(self) -> tuple[int | None, int | None]:
        """(key, value) ranks per KV head given in the seed spelling, checked against key_rank / value_rank."""
        _check_rank("key_compression_rank", self.key_compression_rank)
        if not isinstance(self.use_memory_efficient_svd, bool):
            raise ValueError(f"use_memory_efficient_svd must be True or False, got {self.use_memory_efficient_svd!r}")
        ranks = self.value_compression_ranks
        if ranks is not None:
            if not isinstance(ranks, dict) or not ranks:
                raise ValueError(f"value_compression_ranks must be a non-empty dict of profile name -> rank, e.g. {{'med': 64}}, got {ranks!r}")
            for name, rank in ranks.items():
                _check_rank(f"value_compression_ranks[{name!r}]", rank)
        key = self.key_compression_rank
        value = ranks[self.seed_value_profile()] if ranks is not None else None
        for name, core, seed in (("key_rank", self.key_rank, key), ("value_rank", self.value_rank, value)):
            if core is not None and seed is not None and core != seed:
                raise ValueError(f"{name}={core} contradicts the seed spelling's rank {seed}: give one of them")
        if key is None and ranks is not None and self.key_rank is None:
            key = SEED_KEY_RANK
        return key, value


# The seed API's names for this module (`core.config`), defined in hf_svdkv.seed and imported on first use.
_SEED_NAMES = {"ModelConfig": ".loading", "InferenceConfig": ".seed.inference_config"}


def __getattr__(name: str) -> object:
    if name in _SEED_NAMES:
        import importlib

        return getattr(importlib.import_module(_SEED_NAMES[name], __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
