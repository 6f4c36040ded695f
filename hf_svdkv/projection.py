"""A low-rank map between a group of KV heads and its latent: c = (x - center) @ down, x ≈ c @ up + center."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Projection:
    """One layer's keys or values. Shapes: down [G, g*d, r], up [G, r, g*d], center [G, g*d] for G groups of g heads.

    The center carries what a linear basis cannot: the k/v bias (Qwen2) or, for calibrated bases, the mean.
    `channel_bits` [r] (mixed-precision latents only, `bit_allocation`): the bit width each latent channel is stored
    at, non-increasing, as the channels' variances are.
    """

    down: torch.Tensor
    up: torch.Tensor
    center: torch.Tensor
    channel_bits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        groups, dim, rank = self.down.shape
        if self.up.shape != (groups, rank, dim) or self.center.shape != (groups, dim):
            raise ValueError(
                f"inconsistent projection shapes: down {tuple(self.down.shape)}, up {tuple(self.up.shape)}, "
                f"center {tuple(self.center.shape)}"
            )
        if self.channel_bits is not None and tuple(self.channel_bits.shape) != (rank,):
            raise ValueError(f"channel_bits of shape {tuple(self.channel_bits.shape)} for a projection of rank {rank}")

    @property
    def num_groups(self) -> int:
        return self.down.shape[0]

    @property
    def rank(self) -> int:
        """Latent dimensions per group."""
        return self.down.shape[2]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Projection:
        moved = (t.to(device=device, dtype=dtype) for t in (self.down, self.up, self.center))
        return Projection(*moved, self.channel_bits)

    @property
    def segments(self) -> list[tuple[int, int]]:
        """(bits, channels) of each run of equal widths, widest first; [] without `channel_bits`."""
        if self.channel_bits is None:
            return []
        widths, counts = torch.unique_consecutive(self.channel_bits, return_counts=True)
        return list(zip(widths.tolist(), counts.tolist(), strict=True))

    def encode(self, states: torch.Tensor) -> torch.Tensor:
        """[batch, kv_heads, seq, head_dim] -> latents [batch, groups, seq, rank], computed in the bases' dtype."""
        batch, heads, seq, head_dim = states.shape
        groups = self.num_groups
        grouped = states.to(self.down.dtype).reshape(batch, groups, heads // groups, seq, head_dim)
        grouped = grouped.transpose(2, 3).reshape(batch, groups, seq, -1)
        return (grouped - self.center[:, None, :]) @ self.down

    def decode(self, latents: torch.Tensor, head_dim: int) -> torch.Tensor:
        """Latents [batch, groups, seq, rank] -> [batch, kv_heads, seq, head_dim] in the bases' dtype."""
        batch, groups, seq, _ = latents.shape
        grouped = latents.to(self.up.dtype) @ self.up + self.center[:, None, :]
        grouped = grouped.reshape(batch, groups, seq, -1, head_dim).transpose(2, 3)
        return grouped.reshape(batch, -1, seq, head_dim)


@dataclass
class LayerBases:
    key: Projection
    value: Projection

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LayerBases:
        return LayerBases(self.key.to(device, dtype), self.value.to(device, dtype))
