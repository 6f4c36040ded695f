"""`SVDCompressionAlgorithm`: the best rank-r approximation of a matrix (or a batch of them), A ≈ U_r (U_rᵀ A).

All that is needed is U_r, the top-r left singular subspace, and there are three ways to it: a full SVD; the Gram
route (eigenvectors of the smaller of AAᵀ / AᵀA, in float64), which needs only a min(m, n)² matrix; and a
randomized range finder (Halko, Martinsson & Tropp), which needs only (m + n)·(r + oversampling) numbers and is
used for ranks well below the matrix size. Both memory-efficient routes are deterministic (a seeded generator).

`WeightBasis` fits the core's weight-only bases (top left singular vectors of each group's W_k / W_v, exactly what
`WeightSVD` computes) with one of these routes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..projection import LayerBases, Projection
from ..weight_svd import grouped_weight

# Below this fraction of min(m, n), the randomized range finder is cheaper than forming a Gram matrix.
RANDOMIZED_RANK_FRACTION = 0.25


@dataclass
class LowRankFactors:
    """A ≈ left @ right: left [..., m, r] has orthonormal columns (U_r), right [..., r, n] is U_rᵀ A (= S_r V_rᵀ)."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[-1]

    def reconstruct(self) -> torch.Tensor:
        return self.left @ self.right

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.left, self.right))


def _check(matrix: object, rank: object) -> None:
    if isinstance(matrix, dict):
        raise TypeError(
            "compress_matrix takes one tensor, got a dict (get_attention_weights returns one per projection): "
            "pass e.g. weights['v_proj']"
        )
    if not isinstance(matrix, torch.Tensor) or matrix.dim() < 2 or not matrix.is_floating_point():
        raise TypeError(
            f"compress_matrix needs a floating-point tensor with at least 2 dims, got {type(matrix).__name__}"
        )
    if matrix.numel() == 0:
        raise ValueError(f"cannot compress an empty matrix of shape {tuple(matrix.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")


def _top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Eigenvectors of the `rank` largest eigenvalues of symmetric PSD matrices [..., k, k], largest first."""
    _, vectors = torch.linalg.eigh(gram)  # ascending
    return vectors[..., -rank:].flip(-1)


class SVDCompressionAlgorithm:
    """Truncated SVD of matrices [..., m, n].

    Args:
        use_memory_efficient: default route: Gram or randomized (True) instead of a full SVD (False).
        oversampling, power_iterations: randomized range finder settings (more = closer to the exact SVD).
        seed: seed of the randomized range finder's test matrix.
    """

    def __init__(
        self, use_memory_efficient: bool = True, oversampling: int = 8, power_iterations: int = 2, seed: int = 0
    ):
        self.use_memory_efficient = use_memory_efficient
        self.oversampling = oversampling
        self.power_iterations = power_iterations
        self.seed = seed

    def method(self, shape: tuple[int, ...], rank: int, use_memory_efficient: bool | None = None) -> str:
        """The route `factorize` takes for a matrix of `shape`: "exact" (nothing to drop), "full", "gram" or
        "randomized"."""
        memory_efficient = self.use_memory_efficient if use_memory_efficient is None else use_memory_efficient
        small = min(shape[-2:])
        if rank >= small:
            return "exact"
        if not memory_efficient:
            return "full"
        return "randomized" if rank + self.oversampling < RANDOMIZED_RANK_FRACTION * small else "gram"

    def left_basis(self, matrix: torch.Tensor, rank: int, use_memory_efficient: bool | None = None) -> torch.Tensor:
        """Orthonormal U_r [..., m, min(rank, m, n)]: the leading left singular vectors (float32 or wider)."""
        _check(matrix, rank)
        a = matrix.detach().to(torch.promote_types(matrix.dtype, torch.float32))
        m, n = a.shape[-2:]
        method = self.method(tuple(a.shape), rank, use_memory_efficient)
        if (
            method == "exact"
        ):  # the whole column space: I for a wide matrix, an orthonormal basis of A's columns if tall
            if m <= n:
                return torch.eye(m, dtype=a.dtype, device=a.device).expand(*a.shape[:-2], m, m).clone()
            return torch.linalg.qr(a)[0]
        if method == "full":
            return torch.linalg.svd(a, full_matrices=False)[0][..., :rank]
        if method == "gram":
            a64 = a.double()
            if m <= n:
                return _top_eigenvectors(a64 @ a64.mT, rank).to(a.dtype)
            # Tall: right vectors from the small AᵀA, then A V_r = U_r S_r orthonormalised.
            return torch.linalg.qr(a64 @ _top_eigenvectors(a64.mT @ a64, rank))[0].to(a.dtype)
        return self._randomized_basis(a, rank)

    def factorize(self, matrix: torch.Tensor, rank: int, use_memory_efficient: bool | None = None) -> LowRankFactors:
        """U_r and U_rᵀ A: the factors of the best rank-`rank` approximation."""
        left = self.left_basis(matrix, rank, use_memory_efficient)
        a = matrix.detach().to(left.dtype)
        return LowRankFactors(left, left.mT @ a)

    def compress_matrix(
        self, matrix: torch.Tensor, rank: int, use_memory_efficient: bool | None = None
    ) -> torch.Tensor:
        """The best rank-`rank` approximation of `matrix` (same shape and dtype): its truncated SVD."""
        return self.factorize(matrix, rank, use_memory_efficient).reconstruct().to(matrix.dtype)

    @staticmethod
    def relative_error(matrix: torch.Tensor, approximation: torch.Tensor) -> float:
        """‖A − Â‖_F / ‖A‖_F."""
        a = matrix.detach().double()
        return ((a - approximation.detach().double()).norm() / a.norm().clamp_min(1e-300)).item()

    def _randomized_basis(self, a: torch.Tensor, rank: int) -> torch.Tensor:
        generator = torch.Generator(device=a.device).manual_seed(self.seed)
        sketch = min(rank + self.oversampling, min(a.shape[-2:]))
        omega = torch.randn(*a.shape[:-2], a.shape[-1], sketch, generator=generator, device=a.device, dtype=a.dtype)
        q = torch.linalg.qr(a @ omega)[0]
        for _ in range(self.power_iterations):  # subspace iteration sharpens a slowly decaying spectrum
            q = torch.linalg.qr(a @ torch.linalg.qr(a.mT @ q)[0])[0]
        core = (q.mT @ a).double()  # [sketch, n]: its left vectors via the tiny Gram matrix
        return q @ _top_eigenvectors(core @ core.mT, rank).to(a.dtype)


class WeightBasis:
    """The core's weight-only bases (`WeightSVD`: top left singular vectors of each group's W_k, W_v; the k/v bias
    as center), computed by an `SVDCompressionAlgorithm` route. A `BasisAlgorithm` for `SVDBases.from_model`."""

    name = "weights"

    def __init__(self, algorithm: SVDCompressionAlgorithm):
        self.algorithm = algorithm

    def fit(self, layer_idx: int, attention: nn.Module, key_rank: int, value_rank: int, group_size: int) -> LayerBases:
        projections = []
        for linear, rank in ((attention.k_proj, key_rank), (attention.v_proj, value_rank)):
            weight, bias = grouped_weight(linear, group_size, attention.head_dim)
            if rank > min(weight.shape[-2:]):  # more dims than W has rank (a group wider than hidden): complete it
                basis = torch.linalg.svd(weight, full_matrices=True)[0][..., :rank].float()
            else:
                basis = self.algorithm.left_basis(weight, rank).float()
            projections.append(Projection(down=basis.contiguous(), up=basis.mT.contiguous(), center=bias.float()))
        return LayerBases(*projections)
