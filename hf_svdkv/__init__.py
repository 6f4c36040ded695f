"""Low-rank (SVD) KV-cache compression for Hugging Face transformers.

    from hf_svdkv import CompressionConfig, patch_model
    patch_model(model, CompressionConfig(target_ratio=2.0), tokenizer=tokenizer)  # calibrated bases, cached on disk
    model.generate(...)                                                          # now with a 2x smaller KV cache

The older (seed) API's names are importable from here too; they load on first use (`compat/`).
"""

import importlib

from . import log
from .architectures import SUPPORTED_MODEL_TYPES, UnsupportedModelError
from .bases import BasesMismatchError, BasisAlgorithm, SVDBases
from .compression_config import CompressionConfig
from .fit import fit_bases
from .patch import is_patched, patch_model, unpatch_model
from .projection import LayerBases, Projection
from .svd_cache import SVDCacheLayer, SVDCompressedCache
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
]
# The seed API's names: importable from here as before, loaded only when asked for. Its CompressionConfig is
# `hf_svdkv.config.CompressionConfig`; the one here is the core's.
_COMPAT_NAMES = {
    "CompressedAutoregressiveDecoder",
    "CompressionInterface",
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
    "MemoryManager",
    "ModelConfig",
    "ModelConfigWrapper",
    "ModelLoaderInterface",
    "SVDCompressionAlgorithm",
    "StandardKVCache",
}


def __getattr__(name: str) -> object:
    if name in _COMPAT_NAMES:
        return getattr(importlib.import_module(".compat", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_COMPAT_NAMES])
