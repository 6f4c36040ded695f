"""The seed's `core.utils` import path."""

from .seed.memory_manager import MemoryManager

__all__ = ["MemoryManager"]
