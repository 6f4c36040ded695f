"""Calibrated bases: PCA of the keys a model really produces, and of its values in the metric o_proj sees.

Keys and values are linear in the attention input x (k = W_k x + b_k), so the mean and covariance of x per
layer, gathered once, give the exact key and value covariances for any grouping of heads: no activations
are stored. Values are compressed for what reaches the residual stream: an error e in KV head h moves the
output by e W_o,jᵀ for every query head j reading h, so its cost is e M eᵀ with M = Σ_j W_o,jᵀ W_o,j.
PCA in that metric (whiten by L = M^½, PCA, unwhiten) is the optimal rank-r value basis for it.
Tokens at position 0 get extra weight in both PCAs: the first token is an attention sink (CalibratedPCA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import (
    SIXTEEN_BIT,
    LayerSpectrum,
    StorageCost,
    allocate_ranks,
    measure_sensitivity,
    sensitivity_weights,
    single_threaded,
    storage_cost,
    uniform_ranks,
)
from .architectures import attention_modules, decoder_model, model_geometry
from .compression_config import CompressionConfig
from .projection import LayerBases, Projection
from .weight_svd import grouped_weight

VALUE_METRICS = ("output", "plain")
KEY_METRICS = ("plain", "query")  # Calibrator(key_metric=...): see its docstring
# Query-aware key metric: the distances (query position - key position) it averages the rotary rotation over. Keys
# closer than the default window are read exact; 8,192 tokens span the default model's positions.
KEY_METRIC_DISTANCES = (32, 8192, 16)
ALLOCATIONS = ("sensitivity", "spectrum", "uniform")
# M is a sum of Gram matrices of o_proj columns, positive definite in practice; the ridge (relative to its mean
# eigenvalue) only guards the inverse square root against a degenerate checkpoint.
RIDGE = 1e-6
DEFAULT_SINK_WEIGHT = 0.1
PROBE_RATIO = 4.0


@dataclass(frozen=True)
class CalibrationPreset:
    """How much calibration a `CompressionConfig.calibration` name buys.

    tokens: calibration tokens the statistics are gathered on (`spread_tokens` of the text given).
    allocation: how a target_ratio is spent over layers (see `plan_ranks`).
    probe_tokens: tokens of the sensitivity probes (allocation "sensitivity" only).
    min_tokens: fewer calibration tokens than this is an error."""

    tokens: int
    allocation: str
    probe_tokens: int = 2048
    min_tokens: int = 2048


# docs/calibration_tradeoff.md (scripts/calibration_tradeoff.py) measures both on the default model: "fast" takes
# seconds where "full" takes minutes (most of it in 60 sensitivity probes), within a point of ppl of it at 2x and 3x.
# What makes few tokens enough is taking them from all over the text: 16,384 tokens from one or two articles at the
# corpus' end cost about 2 more points at 3x than the same number spread over 65,536.
CALIBRATION_PRESETS = {
    "fast": CalibrationPreset(tokens=16384, allocation="spectrum"),
    "full": CalibrationPreset(tokens=65536, allocation="sensitivity", probe_tokens=2048),
}
CALIBRATION_CHUNK = 512  # tokens per calibration sequence (collect_statistics' seq_len)


def spread_tokens(token_ids: torch.Tensor, count: int, chunk: int = CALIBRATION_CHUNK) -> torch.Tensor:
    """At most `count` of the 1-D `token_ids`: all of them when they are no more, else `count // chunk` runs of
    `chunk` tokens spread evenly from the first token to the last, so that a long text's every part (every topic of a
    corpus) is represented rather than its first few pages."""
    if token_ids.numel() <= count:
        return token_ids
    runs = max(count // chunk, 1)
    length = count // runs
    if runs == 1:
        return token_ids[:length]
    step = (token_ids.numel() - length) // (runs - 1)
    return torch.cat([token_ids[i * step : i * step + length] for i in range(runs)])


@dataclass
class LayerStatistics:
    """Running sums over the calibration tokens of one layer's attention input x (float64).

    `first` holds the same sums over the tokens at position 0 only (they are also counted in the totals): the
    first token becomes an attention sink that most queries read heavily, so its key and value must survive
    compression far better than an average token's (see CalibratedPCA's sink_weight)."""

    count: int
    total: torch.Tensor  # [hidden]: Σ x
    outer: torch.Tensor  # [hidden, hidden]: Σ x xᵀ
    first: LayerStatistics | None = None

    @classmethod
    def zeros(cls, hidden: int, device: torch.device, with_first: bool = True) -> LayerStatistics:
        first = cls.zeros(hidden, device, with_first=False) if with_first else None
        return cls(
            0,
            torch.zeros(hidden, dtype=torch.float64, device=device),
            torch.zeros(hidden, hidden, dtype=torch.float64, device=device),
            first,
        )

    def add(self, x: torch.Tensor) -> None:
        """Accumulate rows x [n, hidden] (any dtype: summed in float64)."""
        x = x.detach().to(self.outer.device, torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer.addmm_(x.T, x)

    def cpu(self) -> LayerStatistics:
        return LayerStatistics(self.count, self.total.cpu(), self.outer.cpu(), self.first.cpu() if self.first else None)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def covariance(self) -> torch.Tensor:
        """Centered covariance E[x xᵀ] - μ μᵀ (the mean is carried by the basis center, not the basis)."""
        mean = self.mean
        return self.outer / self.count - torch.outer(mean, mean)

    def moments(self, sink_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, covariance) of the mixture giving position-0 tokens a `sink_weight` share and the others the rest."""
        first = self.first
        if not sink_weight or first is None or first.count in (0, self.count):
            return self.mean, self.covariance
        rest = self.count - first.count
        mean = (1 - sink_weight) * (self.total - first.total) / rest + sink_weight * first.mean
        second = (1 - sink_weight) * (self.outer - first.outer) / rest + sink_weight * first.outer / first.count
        return mean, second - torch.outer(mean, mean)


def _accumulate(statistics: LayerStatistics, hidden: torch.Tensor) -> None:
    # Every calibration batch row is a fresh sequence, so row [:, 0] is at position 0.
    statistics.add(hidden.reshape(-1, hidden.shape[-1]))
    statistics.first.add(hidden[:, 0])


def _batches(token_ids: torch.Tensor, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Full `seq_len` chunks stacked `batch_size` at a time, then the shorter tail alone: every token counts."""
    chunks = list(token_ids.split(seq_len))
    tail = [chunks.pop()[None]] if chunks and chunks[-1].numel() < seq_len else []
    return [torch.stack(chunks[i : i + batch_size]) for i in range(0, len(chunks), batch_size)] + tail


def collect_statistics(
    model: nn.Module,
    token_ids: torch.Tensor,
    seq_len: int = 512,
    batch_size: int = 4,
    progress: bool = True,
    first_tokens: int = 0,
) -> list[LayerStatistics]:
    """Mean and covariance sums of every layer's k_proj/v_proj input over `token_ids` (1-D), in `seq_len` chunks.

    `first_tokens` more samples of position 0 (the attention sink, see CalibratedPCA) are taken from as many tokens
    spread over the text, each as a one-token sequence: a token at position 0 sees nothing else, so this is exact, and
    it costs `first_tokens` tokens of compute where the chunks alone give only one sample per `seq_len` tokens."""
    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D tensor of token ids, got shape {tuple(token_ids.shape)}")
    modules = attention_modules(model)
    hidden = modules[0].k_proj.in_features
    device = next(model.parameters()).device
    # Float64 sums stay on the model's device (one [hidden, hidden] per layer) unless it has no float64.
    stats_device = torch.device("cpu") if device.type == "mps" else device
    statistics = [LayerStatistics.zeros(hidden, stats_device) for _ in modules]
    handles = []
    try:
        for attn, stats in zip(modules, statistics, strict=True):
            handles.append(
                attn.k_proj.register_forward_pre_hook(lambda _, args, stats=stats: _accumulate(stats, args[0]))
            )
        decoder = decoder_model(model)  # the LM head is not needed: skipping it saves most of the forward
        with torch.inference_mode():
            for batch in tqdm(
                _batches(token_ids, seq_len, batch_size), desc="calibration", unit="batch", disable=not progress
            ):
                decoder(input_ids=batch.to(device), use_cache=False)
            if first_tokens:
                step = max(token_ids.numel() // first_tokens, 1)
                decoder(input_ids=token_ids[::step][:first_tokens, None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [stats.cpu() for stats in statistics]


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with single_threaded():
        return torch.linalg.eigh(matrix)


def _descending_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eigenvalues, eigenvectors = _eigh(matrix)
    return eigenvalues.flip(-1), eigenvectors.flip(-1)


def output_metric(attention: nn.Module, group_size: int) -> torch.Tensor:
    """M per group [G, g*d, g*d]: block-diagonal over the group's KV heads of Σ W_o,jᵀ W_o,j over the query
    heads j that read each KV head (GQA: head j reads KV head j // (num_heads // num_kv_heads))."""
    config = attention.config
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, attention.head_dim
    o_weight = attention.o_proj.weight.detach().to("cpu", torch.float64).view(-1, heads, head_dim)
    per_head = torch.einsum("ohi,ohj->hij", o_weight, o_weight)
    per_kv_head = per_head.view(kv_heads, heads // kv_heads, head_dim, head_dim).sum(1)
    groups = per_kv_head.view(kv_heads // group_size, group_size, head_dim, head_dim)
    return torch.stack([torch.block_diag(*group) for group in groups])


def rope_rotations(model: nn.Module, distances: tuple[int, int, int] = KEY_METRIC_DISTANCES) -> torch.Tensor:
    """R(Δ) [n, d, d] float64 for Δ in range(*distances): the model's rotary rotation (rotate-half layout) at Δ, so
    that a query at m and a key at n = m - Δ score qᵀ R(Δ)ᵀ k on their pre-RoPE vectors."""
    rotary = decoder_model(model).rotary_emb
    delta = torch.arange(*distances)
    probe = next(model.parameters()).new_zeros(1, dtype=torch.float32)
    cos, sin = rotary(probe, delta[None].to(probe.device))
    cos, sin = cos[0].to("cpu", torch.float64), sin[0].to("cpu", torch.float64)  # [n, d]
    half = cos.shape[-1] // 2
    swap = torch.zeros(2 * half, 2 * half, dtype=torch.float64)  # rotate_half(x) = J x
    swap[:half, half:] = -torch.eye(half, dtype=torch.float64)
    swap[half:, :half] = torch.eye(half, dtype=torch.float64)
    return torch.diag_embed(cos) + torch.diag_embed(sin) @ swap


def query_metric(attention: nn.Module, statistics: LayerStatistics, rotations: torch.Tensor, group_size: int):
    """Q per group [G, g*d, g*d]: block-diagonal over the group's KV heads of E_Δ[R(Δ) S R(Δ)ᵀ], S = Σ_j E[q_j q_jᵀ]
    over the query heads j reading the KV head (pre-RoPE queries). A key error e then costs E[(score error)²] =
    e Q eᵀ, averaged over the distances of `rotations`: the key's part of the attention logits, as the output metric
    is the value's part of the output."""
    config = attention.config
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, attention.head_dim
    weight = attention.q_proj.weight.detach().to("cpu", torch.float64)
    bias = attention.q_proj.bias
    bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.detach().to("cpu", torch.float64)
    mean, second = statistics.mean, statistics.outer / statistics.count  # E[x], E[x xᵀ]
    cross = torch.outer(weight @ mean, bias)
    moment = weight @ second @ weight.T + cross + cross.T + torch.outer(bias, bias)  # E[q qᵀ], all heads
    per_head = moment.view(heads, head_dim, heads, head_dim).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    per_kv_head = per_head.reshape(kv_heads, heads // kv_heads, head_dim, head_dim).sum(1)
    averaged = torch.einsum("nij,hjk,nlk->hil", rotations, per_kv_head, rotations) / rotations.shape[0]
    groups = averaged.view(kv_heads // group_size, group_size, head_dim, head_dim)
    return torch.stack([torch.block_diag(*group) for group in groups])


@dataclass
class _Decomposition:
    """Eigen-decomposition of one layer's keys or values, grouped; `root` is L (None = orthonormal PCA)."""

    eigenvalues: torch.Tensor  # [G, D], descending, in the metric's units
    eigenvectors: torch.Tensor  # [G, D, D], columns
    center: torch.Tensor  # [G, D]
    root: torch.Tensor | None = None
    inverse_root: torch.Tensor | None = None

    def projection(self, rank: int) -> Projection:
        basis = self.eigenvectors[..., :rank]
        down, up = basis, basis.transpose(1, 2)
        if self.root is not None:
            # c = (v - μ) L E_r and v̂ = c E_rᵀ L⁻¹ + μ: at full rank E Eᵀ = I, so down @ up = L L⁻¹ = I.
            down, up = self.root @ basis, up @ self.inverse_root
        return Projection(down=down.contiguous().float(), up=up.contiguous().float(), center=self.center.float())


def _metric_roots(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, L⁻¹, scale²): L = M^½ / scale, normalised to mean eigenvalue 1 so latents keep the values' magnitude
    (fp16-safe); eigenvalues computed with L are multiplied by scale² to be back in output-metric units."""
    eigenvalues, eigenvectors = _eigh(metric)
    floor = RIDGE * eigenvalues.mean(-1, keepdim=True).clamp_min(1e-300)
    roots = eigenvalues.clamp_min(0).add(floor).sqrt()
    scale = roots.mean(-1, keepdim=True)
    roots = roots / scale
    root = eigenvectors @ torch.diag_embed(roots) @ eigenvectors.transpose(1, 2)
    inverse_root = eigenvectors @ torch.diag_embed(roots.reciprocal()) @ eigenvectors.transpose(1, 2)
    return root, inverse_root, scale.square()


class CalibratedPCA:
    """BasisAlgorithm from calibration statistics: key PCA (pre-RoPE) and value PCA in the output metric.

    value_metric: "output" (optimal for the error after o_proj) or "plain" (PCA of the values, for comparison).
    sink_weight: share of the PCA objective given to position-0 tokens. The first token is an attention sink:
        most queries put much of their attention on it, so its error is multiplied far more than an average
        token's. Weighting it by its share of tokens (1/seq_len) let values at half rank cost +238% ppl on the
        default model, any share in 0.05-0.5 about +35%: the default sits in that flat region."""

    name = "calibrated"

    def __init__(
        self,
        statistics: Sequence[LayerStatistics],
        value_metric: str = "output",
        sink_weight: float = DEFAULT_SINK_WEIGHT,
        key_rotations: torch.Tensor | None = None,
    ):
        if value_metric not in VALUE_METRICS:
            raise ValueError(f"unknown value_metric {value_metric!r}: choose one of {', '.join(VALUE_METRICS)}")
        self.key_rotations = key_rotations  # `rope_rotations`: keys PCA'd in the query metric; None: plain PCA
        if not 0 <= sink_weight < 1:
            raise ValueError(f"sink_weight must be in [0, 1), got {sink_weight!r}")
        self.statistics = list(statistics)
        self.value_metric = value_metric
        self.sink_weight = sink_weight
        # Spectra (for allocation), probes and the final fit all need the same decompositions: compute each once.
        self._decompositions: dict[tuple[int, int], tuple[_Decomposition, _Decomposition]] = {}

    def _decompose(
        self, layer_idx: int, attention: nn.Module, group_size: int
    ) -> tuple[_Decomposition, _Decomposition]:
        key = (layer_idx, group_size)
        if key not in self._decompositions:
            self._decompositions[key] = self._compute_decomposition(layer_idx, attention, group_size)
        return self._decompositions[key]

    def _compute_decomposition(
        self, layer_idx: int, attention: nn.Module, group_size: int
    ) -> tuple[_Decomposition, _Decomposition]:
        if layer_idx >= len(self.statistics):
            raise ValueError(
                f"no calibration statistics for layer {layer_idx}: {len(self.statistics)} layers were calibrated"
            )
        stats = self.statistics[layer_idx]
        mean, covariance = stats.moments(self.sink_weight)
        parts = []
        for linear in (attention.k_proj, attention.v_proj):
            weight, bias = grouped_weight(linear, group_size, attention.head_dim)
            weight = weight.cpu()
            if weight.shape[-1] != mean.shape[0]:
                raise ValueError(
                    f"layer {layer_idx} statistics are {mean.shape[0]}-dimensional, its k/v input is {weight.shape[-1]}"
                )
            parts.append((weight @ covariance @ weight.transpose(1, 2), weight @ mean + bias.cpu()))
        (key_cov, key_center), (value_cov, value_center) = parts
        if self.key_rotations is None:
            key = _Decomposition(*_descending_eigh(key_cov), key_center)
        else:
            root, inverse_root, scale = _metric_roots(query_metric(attention, stats, self.key_rotations, group_size))
            eigenvalues, eigenvectors = _descending_eigh(root @ key_cov @ root)
            key = _Decomposition(eigenvalues * scale, eigenvectors, key_center, root, inverse_root)
        if self.value_metric == "plain":
            return key, _Decomposition(*_descending_eigh(value_cov), value_center)
        root, inverse_root, scale = _metric_roots(output_metric(attention, group_size))
        eigenvalues, eigenvectors = _descending_eigh(root @ value_cov @ root)
        return key, _Decomposition(eigenvalues * scale, eigenvectors, value_center, root, inverse_root)

    def fit(self, layer_idx: int, attention: nn.Module, key_rank: int, value_rank: int, group_size: int) -> LayerBases:
        key, value = self._decompose(layer_idx, attention, group_size)
        return LayerBases(key.projection(key_rank), value.projection(value_rank))

    def spectrum(self, layer_idx: int, attention: nn.Module, group_size: int) -> LayerSpectrum:
        """Eigenvalues per group: keys in key space, values in this algorithm's value metric."""
        key, value = self._decompose(layer_idx, attention, group_size)
        return LayerSpectrum(key.eigenvalues.clamp_min(0), value.eigenvalues.clamp_min(0))

    def spectra(self, model: nn.Module, group_size: int) -> list[LayerSpectrum]:
        return [self.spectrum(i, attn, group_size) for i, attn in enumerate(attention_modules(model))]


def probe_weights(
    model: nn.Module,
    algorithm: CalibratedPCA,
    token_ids: torch.Tensor,
    group_size: int,
    probe_ratio: float = PROBE_RATIO,
    *,
    probe_tokens: int = 2048,
    seq_len: int = 512,
    progress: bool = True,
) -> list[tuple[float, float]]:
    """Sensitivity weights (per layer: key, value) from KL probes at the uniform ranks of `probe_ratio`.

    The probe is deliberately harsh: at mild compression one layer's KL is near the noise of 16-bit rounding.
    On the default model, probing at 4x gave better allocations at 1.5x, 2x and 3x than probing at each target."""
    spectra = algorithm.spectra(model, group_size)
    probe = uniform_ranks(spectra, probe_ratio)

    def fit(i: int, attn: nn.Module, key_rank: int, value_rank: int) -> LayerBases:
        return algorithm.fit(i, attn, key_rank, value_rank, group_size)

    kl = measure_sensitivity(
        model, fit, token_ids[:probe_tokens], probe, seq_len=min(seq_len, probe_tokens), progress=progress
    )
    return sensitivity_weights(spectra, kl, probe)


def plan_ranks(
    model: nn.Module,
    algorithm: CalibratedPCA,
    token_ids: torch.Tensor,
    group_size: int,
    target_ratio: float,
    allocation: str = "sensitivity",
    *,
    cost: StorageCost = SIXTEEN_BIT,
    weights: Sequence[tuple[float, float]] | None = None,
    probe_tokens: int = 2048,
    seq_len: int = 512,
    progress: bool = True,
) -> list[tuple[int, int]]:
    """(key, value) ranks per group per layer for `target_ratio`.

    "uniform": equal ranks everywhere; "spectrum": water-filling on relative spectral energy; "sensitivity":
    the same, each layer's keys and values weighted by the KL its compression alone causes (`probe_weights`,
    measured on the first `probe_tokens` tokens at PROBE_RATIO whatever the target, so one measurement serves every
    ratio; pass `weights` to reuse it)."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
    spectra = algorithm.spectra(model, group_size)
    if allocation == "uniform":
        return uniform_ranks(spectra, target_ratio, cost)
    if allocation == "sensitivity" and weights is None:
        weights = probe_weights(
            model,
            algorithm,
            token_ids,
            group_size,
            PROBE_RATIO,
            probe_tokens=probe_tokens,
            seq_len=seq_len,
            progress=progress,
        )
    return allocate_ranks(spectra, target_ratio, weights if allocation == "sensitivity" else None, cost)


class Calibrator:
    """One model's statistics on one calibration text, gathered once, and bases for any config from them.

    Sensitivity probes are also measured once per group size and probe ratio, so bases for several target
    ratios (an eval's rows) cost one calibration pass. Use text disjoint from what you evaluate on.

    key_metric: "plain" (PCA of the keys) or "query" (PCA in the metric of the squared score error, `query_metric`;
    measured much worse on the default model, docs/mixed.md, and kept for experiments)."""

    def __init__(
        self,
        model: nn.Module,
        token_ids: torch.Tensor,
        *,
        seq_len: int = 512,
        batch_size: int = 4,
        progress: bool = True,
        value_metric: str = "output",
        sink_weight: float = DEFAULT_SINK_WEIGHT,
        allocation: str = "sensitivity",
        probe_tokens: int = 2048,
        key_metric: str = "plain",
    ):
        if allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        self.model = model
        self.token_ids = token_ids
        self.seq_len = seq_len
        self.progress = progress
        self.allocation = allocation
        self.probe_tokens = probe_tokens
        if key_metric not in KEY_METRICS:
            raise ValueError(f"unknown key_metric {key_metric!r}: choose one of {', '.join(KEY_METRICS)}")
        self.algorithm = CalibratedPCA(
            collect_statistics(model, token_ids, seq_len, batch_size, progress),
            value_metric,
            sink_weight,
            rope_rotations(model) if key_metric == "query" else None,
        )
        self._weights: dict[tuple[int, float], list[tuple[float, float]]] = {}

    def _probe_weights(self, group_size: int, probe_ratio: float) -> list[tuple[float, float]]:
        key = (group_size, probe_ratio)
        if key not in self._weights:
            self._weights[key] = probe_weights(
                self.model,
                self.algorithm,
                self.token_ids,
                group_size,
                probe_ratio,
                probe_tokens=self.probe_tokens,
                seq_len=self.seq_len,
                progress=self.progress,
            )
        return self._weights[key]

    def measure(self, configs: Sequence[CompressionConfig]) -> None:
        """Run now the sensitivity probes these configs' bases will need (otherwise `layer_ranks` does)."""
        if self.allocation == "sensitivity":
            num_kv_heads = model_geometry(self.model).num_kv_heads
            for config in configs:
                if config.target_ratio is not None:
                    self._probe_weights(config.heads_per_group(num_kv_heads), PROBE_RATIO)

    def layer_widths(
        self, config: CompressionConfig, sequence_length: int | None = None
    ) -> list[tuple[list[int], list[int]]]:
        """A bit width per latent channel, (keys, values) per layer, for a config with latent_bits="mixed": its
        target_ratio's bytes spent where the variance is (weighted by measured sensitivity when the calibration
        measures it)."""
        from .bit_allocation import allocate_bits

        geometry = model_geometry(self.model)
        config.resolve_ranks(geometry.head_dim, geometry.num_kv_heads)
        group = config.heads_per_group(geometry.num_kv_heads)
        weights = self._probe_weights(group, PROBE_RATIO) if self.allocation == "sensitivity" else None
        spectra = self.algorithm.spectra(self.model, group)
        return allocate_bits(spectra, config.target_ratio, weights, storage_cost(config, sequence_length))

    def layer_ranks(
        self, config: CompressionConfig, sequence_length: int | None = None
    ) -> list[tuple[int, int]] | None:
        """(key, value) ranks per group and layer for `config`: None for its uniform ranks, else allocated for its
        target_ratio, counting its latent_bits and (over `sequence_length` tokens) its window. The bases are then
        `SVDBases.from_calibrator(self, config)`."""
        geometry = model_geometry(self.model)
        config.resolve_ranks(geometry.head_dim, geometry.num_kv_heads)
        if config.target_ratio is None:
            return None
        group = config.heads_per_group(geometry.num_kv_heads)
        weights = self._probe_weights(group, PROBE_RATIO) if self.allocation == "sensitivity" else None
        return plan_ranks(
            self.model,
            self.algorithm,
            self.token_ids,
            group,
            config.target_ratio,
            self.allocation,
            cost=storage_cost(config, sequence_length),
            weights=weights,
        )
