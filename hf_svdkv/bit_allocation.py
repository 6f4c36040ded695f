"""Spend a byte budget over latent channels: a bit width per channel (`CompressionConfig(latent_bits="mixed")`).

A basis sorts its latent channels by variance λ_i (keys in key space, values in the output metric). Storing channel i at
b bits leaves an expected squared error λ_i·f(b), where f is the relative error of the quantizer (`quantize`: centred
codes over max |x| per token and group of channels, Hadamard-rotated so channels look Gaussian) and f(0) = 1 (not
stored). The rate-distortion optimum for Gaussian sources spends about ½·log2(λ_i/θ) bits on channel i and none below
the water line θ (reverse water-filling); with a few widths to choose from, the discrete version is a greedy over steps
between widths, best error removed per byte first. Widths off the lower convex hull of (bytes, f) never pay (1-bit codes
over the whole range err more than not storing the channel), so the hull's steps are the only ones bought, and as their
gains only fall, the greedy is optimal up to the last step that does not fit. A range clipped to the least squared error
per group cuts f by a third at 2 bits and puts 1-bit codes on the hull, yet scored worse on the default model
(docs/mixed.md: it clips the tails that decide attention), so `quantize` keeps the whole range. Centred codes need no
zero point: 2 bytes per group rather than 4 (`quantization`).

Items (a layer's keys or values) are weighted as in `allocation`: relative energy, times measured sensitivity when
the calibration measured it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

from .allocation import (
    QUANT_GROUP,
    LayerSpectrum,
    StorageCost,
    _gains,
    latent_bytes_budget,
    storage_cost,
    weight_spectra,
)
from .architectures import model_geometry
from .compression_config import CompressionConfig

WIDTHS = (0, 1, 2, 4, 8)
MIN_CHANNELS = 8  # every layer's keys and values keep at least this many channels (a rank of 0 is no basis)
SCALE_BYTES = 2  # a float16 scale per token and group of QUANT_GROUP channels (centred codes: no zero point)


@functools.cache
def relative_error(bits: int) -> float:
    """f(bits): the quantizer's mean squared error over the variance, measured on Gaussian channels (0 bits: 1)."""
    if bits == 0:
        return 1.0
    from .quantization import quantize

    sample = torch.randn(8192, QUANT_GROUP, generator=torch.Generator().manual_seed(0))
    error = quantize(sample, bits, QUANT_GROUP, symmetric=True).dequantize() - sample
    return (error.square().mean() / sample.square().mean()).item()


def channel_bytes(bits: int) -> float:
    """Bytes per token one channel of one group costs at `bits`, its share of a scale included."""
    return bits / 8 + (SCALE_BYTES / QUANT_GROUP if bits else 0.0)


@functools.cache
def hull_steps() -> tuple[tuple[int, int], ...]:
    """The widths worth stepping between, (from, to): the lower convex hull of (channel_bytes, relative_error)."""
    points = [(channel_bytes(b), relative_error(b), b) for b in WIDTHS]
    hull: list[tuple[float, float, int]] = []
    for point in points:
        if hull and point[1] >= hull[-1][1]:
            continue  # more bytes, no less error
        # Drop the last hull point while it lies on or above the segment from the one before it to this point.
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            if (y1 - y0) * (point[0] - x0) >= (point[1] - y0) * (x1 - x0):
                hull.pop()
            else:
                break
        hull.append(point)
    return tuple((a[2], b[2]) for a, b in zip(hull, hull[1:], strict=False))


def segment_parts(widths: Sequence[int]) -> tuple[int, int]:
    """(packed code bytes, scale bytes) per token of one group's channels stored at `widths` (non-increasing): a scale
    per started group of each run of equal widths, as `MixedLatentStore` holds them."""
    codes = scales = 0
    for bits in set(widths) - {0}:
        count = sum(1 for w in widths if w == bits)
        codes += math.ceil(count * bits / 8)
        scales += SCALE_BYTES * math.ceil(count / QUANT_GROUP)
    return codes, scales


def segment_bytes(widths: Sequence[int]) -> int:
    """Bytes per token of one group's channels stored at `widths`: codes and scales (`segment_parts`)."""
    return sum(segment_parts(widths))


def allocate_bits(
    spectra: Sequence[LayerSpectrum],
    target_ratio: float,
    weights: Sequence[tuple[float, float]] | None = None,
    cost: StorageCost | None = None,
) -> list[tuple[list[int], list[int]]]:
    """(key widths, value widths) per layer: a bit width per latent channel (non-increasing, zeros dropped) whose
    bytes, with the positions and `cost`'s window, make the cache `target_ratio` times smaller than a 16-bit one."""
    cost = cost or StorageCost()
    gains = _gains(spectra, weights)
    groups = [s.key.shape[0] for s in spectra for _ in range(2)]
    latent_budget = latent_bytes_budget(spectra, target_ratio, cost)
    if latent_budget is None:
        raise ValueError(f"target_ratio {target_ratio}: the window holds every token, no bytes are left for latents")
    steps = hull_steps()
    first = steps[0][1]

    def exact_bytes(widths: list[tuple[list[int], list[int]]]) -> int:
        return sum(segment_bytes(w) * groups[2 * layer] for layer, pair in enumerate(widths) for w in pair)

    # The greedy prices a scale as a share per channel; each run of equal widths really pays for
    # whole groups of channels. Bisect the greedy's budget for the largest whose exact bytes fit.
    def fitting(budget: float) -> list[tuple[list[int], list[int]]] | None:
        try:
            widths = _spend(gains, groups, steps, first, budget)
        except ValueError:  # not even the minimum channels
            return None
        return widths if exact_bytes(widths) <= latent_budget else None

    best = fitting(latent_budget)
    # From the least budget the greedy accepts (the minimum channels at their priced bytes) up.
    low = sum(channel_bytes(first) * groups[i] * min(MIN_CHANNELS, len(gain)) for i, gain in enumerate(gains))
    high = latent_budget
    for _ in range(30 if best is None else 0):
        middle = (low + high) / 2
        if (widths := fitting(middle)) is not None:
            best, low = widths, middle
        else:
            high = middle
    if best is None:
        raise ValueError(
            f"target_ratio {target_ratio} is beyond reach with mixed-precision latents: {MIN_CHANNELS} {first}-bit "
            "channels in every layer's keys and values already take more bytes"
        )
    return best


def _spend(
    gains: list[torch.Tensor],
    groups: list[int],
    steps: tuple[tuple[int, int], ...],
    first: int,
    budget: float,
) -> list[tuple[list[int], list[int]]]:
    """The greedy: every (item, channel, step) by error removed per byte, bought in that order while they fit. A
    channel's steps come in order by themselves: on the hull each step removes less error per byte than the last."""
    sizes = [len(g) for g in gains]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    floor = [min(MIN_CHANNELS, size) for size in sizes]
    spent = sum(channel_bytes(first) * groups[i] * floor[i] for i in range(len(gains)))
    if spent > budget:
        raise ValueError(
            f"the budget leaves no room for {MIN_CHANNELS} {first}-bit channels in every layer's keys and values"
        )
    values, prices, channels, widths_to = [], [], [], []
    for item, gain in enumerate(gains):
        index = torch.arange(len(gain)) + offsets[item]
        for order, (low, high) in enumerate(steps):
            price = (channel_bytes(high) - channel_bytes(low)) * groups[item]
            keep = slice(floor[item] if order == 0 else 0, None)  # the floor's first step is already bought
            values.append(gain[keep].double() * (relative_error(low) - relative_error(high)) / price)
            prices.append(torch.full_like(values[-1], price))
            channels.append(index[keep])
            widths_to.append(torch.full_like(index[keep], high))
    value, price, channel, width = (torch.cat(t) for t in (values, prices, channels, widths_to))
    order = torch.argsort(-value, stable=True)
    bought = int(
        torch.searchsorted(price[order].cumsum(0), torch.tensor(budget - spent, dtype=price.dtype), right=True)
    )
    chosen = torch.zeros(offsets[-1], dtype=torch.long)
    for item in range(len(gains)):
        chosen[offsets[item] : offsets[item] + floor[item]] = first
    chosen.scatter_reduce_(0, channel[order[:bought]], width[order[:bought]], reduce="amax")
    result = []
    for layer in range(len(gains) // 2):
        pair = []
        for item in (2 * layer, 2 * layer + 1):
            ordered = sorted(chosen[offsets[item] : offsets[item + 1]].tolist(), reverse=True)
            pair.append([b for b in ordered if b])  # larger widths to larger variances (rearrangement)
        result.append((pair[0], pair[1]))
    return result


def weight_spectrum_widths(
    model: nn.Module, config: CompressionConfig, sequence_length: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Channel widths per layer for weight-only bases with latent_bits="mixed", allocated on the weight spectra."""
    geometry = model_geometry(model)
    config.resolve_ranks(geometry.head_dim, geometry.num_kv_heads)
    spectra = weight_spectra(model, config.heads_per_group(geometry.num_kv_heads))
    return allocate_bits(spectra, config.target_ratio, cost=storage_cost(config, sequence_length))
