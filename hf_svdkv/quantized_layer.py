"""`QuantizedSVDCacheLayer`: an `SVDCacheLayer` whose latents are stored as 8- or 4-bit integer codes."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cache import SVDCacheLayer
from .growing import append_along, held_nbytes
from .projection import LayerBases
from .quantization import QuantizedTensor, concat, empty_quantized, quantize, rotate_projection

_FIELDS = ("data", "scale", "zero")  # the tensors of a QuantizedTensor


class QuantizedSVDCacheLayer(SVDCacheLayer):
    """Latents quantized per token as they are stored, dequantized when read.

    `keys` / `values` are `QuantizedTensor`s of logical shape [batch, groups, seq, rank]; the full-precision window
    (`recent_keys` / `recent_values`) is unchanged and quantized only as it ages out. With `rotate` (default) the
    projection is rotated by a Hadamard matrix at lazy init, so latents are born rotated at no per-token cost.

    A latent is quantized, then dequantized, in the very call that computes it: every query, in this forward or a
    later one, reads exactly the codes that are stored, so one forward and token-by-token decoding agree. (Exactly
    on CPU; on CUDA the encoding matmul picks kernels by shape, which can move a latent by one float ulp and flip one
    code by one step, e.g. 2e-3 on a tiny model's logits at int8.)"""

    def __init__(
        self, bases: LayerBases, head_dim: int, window: int = 0, *, bits: int = 8, group: int = 32, rotate: bool = True
    ):
        super().__init__(bases, head_dim, window)
        self.bits, self.group, self.rotate = bits, group, rotate

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        if self.rotate:
            self.projection = LayerBases(rotate_projection(self.projection.key), rotate_projection(self.projection.value))
        batch = key_states.shape[0]
        self.keys = self._empty(batch, self.projection.key.num_groups, self.projection.key.rank)
        self.values = self._empty(batch, self.projection.value.num_groups, self.projection.value.rank)

    def _empty(self, batch: int, groups: int, rank: int) -> QuantizedTensor:
        return empty_quantized((batch, groups), rank, self.bits, self.group, self.device)

    # Storing: `SVDCacheLayer.update` / `append` with integer codes in place of float latents.
    def _encode(self, projection, states: torch.Tensor) -> QuantizedTensor:
        return quantize(projection.encode(states), self.bits, self.group)

    def _kept(self, name: str, new: QuantizedTensor, count: int) -> QuantizedTensor:
        stored, new = getattr(self, name), new.crop(count)
        fields = {}
        for field in _FIELDS:
            fields[field], self._buffers[name, field] = append_along(self._buffers.get((name, field)), getattr(stored, field), getattr(new, field))
        return QuantizedTensor(**fields, bits=stored.bits, group=stored.group, dim=stored.dim)

    def _all_latents(self, stored: QuantizedTensor, new: QuantizedTensor) -> torch.Tensor:
        # Dequantized straight to the projection's float32: no extra rounding to the model dtype on the way.
        return concat([stored, new]).dequantize(self.projection.key.up.dtype)

    # Sequence and batch operations: SVDCacheLayer's, with each op mapped over the codes, scales and zero points.
    def _map_latents(self, fn: Callable[[torch.Tensor], torch.Tensor], latents: QuantizedTensor) -> QuantizedTensor:
        return latents.apply(fn)

    def _crop_latents(self, latents: QuantizedTensor, length: int) -> QuantizedTensor:
        return latents.crop(length)

    def _latent_nbytes(self, name: str) -> int:
        latents = getattr(self, name)
        return sum(held_nbytes(getattr(latents, field), self._buffers.get((name, field))) for field in _FIELDS)
