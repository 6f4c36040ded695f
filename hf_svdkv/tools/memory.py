"""Count the bytes a KV cache really holds, whatever kind of cache it is.

Compression claims are only as honest as the byte count behind them, so this walks the actual tensors:
plain K/V for `DynamicCache`, and for transformers' `QuantizedCache` the packed integer data, the
scales / zero-points / shifts and the full-precision residual window. A cache that knows its own size
(anything with an `nbytes()` method, such as `SVDCompressedCache`) is trusted to report it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = ["cache_nbytes", "tensor_nbytes"]


def tensor_nbytes(t: torch.Tensor) -> int:
    """Logical size of a tensor: its elements times their size (a view counts only what it shows)."""
    return t.numel() * t.element_size()


def _walk(obj: Any, seen: set[int]) -> int:
    """Sum the bytes of every tensor storage reachable from `obj`, each storage once.

    Quantized tensors are wrapper subclasses (quanto's `QBitsTensor` holds a `PackedTensor` plus
    `_scale` / `_shift`); their own "storage" is empty, so we recurse into the inner tensors they
    declare through `__tensor_flatten__`. hqq keeps `(packed, meta)` with the scale and zero inside
    the `meta` dict, which the container recursion reaches.
    """
    if isinstance(obj, torch.Tensor):
        if is_traceable_wrapper_subclass(obj):
            names, _ = obj.__tensor_flatten__()
            return sum(_walk(getattr(obj, name), seen) for name in names)
        storage = obj.untyped_storage()
        # Two views of one buffer (or the same tensor reachable twice) must not be counted twice; the
        # whole storage is what stays allocated, even when only a slice of it is visible.
        key = storage.data_ptr()
        if storage.nbytes() == 0 or key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_walk(value, seen) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_walk(item, seen) for item in obj)
    return 0


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a KV cache: `nbytes()` if it has one, else every tensor under its layers.

    Works for transformers `Cache` objects (walking each layer's attributes covers `DynamicLayer`,
    the quanto / hqq / fp8 quantized layers and sliding-window layers without knowing their field
    names) and for the legacy tuple-of-(key, value) format.
    """
    nbytes = getattr(cache, "nbytes", None)
    if callable(nbytes):
        return int(nbytes())
    seen: set[int] = set()
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(_walk(vars(layer), seen) for layer in layers)
    if isinstance(cache, (list, tuple)):
        return _walk(cache, seen)
    raise TypeError(f"cannot count the bytes of a {type(cache).__name__}: no `layers` and no `nbytes()`")
