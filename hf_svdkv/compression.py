"""The seed's `core.compression` import path (compat/)."""

from .compat import (  # noqa: F401
    LegacyCompressionWrapper,
    LLaMACompressionProfileBuilder,
    LLaMACompressionProfiles,
    LowRankFactors,
    SVDCompressionAlgorithm,
)
