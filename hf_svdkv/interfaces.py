"""The seed's `core.interfaces` import path (compat/)."""

from .compat import CompressionInterface, ModelLoaderInterface  # noqa: F401
