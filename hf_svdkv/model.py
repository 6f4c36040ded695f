"""The seed's `core.model` import path: `from hf_svdkv.model import LLaMAModelLoader`."""

from .seed.model_loader import LLaMAModelLoader

__all__ = ["LLaMAModelLoader"]
