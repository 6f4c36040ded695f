"""The seed's `core.inference` import path (compat/)."""

from .compat import CompressedAutoregressiveDecoder, GenerationResult, LLaMACompressionInference, LLaMAFullForward  # noqa: F401
