"""The seed's `core.interfaces` import path."""

from .seed.interfaces import CompressionInterface, ModelLoaderInterface

__all__ = ["CompressionInterface", "ModelLoaderInterface"]
