"""Low-rank (SVD) KV-cache compression for Hugging Face transformers."""

from . import log
from .architectures import SUPPORTED_MODEL_TYPES, UnsupportedModelError
from .bases import BasesMismatchError, BasisAlgorithm, SVDBases
from .cache import SVDCacheLayer, SVDCompressedCache
from .compression_config import CompressionConfig
from .fit import fit_bases
from .loading import ModelConfig
from .patch import is_patched, patch_model, unpatch_model
from .projection import LayerBases, Projection
from .seed import (
    CompressedAutoregressiveDecoder,
    CompressionInterface,
    InferenceConfig,
    LegacyCompressionWrapper,
    LLaMACompressionInference,
    LLaMACompressionProfileBuilder,
    LLaMACompressionProfiles,
    LLaMADatasetProcessor,
    LLaMAFullForward,
    LLaMAKVCache,
    LLaMAModelLoader,
    MemoryManager,
    ModelLoaderInterface,
    StandardKVCache,
    SVDCompressionAlgorithm,
)
from .version import __version__
from .weight_svd import WeightSVD

log.configure()

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "BasesMismatchError",
    "BasisAlgorithm",
    "CompressionConfig",
    "LayerBases",
    "Projection",
    "SVDBases",
    "SVDCacheLayer",
    "SVDCompressedCache",
    "UnsupportedModelError",
    "WeightSVD",
    "__version__",
    "fit_bases",
    "is_patched",
    "patch_model",
    "unpatch_model",
    # the seed API
    "CompressedAutoregressiveDecoder",
    "CompressionInterface",
    "InferenceConfig",
    "LLaMACompressionInference",
    "LLaMACompressionProfileBuilder",
    "LLaMACompressionProfiles",
    "LLaMADatasetProcessor",
    "LLaMAFullForward",
    "LLaMAKVCache",
    "LLaMAModelLoader",
    "LegacyCompressionWrapper",
    "MemoryManager",
    "ModelConfig",
    "ModelLoaderInterface",
    "SVDCompressionAlgorithm",
    "StandardKVCache",
]
