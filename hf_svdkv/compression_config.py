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
CALIBRATIONS = ("fast", "full")
LATENT_BITS = (8, 4)
# Measured (docs/sinks.md): 4 sinks cut the ppl increase at 7,168 + 1,024 tokens by 0.2-0.8 points at 2x, 3x and
# 6x-int4 and are neutral at 1,536 + 512 (-0.5 to +0.4); 16 did no better than 4.
DEFAULT_SINKS = 4
MIXED = "mixed"  # latent_bits: a bit width per latent channel, allocated under the budget (`bit_allocation`)
AUTO = "auto"  # latent_bits: mixed widths for calibrated bases under a target_ratio, the model dtype otherwise
# What a config without ranks, profile or ratio compresses to. Measured on the default model (docs/eval_default.md,
# 1,536 + 512 tokens): calibrated bases with mixed-width latents and a 32-token window cost +0.3% ppl at 4x, less than
# transformers' QuantizedCache at 3.6x (KIVI's axes, int4: +0.7%), and retrieve passkeys within 5 points of the full
# cache (docs/needle.md); bfloat16 latents cut to rank cost +1.7% at 2x.
DEFAULT_TARGET_RATIO = 4.0
# The full-precision window by latent format (docs/mixed.md, docs/eval_quality.md): mixed-width latents do best with
# 32 tokens (+0.33% vs +0.75% with 128 at 4x: the window's 16-bit bytes are taken from the latents' budget), latents
# cut to rank with 128 (+2.0 / +2.2% at 2x, +7.0 / +5.2% at 3x with 32 / 128).
DEFAULT_WINDOW = 128
MIXED_WINDOW = 32


def check_rank(name: str, rank: object) -> None:
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(f"{name} must be an integer number of latent dimensions per KV head, got {rank!r}")
    if rank <= 0:
        raise ValueError(f"{name} must be positive, got {rank}")


def check_window(window: object, name: str = "window") -> None:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"{name} must be a non-negative integer number of tokens, got {window!r}")


def check_latent_bits(bits: object) -> None:
    if bits is not None and bits != MIXED and (isinstance(bits, bool) or bits not in LATENT_BITS):
        raise ValueError(f"latent_bits must be one of {LATENT_BITS}, {MIXED!r}, {AUTO!r} or None, got {bits!r}")


@dataclass
class CompressionConfig:
    """How much to compress the KV cache, and how the bases are found.

    With no ranks, profile or ratio the cache is `DEFAULT_TARGET_RATIO` (4x) smaller than a 16-bit cache, with
    calibrated bases, mixed-width latents and a 32-token window: +0.3% ppl on the default model (README).

    Args:
        key_rank: latent dimensions kept per KV head for keys (pre-RoPE). Overrides the profile.
        value_rank: latent dimensions kept per KV head for values. Overrides the profile.
        profile: `low`, `med` or `high`; ranks scaled from head_dim 128 to the model's head_dim.
        target_ratio: instead of ranks, a memory budget: bytes of a 16-bit full cache / bytes of this cache.
            Ranks are then allocated per layer, and between keys and values, where they cost the least quality.
        method: how the bases are computed. `calibrated` (default): PCA of the pre-RoPE keys and output-aware PCA of
            the values on calibration text, what works on real models. `weights`: SVD of W_k / W_v, no data needed,
            but blind to activation outliers: on real models values compressed this way cost orders of magnitude of
            perplexity (README), so it is for research and data-free experiments.
        group_size: KV heads decomposed jointly. 1 = one basis per head; the number of KV heads = one basis for the
            whole layer. A group of g heads keeps g * rank dimensions, shared freely. None (default): the whole layer
            for calibrated bases (far better: +16% vs +172% ppl at 2x on the default model), 1 for weight-only ones.
        window: the most recent tokens each query sees at full precision (0 = every token as a latent). Default
            (None): 32 with mixed-width latents, 128 otherwise (`MIXED_WINDOW`, `DEFAULT_WINDOW`).
        latent_bits: store latents as 8- or 4-bit integers (None = in the model dtype), or "mixed": each latent
            channel at its own width from {8, 4, 2, 1, 0} (0: not stored), allocated under the `target_ratio` budget
            by the channel's variance (its importance weighted by measured sensitivity with `calibration="full"`).
            Default ("auto"): "mixed" for calibrated bases under a target_ratio (the default), None for explicit
            ranks, a profile or weight-only bases.
        calibration: `fast` (default: 16,384 tokens spread over the calibration text, ranks allocated on the spectra;
            seconds) or `full` (65,536 tokens and per-layer sensitivity probes; minutes).
            docs/calibration_tradeoff.md compares them.
        exact_prefill: a forward into an empty cache (a prompt) attends over its own exact keys and values, with the
            model's attention backend and mask, and stores them compressed (default). False: the prompt attends over
            its compressed tokens too, as every later forward does (for measuring the compression alone).
        sinks: the first tokens of a sequence kept at full precision for good: attention sinks, which most queries
            read heavily (StreamingLLM; KVTC keeps 4). Default 4 (docs/sinks.md). Counted in the bytes like the window.
    """

    key_rank: int | None = None
    value_rank: int | None = None
    profile: str | None = None
    target_ratio: float | None = None
    method: str = "calibrated"
    group_size: int | None = None
    window: int | None = None
    latent_bits: int | str | None = AUTO
    calibration: str = "fast"
    exact_prefill: bool = True
    sinks: int = DEFAULT_SINKS

    def __post_init__(self) -> None:
        check_rank("key_rank", self.key_rank)
        check_rank("value_rank", self.value_rank)
        key_rank, value_rank = self.explicit_ranks()
        if self.profile is not None and not self._known_profile(self.profile):
            raise ValueError(f"unknown profile {self.profile!r}: choose one of {', '.join(PROFILES)}")
        if self.target_ratio is not None:
            if (
                isinstance(self.target_ratio, bool)
                or not isinstance(self.target_ratio, numbers.Real)
                or self.target_ratio <= 1
            ):
                raise ValueError(
                    "target_ratio must be a number above 1 (x times smaller than a 16-bit cache), "
                    f"got {self.target_ratio!r}"
                )
        elif self.profile is None and key_rank is None and value_rank is None and self._defaults_to_ratio():
            self.target_ratio = DEFAULT_TARGET_RATIO
        elif self.profile is None and (key_rank is None or value_rank is None):
            raise ValueError("give both key_rank and value_rank, a profile (low, med, high), or a target_ratio")
        if self.latent_bits == AUTO:
            self.latent_bits = MIXED if self.target_ratio is not None and self.method == "calibrated" else None
        if self.window is None:
            self.window = MIXED_WINDOW if self.latent_bits == MIXED else DEFAULT_WINDOW
        check_window(self.window)
        check_window(self.sinks, "sinks")
        check_latent_bits(self.latent_bits)
        if self.latent_bits == MIXED and self.target_ratio is None:
            raise ValueError("latent_bits='mixed' spends a byte budget over the channels: give a target_ratio")
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, numbers.Integral)
            or self.group_size <= 0
        ):
            raise ValueError(
                f"group_size must be a positive integer (or None: chosen by method), got {self.group_size!r}"
            )
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not isinstance(self.exact_prefill, bool):
            raise ValueError(f"exact_prefill must be True or False, got {self.exact_prefill!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {self.calibration!r}: choose one of {', '.join(CALIBRATIONS)}")

    # Hooks for the older API's spelling of ranks (hf_svdkv.compat.config), which extends this class.
    def explicit_ranks(self) -> tuple[int | None, int | None]:
        """(key, value) ranks per KV head given explicitly, None where not given."""
        return self.key_rank, self.value_rank

    def _known_profile(self, name: str) -> bool:
        return name in PROFILES

    def _defaults_to_ratio(self) -> bool:
        return True

    def heads_per_group(self, num_kv_heads: int) -> int:
        """KV heads sharing one basis for a model with `num_kv_heads` (resolves group_size=None), checked."""
        group = self.group_size
        if group is None:
            group = num_kv_heads if self.method == "calibrated" else 1
        if num_kv_heads % group:
            raise ValueError(f"group_size {group} does not divide the model's {num_kv_heads} KV heads")
        return group

    def resolve_ranks(self, head_dim: int, num_kv_heads: int) -> tuple[int, int]:
        """Per-KV-head (key_rank, value_rank) for a model, checked against what its heads allow.

        With a target_ratio and no explicit ranks this is the uniform starting point: half the budget each."""
        group = self.heads_per_group(num_kv_heads)
        ranks = {}
        for name, explicit in zip(("key_rank", "value_rank"), self.explicit_ranks(), strict=True):
            rank = explicit
            if rank is None and self.profile is None:
                rank = max(1, round(head_dim / self.target_ratio))
            elif rank is None:
                rank = max(1, round(PROFILES[self.profile][name] * head_dim / PROFILE_HEAD_DIM))
            if rank > head_dim:
                raise ValueError(
                    f"{name}={rank} exceeds head_dim={head_dim}: a group of {group} KV head(s) "
                    f"holds at most {group * head_dim} dimensions, i.e. {head_dim} per head"
                )
            ranks[name] = rank
        return ranks["key_rank"], ranks["value_rank"]
