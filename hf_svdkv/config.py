"""The seed's `core.config` import path: its `CompressionConfig` (weight-only by default), `ModelConfig`, `InferenceConfig`."""

from .loading import ModelConfig  # noqa: F401
from .seed.config import CompressionConfig  # noqa: F401
from .seed.inference_config import InferenceConfig  # noqa: F401
