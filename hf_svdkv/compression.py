"""The seed's `core.compression` import path."""

from .seed.legacy import LegacyCompressionWrapper, LLaMACompressionProfiles
from .seed.profile_builder import LLaMACompressionProfileBuilder
from .seed.svd import LowRankFactors, SVDCompressionAlgorithm

__all__ = [
    "LLaMACompressionProfileBuilder",
    "LLaMACompressionProfiles",
    "LegacyCompressionWrapper",
    "LowRankFactors",
    "SVDCompressionAlgorithm",
]
