"""Spend a memory budget (`CompressionConfig.target_ratio`) on key and value ranks, layer by layer.

Every (layer, keys-or-values) pair is one item whose error at rank r is the energy its basis leaves out:
the tail of its eigenvalue spectrum. Items are normalised by their total energy (a relative error, so keys
in key space and values in the output metric are comparable) and optionally weighted by a measured loss
sensitivity. Because spectra are sorted, the marginal gain of one more dimension only decreases, so greedy
water-filling (always buy the dimension that removes the most weighted error) is optimal.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .architectures import attention_modules, decoder_model, model_geometry
from .compression_config import CompressionConfig
from .projection import LayerBases, Projection
from .weight_svd import grouped_weight, single_threaded

LATENT_BYTES = 2  # latents are stored in the model dtype: 16-bit for the models this budget is quoted for
POSITION_BYTES = 4  # one int32 position per token per layer (keys are rotated at the position they were written)
FULL_BYTES = 2  # the 16-bit uncompressed cache the ratio is quoted against
QUANT_GROUP = 32  # latent channels per 16-bit scale and zero point (QuantizedSVDCacheLayer's default)
RANK_MULTIPLE = 8  # kernel-friendly ranks, kept when they cost at most ROUNDING_TOLERANCE of the objective
ROUNDING_TOLERANCE = 0.02
MIN_RANK = 8
# A layer whose compression measurably costs nothing still gets a little weight, so its rank follows its spectrum.
SENSITIVITY_FLOOR = 1e-3


@dataclass
class LayerSpectrum:
    """Eigenvalues per group, descending, float64: key [G, g*d] (key space), value [G, g*d] (the basis' metric).

    The sum of the eigenvalues past rank r is the expected squared error per token of a rank-r basis."""

    key: torch.Tensor
    value: torch.Tensor


@dataclass(frozen=True)
class StorageCost:
    """What a latent dimension costs and what else the cache holds, for turning a ratio into a rank budget.

    latent_bits: None = latents in 16 bits; 8 or 4 = integer codes plus a 16-bit scale and zero point per
        QUANT_GROUP channels (a rank that is not a multiple of the group pays a little more than counted here).
    window, sequence_length: `window` tokens (the window and the sinks) are held at full precision; their bytes are
        spread over `sequence_length` tokens (the length the ratio is quoted at). Without a length they are not
        counted: at long contexts they are negligible."""

    latent_bits: int | None = None
    window: int = 0
    sequence_length: int | None = None

    @property
    def bytes_per_dim(self) -> float:
        if self.latent_bits is None:
            return LATENT_BYTES
        return self.latent_bits / 8 + 2 * 2 / QUANT_GROUP

    def row_bytes(self, rank: int) -> int:
        """Bytes one token's latent row of `rank` channels takes as stored."""
        if self.latent_bits is None:
            return LATENT_BYTES * rank
        return math.ceil(rank * self.latent_bits / 8) + 2 * 2 * math.ceil(rank / QUANT_GROUP)

    @property
    def window_share(self) -> float:
        if not self.window or not self.sequence_length:
            return 0.0
        return min(self.window / self.sequence_length, 1.0)


SIXTEEN_BIT = StorageCost()


def latent_bytes_budget(
    spectra: Sequence[LayerSpectrum], target_ratio: float, cost: StorageCost = SIXTEEN_BIT
) -> float | None:
    """Bytes per token (all layers, keys + values) the latents may take so that, with the positions and the window,
    the cache is `target_ratio` times smaller than a 16-bit full cache; None when the window holds every token."""
    full_bytes = sum(2 * s.key.numel() * FULL_BYTES for s in spectra)
    share = cost.window_share
    if share >= 1.0:
        return None
    # Every token has a position; a share of them is held in full, the rest as latents.
    return (full_bytes / target_ratio - POSITION_BYTES * len(spectra) - share * full_bytes) / (1 - share)


def latent_budget(spectra: Sequence[LayerSpectrum], target_ratio: float, cost: StorageCost = SIXTEEN_BIT) -> int:
    """Latent dimensions per token (all layers, keys + values) within `latent_bytes_budget`."""
    latent_bytes = latent_bytes_budget(spectra, target_ratio, cost)
    return 0 if latent_bytes is None else math.floor(latent_bytes / cost.bytes_per_dim + 1e-9)


def budget_bytes(
    layer_ranks: Sequence[tuple[int, int]],
    spectra: Sequence[LayerSpectrum],
    cost: StorageCost = SIXTEEN_BIT,
    exact: bool = False,
) -> float:
    """Bytes per token of a cache with these (key, value) ranks per group (window and quantization as in `cost`);
    `exact` counts integer codes as stored (packed bytes, one scale and zero point per started group)."""
    if exact:
        latent = sum(
            (cost.row_bytes(k) + cost.row_bytes(v)) * s.key.shape[0]
            for (k, v), s in zip(layer_ranks, spectra, strict=True)
        )
    else:
        latent = (
            sum((k + v) * s.key.shape[0] for (k, v), s in zip(layer_ranks, spectra, strict=True)) * cost.bytes_per_dim
        )
    full_bytes = sum(2 * s.key.numel() * FULL_BYTES for s in spectra)
    share = cost.window_share
    return (1 - share) * latent + share * full_bytes + POSITION_BYTES * len(spectra)


def uniform_ranks(
    spectra: Sequence[LayerSpectrum], target_ratio: float, cost: StorageCost = SIXTEEN_BIT
) -> list[tuple[int, int]]:
    """The same rank for keys and values in every layer: the largest that fits the budget (the baseline)."""
    budget = latent_budget(spectra, target_ratio, cost)
    groups = sum(s.key.shape[0] for s in spectra)
    rank = min(budget // (2 * groups), min(s.key.shape[1] for s in spectra))
    if rank < 1:
        raise ValueError(f"target_ratio {target_ratio} leaves no room for even one latent dimension per group")
    return [(rank, rank)] * len(spectra)


def _gains(spectra: Sequence[LayerSpectrum], weights: Sequence[tuple[float, float]] | None) -> list[torch.Tensor]:
    """Per item (layer-major, key then value): weighted relative energy of each rank index, summed over groups."""
    items = []
    for i, spectrum in enumerate(spectra):
        for kind, eigenvalues in enumerate((spectrum.key, spectrum.value)):
            energy = eigenvalues.clamp_min(0).sum(0)  # groups of a layer share one rank
            weight = 1.0 if weights is None else weights[i][kind]
            items.append(weight * energy / energy.sum().clamp_min(1e-300))
    return items


def _greedy(gains: list[torch.Tensor], costs: list[int], start: list[int], step: int, budget: int) -> list[int]:
    """Water-filling: repeatedly add `step` ranks to the item whose next step removes the most error per byte."""
    ranks = list(start)
    cumulative = [torch.cat([g.new_zeros(1), g.cumsum(0)]).tolist() for g in gains]

    def entry(i: int) -> tuple[float, int, int] | None:
        nxt = min(ranks[i] + step, len(gains[i]))
        if nxt == ranks[i]:
            return None
        return (-(cumulative[i][nxt] - cumulative[i][ranks[i]]) / ((nxt - ranks[i]) * costs[i]), i, nxt)

    heap = [e for e in map(entry, range(len(gains))) if e is not None]
    heapq.heapify(heap)
    while heap:
        _, i, nxt = heapq.heappop(heap)
        extra = (nxt - ranks[i]) * costs[i]
        if extra > budget:
            continue  # never fits later either: the budget only shrinks
        budget -= extra
        ranks[i] = nxt
        if (e := entry(i)) is not None:
            heapq.heappush(heap, e)
    return ranks


def _residual(gains: list[torch.Tensor], ranks: list[int]) -> float:
    return sum(g[r:].sum().item() for g, r in zip(gains, ranks, strict=True))


def allocate_ranks(
    spectra: Sequence[LayerSpectrum],
    target_ratio: float,
    weights: Sequence[tuple[float, float]] | None = None,
    cost: StorageCost = SIXTEEN_BIT,
) -> list[tuple[int, int]]:
    """(key, value) rank per group for each layer, within the byte budget of `target_ratio`.

    `weights` (per layer: key, value) scale each item's relative error, e.g. by measured loss sensitivity;
    None weighs every layer's keys and values equally. Ranks lie in [8, g*d]; they are multiples of 8
    (plus a last partial step to spend the remainder) unless that costs more than 2% of the objective."""
    budget = latent_budget(spectra, target_ratio, cost)
    gains = _gains(spectra, weights)
    costs = [s.key.shape[0] for s in spectra for _ in range(2)]
    start = [min(MIN_RANK, len(g)) for g in gains]
    spare = budget - sum(r * c for r, c in zip(start, costs, strict=True))
    if spare < 0:
        floor_ratio = sum(2 * s.key.numel() * FULL_BYTES for s in spectra) / budget_bytes(
            [(start[2 * i], start[2 * i + 1]) for i in range(len(spectra))], spectra, cost
        )
        raise ValueError(
            f"target_ratio {target_ratio} is beyond reach: rank {MIN_RANK} everywhere is already {floor_ratio:.2f}x"
        )
    allowed = sum(2 * s.key.numel() * FULL_BYTES for s in spectra) / target_ratio
    # Integer codes pay a scale and zero point per started group of channels and a half byte per odd int4 rank, which
    # the per-dimension price does not see: shrink the budget until the exact byte count fits.
    for _ in range(16):
        ranks = _spend(gains, costs, start, spare)
        excess = budget_bytes(ranks, spectra, cost, exact=True) - allowed
        if excess <= 0:
            return ranks
        spare -= max(1, math.ceil(excess / ((1 - cost.window_share) * cost.bytes_per_dim)))
        if spare < 0:
            break
    raise ValueError(f"target_ratio {target_ratio} is beyond reach with {cost.latent_bits}-bit latents")


def _spend(gains: list[torch.Tensor], costs: list[int], start: list[int], spare: int) -> list[tuple[int, int]]:
    exact = _greedy(gains, costs, start, 1, spare)
    rounded = _greedy(gains, costs, start, RANK_MULTIPLE, spare)
    rounded = _greedy(
        gains, costs, rounded, 1, spare - sum((r - s) * c for r, s, c in zip(rounded, start, costs, strict=True))
    )
    best = exact
    if _residual(gains, rounded) <= _residual(gains, exact) * (1 + ROUNDING_TOLERANCE) + 1e-12:
        best = rounded
    return [(best[2 * i], best[2 * i + 1]) for i in range(len(best) // 2)]


def weight_spectra(model: nn.Module, group_size: int) -> list[LayerSpectrum]:
    """Squared singular values of each group's W_k and W_v: the spectra the weight-only bases are cut from."""
    spectra = []
    for attn in attention_modules(model):
        pair = []
        for linear in (attn.k_proj, attn.v_proj):
            weight, _ = grouped_weight(linear, group_size, attn.head_dim)
            with single_threaded():
                singular = torch.linalg.svdvals(weight)
            pair.append(F.pad(singular.square(), (0, weight.shape[1] - singular.shape[-1])))
        spectra.append(LayerSpectrum(*pair))
    return spectra


def storage_cost(config: CompressionConfig, sequence_length: int | None = None) -> StorageCost:
    # The window and the sinks are both tokens held at full precision.
    return StorageCost(config.latent_bits, config.window + config.sinks, sequence_length)


def weight_spectrum_ranks(
    model: nn.Module, config: CompressionConfig, sequence_length: int | None = None
) -> list[tuple[int, int]]:
    """Ranks per group for method "weights" with a target_ratio, allocated on the weight spectra."""
    if config.target_ratio is None:
        raise ValueError("weight_spectrum_ranks needs a CompressionConfig with a target_ratio")
    geometry = model_geometry(model)
    config.resolve_ranks(geometry.head_dim, geometry.num_kv_heads)  # checks group_size divides the KV heads
    return allocate_ranks(
        weight_spectra(model, config.heads_per_group(geometry.num_kv_heads)),
        config.target_ratio,
        cost=storage_cost(config, sequence_length),
    )


# --- loss sensitivity -------------------------------------------------------------------------------------------
@contextmanager
def _compressed(linear: nn.Linear, projection: Projection, head_dim: int) -> Iterator[None]:
    """Replace a k/v projection's output by its low-rank reconstruction, latents rounded to the model dtype:
    what the cache does to every token it stores (keys are compressed before RoPE, i.e. at k_proj's output)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = output.shape
        states = output.view(batch, seq, -1, head_dim).transpose(1, 2)
        latents = projection.encode(states).to(output.dtype)
        return projection.decode(latents, head_dim).transpose(1, 2).reshape(batch, seq, -1).to(output.dtype)

    handle = linear.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Replay(nn.Module):
    """Stands in for a decoder layer whose output is already known, so a probe skips the layers it cannot change."""

    def __init__(self, output: object):
        super().__init__()
        self.output = output

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.output


@contextmanager
def _replaying(layers: nn.ModuleList, count: int, output: object) -> Iterator[None]:
    # Swapping modules inside the list (not shortening it) keeps per-index lookups such as layer_types aligned.
    originals = [layers[j] for j in range(count)]
    replay = _Replay(output)
    for j in range(count):
        layers[j] = replay
    try:
        yield
    finally:
        for j, layer in enumerate(originals):
            layers[j] = layer


def _log_probs(model: nn.Module, chunks: torch.Tensor) -> torch.Tensor:
    return model(chunks, use_cache=False).logits.float().log_softmax(-1)


def measure_sensitivity(
    model: nn.Module,
    fit: Callable[[int, nn.Module, int, int], LayerBases],
    token_ids: torch.Tensor,
    probe_ranks: Sequence[tuple[int, int]],
    *,
    seq_len: int = 512,
    progress: bool = True,
) -> list[tuple[float, float]]:
    """KL divergence (nats/token) of the model's next-token distribution when only one layer's keys, or only
    its values, are compressed at `probe_ranks[layer]`. `fit(layer_idx, attention, key_rank, value_rank)`
    gives the bases. KL to the uncompressed model, rather than the loss, is never negative and far less noisy
    on a few thousand tokens; it is the expected loss increase when the model is right."""
    usable = token_ids.numel() // seq_len * seq_len
    if usable == 0:
        raise ValueError(f"need at least {seq_len} tokens to measure sensitivity, got {token_ids.numel()}")
    chunks = token_ids[:usable].reshape(-1, seq_len).to(model.device)
    modules = attention_modules(model)
    layers = decoder_model(model).layers
    outputs: list[object] = []
    handles = [layer.register_forward_hook(lambda _, args, output: outputs.append(output)) for layer in layers]
    try:
        with torch.inference_mode():
            reference = _log_probs(model, chunks)
    finally:
        for handle in handles:
            handle.remove()
    result = []
    with torch.inference_mode():
        bar = tqdm(total=2 * len(modules), desc="sensitivity", unit="probe", disable=not progress)
        for i, attn in enumerate(modules):
            bases = fit(i, attn, *probe_ranks[i]).to(model.device, torch.float32)
            pair = []
            for linear, projection in ((attn.k_proj, bases.key), (attn.v_proj, bases.value)):
                # Layers before i are unaffected by compressing layer i: replay their output, halving the cost.
                with (
                    _compressed(linear, projection, attn.head_dim),
                    _replaying(layers, i, outputs[i - 1] if i else None),
                ):
                    probe = _log_probs(model, chunks)
                pair.append(
                    F.kl_div(probe, reference, log_target=True, reduction="sum").item() / reference[..., 0].numel()
                )
                bar.update()
            result.append((pair[0], pair[1]))
        bar.close()
    return result


def sensitivity_weights(
    spectra: Sequence[LayerSpectrum], sensitivity: Sequence[tuple[float, float]], probe_ranks: Sequence[tuple[int, int]]
) -> list[tuple[float, float]]:
    """Weights that turn each item's relative error into predicted KL: KL at the probe / relative error there.

    Floored at SENSITIVITY_FLOOR of the mean so an insensitive layer still follows its spectrum."""
    raw = []
    for spectrum, kl, ranks in zip(spectra, sensitivity, probe_ranks, strict=True):
        pair = []
        for eigenvalues, loss, rank in zip((spectrum.key, spectrum.value), kl, ranks, strict=True):
            energy = eigenvalues.clamp_min(0).sum(0)
            relative = (energy[rank:].sum() / energy.sum().clamp_min(1e-300)).item()
            # A probe at (numerically) full rank measures only rounding noise: no evidence, so the floor.
            pair.append(max(loss, 0.0) / relative if relative > 1e-9 else 0.0)
        raw.append(pair)
    mean = sum(sum(p) for p in raw) / (2 * len(raw)) or 1.0
    return [(max(k, SENSITIVITY_FLOOR * mean), max(v, SENSITIVITY_FLOOR * mean)) for k, v in raw]
