"""RoPE for keys rebuilt from latents: each cached token is rotated at the position it was written at.

RoPE does not commute with a low-rank projection, so keys are stored before it and rotated when read. Here the pairs
(x1_i, x2_i) of a head are complex numbers and RoPE a multiplication by cos + i sin, one pass instead of rotate_half's
four; the factors come from the model's own rotary module, so every rope type and its scaling match the stock model.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import nn

# rope types whose frequencies depend on the sequence length: the rotary module itself must compute them.
_DYNAMIC_ROPE = ("dynamic", "longrope")
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def interleave(x: torch.Tensor) -> torch.Tensor:
    """[..., d] in rotate-half order (x1 | x2) -> (x1_0, x2_0, x1_1, x2_1, ...): pairs become complex numbers."""
    half = x.shape[-1] // 2
    return torch.stack([x[..., :half], x[..., half:]], dim=-1).flatten(-2)


def rotate(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """x [..., d] interleaved float32, rotated in place and returned; factors [..., d/2] complex, broadcast to x."""
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(factors)).flatten(-2)


def is_dynamic(rotary: nn.Module) -> bool:
    """Whether the rope type's frequencies depend on the sequence length (kernels cannot compute them)."""
    return any(kind in str(getattr(rotary, "rope_type", "default")) for kind in _DYNAMIC_ROPE)


def rope_factors(rotary: nn.Module, positions: torch.Tensor, memo_key: object | None = None) -> torch.Tensor:
    """cos + i sin of every position [batch, seq, head_dim / 2], complex64, from the model's rotary module.

    Every layer of a cache holds the same positions, so with `memo_key` (any object that lives for one forward, such
    as that forward's `position_embeddings[0]`) the first layer computes them and the others reuse them. The next
    forward's positions usually extend these by a token: then only the new positions are computed (unless the rope
    type's frequencies depend on the sequence length)."""
    memo = _MEMO.get(rotary)
    if memo is not None and memo_key is not None and memo[0] is memo_key and memo[2].shape[:2] == positions.shape:
        return memo[2]
    known = 0
    if memo is not None and memo_key is not None and not is_dynamic(rotary):
        previous = memo[1]
        length = previous.shape[-1]
        if (
            previous.shape[0] == positions.shape[0]
            and length <= positions.shape[-1]
            and previous.device == positions.device
            and torch.equal(previous, positions[:, :length])
        ):
            known = length
    dummy = torch.empty(0, device=positions.device, dtype=torch.float32)  # only its device and dtype are read
    cos, sin = rotary(dummy, positions[:, known:])
    half = cos.shape[-1] // 2
    factors = torch.complex(cos[..., :half].float(), sin[..., :half].float())
    if known:
        factors = torch.cat([memo[2][:, :known], factors], dim=1)
    if memo_key is not None:
        _MEMO[rotary] = (memo_key, positions, factors)
    return factors


class Rope:
    """The rotation of one forward's cached positions [batch, seq], computed when first asked for."""

    def __init__(self, rotary: nn.Module, positions: torch.Tensor, memo_key: object | None = None):
        self.rotary, self.positions, self.memo_key = rotary, positions, memo_key

    @functools.cached_property
    def factors(self) -> torch.Tensor:
        """cos + i sin of every position [batch, seq, head_dim / 2]."""
        return rope_factors(self.rotary, self.positions, self.memo_key)

    def at(self, index: torch.Tensor) -> torch.Tensor:
        """The factors of the tokens `index` [n] (computed alone unless all of them already are)."""
        if "factors" in self.__dict__:
            return self.factors[:, index]
        return rope_factors(self.rotary, self.positions[:, index])
