"""How a cache layer holds one kind of latents (keys or values): in the model dtype, or as integer codes.

A store is written a prompt or a token at a time (`append`), read back as floating-point latents for any span of
tokens (`read`), and follows the cache's sequence and batch operations (`crop`, `map`). Two hooks say what is stored:
`encode` turns floating-point latents into it and `decode` back, so a token reads exactly what is stored whether it
was written in this forward or an earlier one (transformers' `QuantizedLayer` has the same two hooks). A new storage
format is a subclass of `LatentStore` and an entry in `latent_store`; nothing else moves. Kernels that read the
stored form directly get it from `stored` and check `bits` first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .compression_config import MIXED
from .growing import Buffer, append_along, held_nbytes
from .projection import Projection
from .quantization import (
    QuantizedRuns,
    QuantizedTensor,
    empty_quantized,
    empty_quantized_runs,
    quantize,
    quantize_runs,
    rotate_projection,
)

Stored = torch.Tensor | QuantizedTensor | QuantizedRuns


class LatentStore:
    """Latents [batch, groups, seq, rank] in the model dtype, in a buffer with room to grow (`growing`)."""

    bits: int | None = None  # None: floating-point latents

    def __init__(self, batch: int, groups: int, rank: int, dtype: torch.dtype, device: torch.device):
        self.rank, self.dtype = rank, dtype
        self.stored: Stored = self._empty(batch, groups, rank, dtype, device)
        self._buffers: dict[str, Buffer] = {}

    def prepare(self, projection: Projection) -> Projection:
        """The projection this format stores latents of (QuantizedLatentStore rotates it)."""
        return projection

    # --- the format: two hooks ---------------------------------------------------------------------------------------
    def _empty(self, batch: int, groups: int, rank: int, dtype: torch.dtype, device: torch.device) -> Stored:
        return torch.empty((batch, groups, 0, rank), dtype=dtype, device=device)

    def encode(self, latents: torch.Tensor) -> Stored:
        """Floating-point latents [..., seq, rank] as they are stored. Rounded to the model dtype: a token reads the
        same whether its latent was computed in this call or stored by an earlier one."""
        return latents.to(self.dtype)

    def decode(self, encoded: Stored, dtype: torch.dtype) -> torch.Tensor:
        return encoded.to(dtype)

    def _parts(self, stored: Stored) -> dict[str, torch.Tensor]:
        """The tensors a stored value is made of (one here; codes, scales and zero points when quantized)."""
        return {"latents": stored}

    def _join(self, parts: dict[str, torch.Tensor]) -> Stored:
        return parts["latents"]

    # --- storage ---------------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.shape[-2]

    @property
    def shape(self) -> torch.Size:
        """[batch, groups, seq, rank]: the latents' logical shape."""
        return self.stored.shape

    @property
    def device(self) -> torch.device:
        return self.stored.device

    def append(self, encoded: Stored, count: int | None = None) -> None:
        """Store the first `count` tokens of `encoded` (all by default) after those held; in place where there is
        room (views handed out earlier are never written through)."""
        new = self._parts(self._slice(encoded, 0, count))
        parts = {}
        for name, tensor in self._parts(self.stored).items():
            parts[name], self._buffers[name] = append_along(self._buffers.get(name), tensor, new[name])
        self.stored = self._join(parts)

    def read(self, start: int = 0, end: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tokens [start, end) as floating-point latents [batch, groups, n, rank] in `dtype`."""
        return self.decode(self._slice(self.stored, start, end), dtype)

    def crop(self, length: int) -> None:
        """Keep the first `length` tokens."""
        self.map(lambda t: t[..., :length, :])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch or device op (`fn` keeps the last two dims) to every stored tensor."""
        self.stored = self._join({name: fn(t) for name, t in self._parts(self.stored).items()})
        self._buffers = {}  # the next token must not be written, in place, into what an older view still shows

    def nbytes(self) -> int:
        """Bytes held, the spare room for the next tokens included."""
        return sum(held_nbytes(t, self._buffers.get(name)) for name, t in self._parts(self.stored).items())

    def _slice(self, stored: Stored, start: int, end: int | None) -> Stored:
        return self._join({name: t[..., start:end, :] for name, t in self._parts(stored).items()})


class QuantizedLatentStore(LatentStore):
    """Latents as `bits`-bit codes per token and group of `group` channels (`quantization`), Hadamard-rotated: the
    projection is rotated once (`prepare`), so latents are born rotated at no per-token cost (`rotate=False` skips
    it, for measuring what it buys)."""

    def __init__(
        self,
        batch: int,
        groups: int,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        bits: int,
        group: int = 32,
        rotate: bool = True,
    ):
        self.bits, self.group, self.rotate = bits, group, rotate
        super().__init__(batch, groups, rank, dtype, device)

    def prepare(self, projection: Projection) -> Projection:
        return rotate_projection(projection) if self.rotate else projection

    def _empty(self, batch: int, groups: int, rank: int, dtype: torch.dtype, device: torch.device) -> Stored:
        return empty_quantized((batch, groups), rank, self.bits, self.group, device)

    def encode(self, latents: torch.Tensor) -> QuantizedTensor:
        return quantize(latents, self.bits, self.group)

    def decode(self, encoded: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        # Dequantized in float32 then cast: no rounding to the model dtype on the way.
        return encoded.dequantize(dtype)

    def _parts(self, stored: QuantizedTensor) -> dict[str, torch.Tensor]:
        return {"data": stored.data, "scale": stored.scale, "zero": stored.zero}

    def _join(self, parts: dict[str, torch.Tensor]) -> QuantizedTensor:
        return QuantizedTensor(**parts, bits=self.bits, group=self.group, dim=self.rank)


class MixedLatentStore(LatentStore):
    """Latents whose channels have their own bit widths (`Projection.channel_bits`, from `bit_allocation`): each run
    of equal widths is a segment of centred `bits`-bit codes per token and group of channels, Hadamard-rotated among
    themselves, with its scales. A token's segments share one row of bytes and one of scales (`QuantizedRuns`).
    Every byte is real memory and counted by `nbytes`."""

    bits = MIXED

    def __init__(
        self,
        batch: int,
        groups: int,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        segments: list[tuple[int, int]],
        group: int = 32,
        rotate: bool = True,
    ):
        if sum(width for _, width in segments) != rank:
            raise ValueError(f"segments {segments} do not add up to rank {rank}")
        self.segments, self.group, self.rotate = segments, group, rotate
        super().__init__(batch, groups, rank, dtype, device)

    def prepare(self, projection: Projection) -> Projection:
        return rotate_projection(projection, [width for _, width in self.segments]) if self.rotate else projection

    def _empty(self, batch: int, groups: int, rank: int, dtype: torch.dtype, device: torch.device) -> Stored:
        return empty_quantized_runs((batch, groups), self.segments, self.group, device)

    def encode(self, latents: torch.Tensor) -> QuantizedRuns:
        return quantize_runs(latents, self.segments, self.group)

    def decode(self, encoded: QuantizedRuns, dtype: torch.dtype) -> torch.Tensor:
        return encoded.dequantize(dtype)

    def _parts(self, stored: QuantizedRuns) -> dict[str, torch.Tensor]:
        return {"data": stored.data, "scale": stored.scale}

    def _join(self, parts: dict[str, torch.Tensor]) -> QuantizedRuns:
        return QuantizedRuns(**parts, widths=tuple(self.segments), group=self.group)


def latent_store(
    bits: int | str | None,
    batch: int,
    groups: int,
    projection: Projection,
    dtype: torch.dtype,
    device: torch.device,
    **options: Any,
) -> LatentStore:
    """An empty store of `projection`'s latents for `latent_bits` (None: in the model dtype; "mixed": at the
    projection's channel widths); `options` go to the format's class."""
    rank = projection.rank
    if bits is None:
        return LatentStore(batch, groups, rank, dtype, device, **options)
    if bits == MIXED:
        if projection.channel_bits is None:
            raise ValueError(
                "latent_bits='mixed' needs bases with a bit width per channel: fit them with a CompressionConfig("
                "latent_bits='mixed', target_ratio=...)"
            )
        return MixedLatentStore(batch, groups, rank, dtype, device, segments=projection.segments, **options)
    return QuantizedLatentStore(batch, groups, rank, dtype, device, bits=bits, **options)
