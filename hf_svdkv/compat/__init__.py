"""The seed project's API (`core.config`, `core.model`, `core.compression`, `core.cache`, `core.inference`,
`core.data`, `core.utils`, `core.interfaces`) on top of this library's core, in one place.

Code written against the seed runs with its import prefix changed from ``core.`` to ``hf_svdkv.``: each of those
module paths is a one-line module at the package's root re-exporting names from here. The classes are thin: bases are
`SVDBases`, caches are `SVDCompressedCache`, measurements go through `hf_svdkv.tools.eval`. The seed's
`CompressionConfig` is the core one with the seed's spelling of ranks and its defaults (weight-only bases, no window).
"""

from ..svd_cache import SVDCacheLayer, SVDCompressedCache
from ..text import load_text, make_windows, split_calibration, tokenize_text
from ..tools.loading import ModelConfig
from .config import CompressionConfig
from .dataset import LLaMADatasetProcessor
from .decoder import CompressedAutoregressiveDecoder, GenerationResult
from .full_forward import LLaMAFullForward
from .inference import LLaMACompressionInference
from .inference_config import InferenceConfig
from .interfaces import CompressionInterface, ModelLoaderInterface
from .kv_store import LLaMAKVCache, StandardKVCache
from .legacy import LegacyCompressionWrapper, LLaMACompressionProfiles
from .memory_manager import MemoryManager
from .model import LLaMA3Loader, ModelConfigWrapper
from .model_loader import LLaMAModelLoader
from .profile_builder import LLaMACompressionProfileBuilder
from .svd import LowRankFactors, SVDCompressionAlgorithm

__all__ = [
    "CompressedAutoregressiveDecoder",
    "CompressionConfig",
    "CompressionInterface",
    "GenerationResult",
    "InferenceConfig",
    "LLaMA3Loader",
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
    "ModelConfig",
    "ModelConfigWrapper",
    "ModelLoaderInterface",
    "SVDCompressionAlgorithm",
    "StandardKVCache",
    # core names the older import paths also had (hf_svdkv.cache, hf_svdkv.data)
    "SVDCacheLayer",
    "SVDCompressedCache",
    "load_text",
    "make_windows",
    "split_calibration",
    "tokenize_text",
]
