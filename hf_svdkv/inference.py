"""The seed's `core.inference` import path."""

from .seed.decoder import CompressedAutoregressiveDecoder, GenerationResult
from .seed.full_forward import LLaMAFullForward
from .seed.inference import LLaMACompressionInference

__all__ = ["CompressedAutoregressiveDecoder", "GenerationResult", "LLaMACompressionInference", "LLaMAFullForward"]
