"""Integer storage for latents: per-token quantization in groups of channels, and the Hadamard rotation that makes
low bit-widths work on them (Palu).

Each token's latent row is cut into groups of `group` channels (the last group is shorter when the rank is not a
multiple); a group stores `bits`-bit codes q with x ≈ q * scale + zero. Quantizing per token (never across tokens)
means a token's codes do not depend on which other tokens were quantized with it, so a sequence fed in one forward
and token by token is stored identically.

Codes are asymmetric (min/max, a scale and a zero point per group) or centred (`symmetric=True`: max |x|, a scale
alone, x ≈ (q - levels / 2) * scale). Centred codes span a wider range, so they err more at a given width (2 bits:
0.21 of the variance against 0.16), but at mixed precision's low widths the zero point is a third of a group's bytes
(2-bit codes of 32 channels: 8 bytes, plus 2 for the scale and 2 for the zero point), and the bytes it frees buy
more than the range costs: on the default eval 12x went from +13.8% to +8.2% and 16x from +33% to +23%. Mixed
latents (`quantize_runs`) are centred; uniform int4 / int8 latents keep their zero points.

Scales and zero points are float16, not bfloat16: latents are far inside float16's range (|x| < 65504), and its
8x finer mantissa keeps the rounding of the zero point, which shifts a whole group, small next to the step of
8-bit codes. Both are rounded outward (zero down, scale up) so [zero, zero + levels * scale] still covers the group
and the round-trip error stays within scale / 2 per element. A latent beyond float16's range would turn its group
non-finite (NaN logits) rather than raise: checking would sync the device on every step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .projection import Projection

BITS = (8, 4, 2, 1)  # 8 and 4 for uniform latents; mixed-precision latents also use 2 and 1 (`bit_allocation`)
SCALE_DTYPE = torch.float16


@dataclass
class QuantizedTensor:
    """Codes of a [..., seq, dim] tensor: `data` uint8 [..., seq, ceil(dim * bits / 8)] (8 / bits codes per byte,
    the first in the lowest bits), `scale` and `zero` float16 [..., seq, ceil(dim / group)]; `zero` None for centred
    codes, whose zero point is -levels / 2 * scale."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group: int
    dim: int

    @property
    def shape(self) -> torch.Size:
        """The logical shape: that of the tensor it stands for."""
        return torch.Size((*self.data.shape[:-1], self.dim))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedTensor:
        """`fn` applied to data, scales and zeros alike: valid for any op that leaves the last dim alone
        (batch selection, repetition, device moves, slicing the sequence)."""
        zero = None if self.zero is None else fn(self.zero)
        return QuantizedTensor(fn(self.data), fn(self.scale), zero, self.bits, self.group, self.dim)

    def crop(self, length: int) -> QuantizedTensor:
        """The first `length` tokens (along dim -2)."""
        return self.apply(lambda t: t[..., :length, :])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero) if t is not None)

    def zero_points(self) -> torch.Tensor:
        """float32 zero points [..., seq, groups] (centred codes: `_centred_offset`)."""
        if self.zero is not None:
            return self.zero.to(torch.float32)
        return _centred_offset(self.scale.to(torch.float32), 2**self.bits - 1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # Computed in float32: q * scale is exact there (≤ 8 + 11 significant bits), so only the final add rounds.
        codes = _unpack(self.data, self.bits, self.dim).to(torch.float32)
        scale = self.scale.to(torch.float32).repeat_interleave(self.group, dim=-1)[..., : self.dim]
        zero = self.zero_points().repeat_interleave(self.group, dim=-1)[..., : self.dim]
        return (codes * scale + zero).to(dtype)


def empty_quantized(leading: Sequence[int], dim: int, bits: int, group: int, device: torch.device) -> QuantizedTensor:
    """An asymmetric quantized tensor of shape [*leading, 0, dim]: what a cache layer starts from."""
    data = torch.empty((*leading, 0, _packed_dim(dim, bits)), dtype=torch.uint8, device=device)
    scale = torch.empty((*leading, 0, math.ceil(dim / group)), dtype=SCALE_DTYPE, device=device)
    return QuantizedTensor(data, scale, scale.clone(), bits, group, dim)


@dataclass
class QuantizedRuns:
    """Centred codes of a [..., seq, dim] tensor whose channels come in runs at their own width (`quantize_runs`):
    per token, one row of bytes and one of scales, each the runs' own in channel order. `runs` views them as one
    QuantizedTensor per run; a cache appends and crops two tensors, however many runs there are."""

    data: torch.Tensor  # [..., seq, sum of the runs' packed bytes]
    scale: torch.Tensor  # [..., seq, sum of the runs' groups]
    widths: tuple[tuple[int, int], ...]  # (bits, channels) of each run
    group: int

    @property
    def runs(self) -> tuple[QuantizedTensor, ...]:
        runs, first_byte, first_group = [], 0, 0
        for bits, width in self.widths:
            packed, groups = _packed_dim(width, bits), math.ceil(width / self.group)
            data = self.data[..., first_byte : first_byte + packed]
            scale = self.scale[..., first_group : first_group + groups]
            runs.append(QuantizedTensor(data, scale, None, bits, self.group, width))
            first_byte, first_group = first_byte + packed, first_group + groups
        return tuple(runs)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.data.shape[:-1], sum(width for _, width in self.widths)))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([run.dequantize(torch.float32) for run in self.runs], dim=-1).to(dtype)


def empty_quantized_runs(
    leading: Sequence[int], widths: Sequence[tuple[int, int]], group: int, device: torch.device
) -> QuantizedRuns:
    """Quantized runs of shape [*leading, 0, dim]: what a cache layer starts from."""
    packed = sum(_packed_dim(width, bits) for bits, width in widths)
    groups = sum(math.ceil(width / group) for _, width in widths)
    data = torch.empty((*leading, 0, packed), dtype=torch.uint8, device=device)
    scale = torch.empty((*leading, 0, groups), dtype=SCALE_DTYPE, device=device)
    return QuantizedRuns(data, scale, tuple(widths), group)


def quantize(x: torch.Tensor, bits: int, group: int = 32, *, symmetric: bool = False) -> QuantizedTensor:
    """Round-to-nearest codes of `x` [..., dim] per group of `group` channels of each row: asymmetric (min/max, a
    scale and a zero point) or centred (`symmetric`: max |x|, a scale alone)."""
    _check(((bits, x.shape[-1]),), group, x.shape[-1])
    dim = x.shape[-1]
    groups = math.ceil(dim / group)
    x = x.to(torch.float32)
    # Pad the last group by repeating the row's last channel: it changes neither that group's min nor its max.
    padded = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], groups * group - dim)], dim=-1)
    codes, scale, zero = _round_to_grid(padded.unflatten(-1, (groups, group)), 2**bits - 1, symmetric)
    return QuantizedTensor(_pack(codes.flatten(-2)[..., :dim], bits), scale, zero, bits, group, dim)


# Rows (tokens) up to which `quantize_runs` takes every run in one pass; above, a pass per run is faster (its ops
# are then large, and it needs no gathers).
FEW_ROWS = 256


def quantize_runs(x: torch.Tensor, runs: Sequence[tuple[int, int]], group: int = 32) -> QuantizedRuns:
    """Centred `quantize` of each run of channels of `x` [..., dim] at its own width: `runs` = (bits, channels) in
    channel order, adding up to dim. The codes are those `quantize(..., symmetric=True)` gives each run alone. Up to
    FEW_ROWS rows (a decoding step quantizes one token) every group of every run goes through one pass of max |x| and
    rounding, and every run is packed by one gather: the per-op cost, not the arithmetic, is what a pass per run would
    multiply."""
    _check(runs, group, x.shape[-1])
    if x.numel() > FEW_ROWS * x.shape[-1]:
        split = x.split([width for _, width in runs], -1)
        parts = [quantize(part, bits, group, symmetric=True) for part, (bits, _) in zip(split, runs, strict=True)]
        data, scale = (torch.cat([getattr(p, name) for p in parts], -1) for name in ("data", "scale"))
        return QuantizedRuns(data, scale, tuple(runs), group)
    gather, levels, sources, shifts = _run_layout(tuple(runs), group, x.device)
    # torch.gather, not index_select: along the last dim the latter is several times slower on CPU.
    x = x.to(torch.float32)
    grouped = torch.gather(x, -1, gather.expand(*x.shape[:-1], -1)).unflatten(-1, (-1, group))
    codes, scale, _ = _round_to_grid(grouped, levels, symmetric=True)
    codes = codes.flatten(-2)
    # Each byte gathers its 8 / bits codes (a code past a run's last channel reads the 0 appended here), each shifted
    # to its bits, and adds them up: their bits do not overlap.
    codes = torch.cat([codes, codes.new_zeros((*codes.shape[:-1], 1))], dim=-1)
    slots = torch.gather(codes, -1, sources.expand(*codes.shape[:-1], -1)).unflatten(-1, (-1, 8))
    data = slots.bitwise_left_shift_(shifts).sum(-1, dtype=torch.uint8)
    return QuantizedRuns(data, scale, tuple(runs), group)


def _check(runs: Sequence[tuple[int, int]], group: int, dim: int) -> None:
    for bits, _ in runs:
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if group <= 0:
        raise ValueError(f"group must be a positive number of channels, got {group!r}")
    if sum(width for _, width in runs) != dim:
        raise ValueError(f"runs {list(runs)} do not add up to the {dim} channels of the tensor")


def _round_to_grid(
    grouped: torch.Tensor, levels: int | torch.Tensor, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(uint8 codes, float16 scales, float16 zero points or None when `symmetric`) of float32 groups [...,
    groups, group] on grids of `levels` steps (a number, or one per group [groups])."""
    if symmetric:
        # The grid -levels / 2 .. levels / 2 steps covers [-max |x|, max |x|]: scale rounded up, so no code clips.
        span = grouped.abs().amax(-1) * 2 / levels
        zero = None
    else:
        zero = _round_toward(grouped.amin(-1), -math.inf)
        span = (grouped.amax(-1) - zero.to(torch.float32)) / levels
    # The smallest normal float16 keeps a constant group (max == zero) from dividing by 0; its codes are then 0.
    scale = _round_toward(span, math.inf).clamp_min(torch.finfo(SCALE_DTYPE).smallest_normal)
    scale32 = scale.to(torch.float32)
    offset = _centred_offset(scale32, levels) if symmetric else zero.to(torch.float32)
    codes = ((grouped - offset[..., None]) / scale32[..., None]).round_().clamp_(min=0)
    return codes.clamp_(max=levels if isinstance(levels, int) else levels[:, None]).to(torch.uint8), scale, zero


def _centred_offset(scale: torch.Tensor, levels: int | torch.Tensor) -> torch.Tensor:
    """The zero point of centred codes, -levels / 2 * scale (float32 scales [..., groups]): exact in float32 (≤ 8 + 11
    significant bits), so q * scale + offset is exactly (q - levels / 2) * scale. The CPU kernel computes the same."""
    return scale * (-levels / 2)


@functools.cache
def _run_layout(
    runs: tuple[tuple[int, int], ...], group: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """How `quantize_runs` lays out its runs: (the channel each slot of the grouped runs reads [groups * group], the
    code levels of each group [groups], the slot of the grouped codes each of a byte's 8 code positions reads
    [bytes * 8], and its shift [bytes, 8]). A run's last group is padded by repeating the run's last channel (it
    changes neither that group's min nor its max); a byte's positions past its run's channels read the zero code
    after the last slot, as are those past 8 / bits."""
    gather, levels, sources, shifts, first = [], [], [], [], 0
    zero_slot = sum(math.ceil(width / group) for _, width in runs) * group
    for bits, width in runs:
        groups = math.ceil(width / group)
        slot0 = len(gather)
        gather += [first + min(slot, width - 1) for slot in range(groups * group)]
        levels += [2**bits - 1] * groups
        for byte in range(_packed_dim(width, bits)):
            channels = [byte * (8 // bits) + k for k in range(8 // bits)]
            sources += [slot0 + c if c < width else zero_slot for c in channels] + [zero_slot] * (8 - len(channels))
            shifts += [k * bits for k in range(8 // bits)] + [0] * (8 - len(channels))
        first += width
    return (
        torch.tensor(gather, dtype=torch.long, device=device),
        torch.tensor(levels, dtype=torch.float32, device=device),
        torch.tensor(sources, dtype=torch.long, device=device),
        torch.tensor(shifts, dtype=torch.uint8, device=device).view(-1, 8),
    )


def concat(tensors: Sequence[QuantizedTensor]) -> QuantizedTensor:
    """Join along the sequence dim (-2); all must share bits, group and dim."""
    first = tensors[0]
    if any(
        (t.bits, t.group, t.dim, t.zero is None) != (first.bits, first.group, first.dim, first.zero is None)
        for t in tensors
    ):
        raise ValueError("cannot concatenate quantized tensors of different bits, group, dim or kind of codes")
    data, scale = (torch.cat([getattr(t, name) for t in tensors], -2) for name in ("data", "scale"))
    zero = None if first.zero is None else torch.cat([t.zero for t in tensors], -2)
    return QuantizedTensor(data, scale, zero, first.bits, first.group, first.dim)


def _round_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """float32 -> float16, rounded toward `direction` (±inf) instead of to nearest where they differ."""
    nearest = x.to(SCALE_DTYPE)
    wrong_side = nearest.to(x.dtype) < x if direction > 0 else nearest.to(x.dtype) > x
    return torch.where(wrong_side, torch.nextafter(nearest, torch.full_like(nearest, direction)), nearest)


def _packed_dim(dim: int, bits: int) -> int:
    return math.ceil(dim * bits / 8)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:  # a row that does not fill its last byte gets zero codes there
        codes = torch.nn.functional.pad(codes, (0, per_byte - codes.shape[-1] % per_byte))
    codes = codes.unflatten(-1, (-1, per_byte))
    packed = codes[..., 0].clone()
    for slot in range(1, per_byte):
        packed |= codes[..., slot] << (slot * bits)
    return packed


def _unpack(data: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    if bits == 8:
        return data
    mask = (1 << bits) - 1
    slots = [(data >> (slot * bits)) & mask for slot in range(8 // bits)]
    return torch.stack(slots, dim=-1).flatten(-2)[..., :dim]


# --- Hadamard rotation ---------------------------------------------------------------------------------------------
def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An orthogonal n x n matrix that spreads each coordinate evenly over a block of coordinates.

    For n a power of two it is the normalised Sylvester-Walsh-Hadamard matrix (symmetric, entries ±1/√n). For other n
    it is block-diagonal, one Sylvester block per power of two in n's binary expansion, largest first (48 = 32 + 16):
    orthogonal for every n, and its blocks line up with quantization groups of a power-of-two size (group 32 on rank
    48 gives blocks and groups [0, 32) and [32, 48)), so an outlier is still spread over the group that quantizes it.
    """
    if n <= 0:
        raise ValueError(f"hadamard needs a positive size, got {n}")
    blocks, remaining = [], n
    while remaining:
        size = 1 << (remaining.bit_length() - 1)
        blocks.append(_sylvester(size))
        remaining -= size
    return torch.block_diag(*blocks).to(dtype)


def _sylvester(n: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / math.sqrt(n)


def rotate_projection(projection: Projection, blocks: Sequence[int] | None = None) -> Projection:
    """The same projection with latents rotated by H = hadamard(rank): down' = down H, up' = Hᵀ up. With `blocks`
    (channel counts summing to the rank) H is block-diagonal, one `hadamard` per block: mixed-precision latents
    rotate each bit width's channels among themselves, so the variance ordering the widths follow is kept.

    H is orthogonal, so c' Hᵀ up = c up and reconstructions are unchanged; only the latents' coordinates move, and
    rotated latents have no outlier channel for a group's scale to stretch over. Folded once into the bases, it
    costs nothing per token. Computed in float64, returned in the projection's dtype."""
    rotation = torch.block_diag(*(hadamard(n) for n in (blocks or [projection.rank]))).to(projection.down.device)
    down = (projection.down.to(torch.float64) @ rotation).to(projection.down.dtype)
    up = (rotation.mT @ projection.up.to(torch.float64)).to(projection.up.dtype)
    return dataclasses.replace(projection, down=down, up=up)
