"""The seed's `core.utils` import path (compat/)."""

from .compat import MemoryManager  # noqa: F401
