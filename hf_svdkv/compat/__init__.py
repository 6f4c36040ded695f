"""The seed project's API (`core.config`, `core.model`, `core.compression`, `core.cache`, `core.inference`,
`core.data`, `core.utils`, `core.interfaces`) on top of this library's core.

Code written against the seed runs with its import prefix changed from ``core.`` to ``hf_svdkv.``: each of those
module paths exists here and re-exports the names below. The classes are thin: bases are `SVDBases`, caches are
`SVDCompressedCache`, measurements go through `hf_svdkv.eval`; where a seed class is only a new name for a core one
(`ModelConfig`, `CompressionConfig`) it is that class.
"""

from .dataset import LLaMADatasetProcessor
from .decoder import CompressedAutoregressiveDecoder, GenerationResult
from .full_forward import LLaMAFullForward
from .inference import LLaMACompressionInference
from .inference_config import InferenceConfig
from .interfaces import CompressionInterface, ModelLoaderInterface
from .kv_store import LLaMAKVCache, StandardKVCache
from .legacy import LegacyCompressionWrapper, LLaMACompressionProfiles
from .memory_manager import MemoryManager
from .model_loader import LLaMAModelLoader
from .profile_builder import LLaMACompressionProfileBuilder
from .svd import LowRankFactors, SVDCompressionAlgorithm

__all__ = [
    "CompressedAutoregressiveDecoder",
    "CompressionInterface",
    "GenerationResult",
    "InferenceConfig",
    "LLaMACompressionInference",
    "LLaMACompressionProfileBuilder",
    "LLaMACompressionProfiles",
    "LLaMADatasetProcessor",
    "LLaMAFullForward",
    "LLaMAKVCache",
    "LLaMAModelLoader",
    "LegacyCompressionWrapper",
    "LowRankFactors",
    "MemoryManager",
    "ModelLoaderInterface",
    "SVDCompressionAlgorithm",
    "StandardKVCache",
]
