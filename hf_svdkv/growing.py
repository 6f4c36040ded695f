"""Appending to a cache tensor without copying what it already holds.

`torch.cat([stored, new])` copies the whole cache on every decoding step: at 8k tokens that copy costs as much as the
attention itself. Here a tensor lives in a buffer with a little spare room along the sequence; a step writes its token
into the room and hands out a longer view of the same buffer. When the room runs out, the buffer is copied once into a
larger one (amortised: a constant number of tokens copied per step). Views handed out earlier are never written through:
new tokens go past their end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Room left after a short append (decoding) to a non-empty tensor: 1/SPARE_FRACTION of its length. The buffer is then
# copied once every length / SPARE_FRACTION steps, SPARE_FRACTION tokens' worth of copying per step however long the
# cache, and the spare room is at most 1/SPARE_FRACTION of the bytes held. The first append and longer ones (a
# prefill, a scored continuation) get an exact fit: a cache that is not being decoded into holds no spare bytes.
SPARE_FRACTION = 64
SHORT_APPEND = 16


@dataclass
class Buffer:
    """Where a growing tensor lives: `data` (spare room included) and how many of its rows along the growing dim
    the last view handed out covers. Only that view may be extended in place."""

    data: torch.Tensor
    used: int


def append_along(
    buffer: Buffer | None, stored: torch.Tensor, new: torch.Tensor, dim: int = -2
) -> tuple[torch.Tensor, Buffer]:
    """(`stored` followed by `new` along `dim`, the buffer that view lives in).

    `new` is written in place when `stored` is the view this function returned last time with `buffer` and there is
    room; otherwise (a first call, a crop, a batch reorder, no room) a new buffer is allocated and both are copied."""
    length, added = stored.shape[dim], new.shape[dim]
    if _has_room(buffer, stored, length + added, dim) and not new.requires_grad:
        buffer.data.narrow(dim, length, added).copy_(new)
        buffer.used = length + added
        return buffer.data.narrow(dim, 0, length + added), buffer
    if new.requires_grad or stored.requires_grad:  # autograd must see the values flow: no in-place writes
        joined = torch.cat([stored, new], dim=dim)
        return joined, Buffer(joined, joined.shape[dim])
    shape = list(stored.shape)
    shape[dim] = length + added + (length // SPARE_FRACTION if added <= SHORT_APPEND else 0)
    data = stored.new_empty(shape)
    data.narrow(dim, 0, length).copy_(stored)
    data.narrow(dim, length, added).copy_(new)
    return data.narrow(dim, 0, length + added), Buffer(data, length + added)


def _has_room(buffer: Buffer | None, stored: torch.Tensor, needed: int, dim: int) -> bool:
    if buffer is None or stored.numel() == 0 or stored.shape[dim] != buffer.used or needed > buffer.data.shape[dim]:
        return False
    if buffer.data.is_inference() and not torch.is_inference_mode_enabled():
        return False  # an inference tensor may not be written outside inference mode
    prefix = buffer.data.narrow(dim, 0, buffer.used)
    return (
        stored.data_ptr() == prefix.data_ptr() and stored.shape == prefix.shape and stored.stride() == prefix.stride()
    )


def held_nbytes(view: torch.Tensor, buffer: Buffer | None) -> int:
    """Bytes allocated for `view`: its whole buffer (spare room included) when it lives in one."""
    if buffer is not None and view.numel() and view.data_ptr() == buffer.data.data_ptr():
        return buffer.data.numel() * buffer.data.element_size()
    return view.numel() * view.element_size()
