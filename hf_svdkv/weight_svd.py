"""Data-free bases: the top left singular vectors of each group's stacked W_k (or W_v)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .projection import LayerBases, Projection


def grouped_weight(linear: nn.Linear, group_size: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [G, g*d, hidden] and bias [G, g*d] (zeros without bias) of a k/v projection, in float64."""
    weight = linear.weight.detach().to(torch.float64)
    out_features, hidden = weight.shape
    groups = out_features // (group_size * head_dim)
    bias = linear.bias.detach().to(torch.float64) if linear.bias is not None else weight.new_zeros(out_features)
    return weight.reshape(groups, group_size * head_dim, hidden), bias.reshape(groups, group_size * head_dim)


@contextmanager
def single_threaded() -> Iterator[None]:
    """MKL's threaded eigh/svd on small matrices slows down 100x or more when another process holds a core
    (measured: 0.02 s -> 6 s per call on 2 busy cores); these matrices are small enough for one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def top_singular_basis(matrix: torch.Tensor, rank: int, center: torch.Tensor) -> Projection:
    """Orthonormal basis of the `rank` leading left singular vectors of each group's matrix [G, D, n]."""
    # The left singular vectors of W are the eigenvectors of W Wᵀ [D, D]: no n x n factor is computed, and a
    # group wider than the hidden size still gets a complete orthonormal basis at full rank (float64 throughout).
    with single_threaded():
        _, eigenvectors = torch.linalg.eigh(matrix.to(torch.float64) @ matrix.to(torch.float64).transpose(1, 2))
    basis = eigenvectors.flip(-1)[..., :rank].contiguous()
    return Projection(down=basis.float(), up=basis.transpose(1, 2).contiguous().float(), center=center.float())


class WeightSVD:
    """k = W_k x + b lies in span(W_k) + b, so W_k's leading singular vectors keep the most of it per unit rank
    when x is isotropic. Real activations are not, which is what calibrated bases fix."""

    name = "weights"

    def fit(self, layer_idx: int, attention: nn.Module, key_rank: int, value_rank: int, group_size: int) -> LayerBases:
        head_dim = attention.head_dim
        projections = []
        for linear, rank in ((attention.k_proj, key_rank), (attention.v_proj, value_rank)):
            weight, bias = grouped_weight(linear, group_size, head_dim)
            projections.append(top_singular_basis(weight, rank, bias))
        return LayerBases(*projections)
