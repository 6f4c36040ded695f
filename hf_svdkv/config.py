"""The seed's `core.config` import path (compat/): its `CompressionConfig` (weight-only by default) and the others."""

from .compat import CompressionConfig, InferenceConfig, ModelConfig  # noqa: F401
