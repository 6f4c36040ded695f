"""Use a model with compressed caches for the length of a block, leaving it as it was found."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..bases import SVDBases
from ..patch import is_patched, patch_model, unpatch_model


@contextmanager
def patched_for(model: nn.Module, bases: SVDBases) -> Iterator[None]:
    """Inside, `model` can fill an `SVDCompressedCache(bases=bases)`; an already patched model is left alone (the
    cache carries its own bases), an unpatched one is patched with `bases` and unpatched on exit."""
    if is_patched(model):
        yield
        return
    patch_model(model, bases=bases)
    try:
        yield
    finally:
        unpatch_model(model)
