"""The seed's `CompressionConfig`: the core dataclass with the seed's spelling of ranks and its semantics.

The seed compressed with weight-only SVD and no full-precision tokens, so this class defaults to `method="weights"`,
`window=0` and `sinks=0`; every core field still works. Its extra fields: `value_compression_ranks` (value ranks per
named profile, literal, not scaled to the head size, e.g. {"med": 64}; `profile`, else the only entry, else "med" picks
the one `patch_model` uses, the seed's profile builder uses them all), `key_compression_rank` (literal; 32 when only
value ranks are given) and `use_memory_efficient_svd` (Gram-based or randomized SVD in the seed's profile builder).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..compression_config import CompressionConfig as CoreCompressionConfig
from ..compression_config import check_rank

# The seed API's fixed key rank, used when its spelling (value_compression_ranks) gives no key rank.
SEED_KEY_RANK = 32


@dataclass
class CompressionConfig(CoreCompressionConfig):
    """`hf_svdkv.CompressionConfig` as the seed spelled and meant it (see the module docstring)."""

    method: str = "weights"
    window: int = 0
    sinks: int = 0
    value_compression_ranks: dict[str, int] | None = None
    key_compression_rank: int | None = None
    use_memory_efficient_svd: bool = True

    def __post_init__(self) -> None:
        check_rank("key_compression_rank", self.key_compression_rank)
        if not isinstance(self.use_memory_efficient_svd, bool):
            raise ValueError(f"use_memory_efficient_svd must be True or False, got {self.use_memory_efficient_svd!r}")
        ranks = self.value_compression_ranks
        if ranks is not None:
            if not isinstance(ranks, dict) or not ranks:
                raise ValueError(
                    "value_compression_ranks must be a non-empty dict of profile name -> rank, e.g. {'med': 64}, "
                    f"got {ranks!r}"
                )
            for name, rank in ranks.items():
                check_rank(f"value_compression_ranks[{name!r}]", rank)
        super().__post_init__()

    def _known_profile(self, name: str) -> bool:
        return super()._known_profile(name) or name in (self.value_compression_ranks or {})

    def _defaults_to_ratio(self) -> bool:
        return False  # the seed had no default ratio: a config without ranks is an error there

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
        """(key, value) ranks per KV head given in the seed spelling."""
        ranks = self.value_compression_ranks
        key = self.key_compression_rank
        value = ranks[self.seed_value_profile()] if ranks is not None else None
        if key is None and ranks is not None and self.key_rank is None:
            key = SEED_KEY_RANK
        return key, value

    def explicit_ranks(self) -> tuple[int | None, int | None]:
        """The core ranks, else the seed spelling's; the two must agree where both are given."""
        explicit = []
        for name, core, seed in zip(
            ("key_rank", "value_rank"), (self.key_rank, self.value_rank), self.seed_ranks(), strict=True
        ):
            if core is not None and seed is not None and core != seed:
                raise ValueError(f"{name}={core} contradicts the seed spelling's rank {seed}: give one of them")
            explicit.append(core if core is not None else seed)
        return explicit[0], explicit[1]
