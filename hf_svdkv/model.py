"""The seed's `core.model` import path (compat/)."""

from .compat import LLaMA3Loader, LLaMAModelLoader, ModelConfigWrapper  # noqa: F401
