"""Per-layer key/value bases for a model: computed, saved, loaded and checked against the model they serve."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .architectures import ModelGeometry, attention_modules, model_geometry
from .bit_allocation import WIDTHS
from .calibration import CALIBRATION_PRESETS, Calibrator, spread_tokens
from .compression_config import MIXED, CompressionConfig
from .projection import LayerBases, Projection
from .text import tokenize_text
from .version import __version__
from .weight_svd import WeightSVD

BASES_FILE = "bases.safetensors"
FORMAT_VERSION = 1
# A fine-tune or a different checkpoint of the same architecture moves these probes by far more than
# casting the same weights between fp32, bf16 and fp16 does (~1e-3).
FINGERPRINT_TOLERANCE = 2e-2


class BasesMismatchError(ValueError):
    """Bases were computed for a different model than the one they are used with."""


class BasisAlgorithm(Protocol):
    """How one layer's bases are computed; ranks are per group of `group_size` KV heads."""

    name: str

    def fit(
        self, layer_idx: int, attention: nn.Module, key_rank: int, value_rank: int, group_size: int
    ) -> LayerBases: ...


def weight_fingerprint(model: nn.Module) -> torch.Tensor:
    """W_k g and W_v g per layer for a fixed random g: [layers, 2, kv_heads * head_dim], dtype-agnostic."""
    modules = attention_modules(model)
    hidden = modules[0].k_proj.weight.shape[1]
    probe = torch.randn(hidden, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = []
    for attn in modules:
        rows.append(
            torch.stack([lin.weight.detach().to("cpu", torch.float64) @ probe for lin in (attn.k_proj, attn.v_proj)])
        )
    return torch.stack(rows).float()


def _state_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class SVDBases:
    """Key and value projections of every layer, plus what identifies the model they were computed for."""

    def __init__(
        self,
        layers: list[LayerBases],
        geometry: ModelGeometry,
        group_size: int,
        method: str,
        fingerprint: torch.Tensor,
    ):
        if len(layers) != geometry.num_layers:
            raise ValueError(f"{len(layers)} layers of bases for a model with {geometry.num_layers} layers")
        self.layers = layers
        self.geometry = geometry
        self.group_size = group_size
        self.method = method
        self.fingerprint = fingerprint

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        config: CompressionConfig,
        algorithm: BasisAlgorithm | None = None,
        layer_ranks: Sequence[tuple[int, int]] | None = None,
        layer_widths: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
        sequence_length: int | None = None,
    ) -> SVDBases:
        """Bases for every layer of `model` (weight-only SVD unless another algorithm is given).

        `layer_ranks` overrides the config's uniform ranks with (key, value) latent dims per group, per layer;
        `layer_widths` (mixed-precision latents) gives a bit width per channel instead, the ranks being their counts.
        Weight-only bases for a target ratio are allocated on the weight spectra, quoted at `sequence_length`."""
        geometry = model_geometry(model)
        group = config.heads_per_group(geometry.num_kv_heads)
        if algorithm is None and config.method == "calibrated":
            raise ValueError(
                "method='calibrated' needs calibration text: use patch_model(model, config, tokenizer=...), "
                "hf_svdkv.fit_bases(model, config, ...) or SVDBases.calibrate(model, texts, config, tokenizer=...), "
                "or method='weights' for data-free bases"
            )
        if layer_widths is None and layer_ranks is None and config.latent_bits == MIXED and algorithm is None:
            from .bit_allocation import weight_spectrum_widths

            layer_widths = weight_spectrum_widths(model, config, sequence_length)
        if layer_widths is not None:
            layer_ranks = [(len(key), len(value)) for key, value in layer_widths]
        elif config.latent_bits == MIXED:
            raise ValueError("latent_bits='mixed' needs a bit width per channel: fit the bases with that config")
        if layer_ranks is None and config.target_ratio is not None and algorithm is None:
            from .allocation import weight_spectrum_ranks

            layer_ranks = weight_spectrum_ranks(model, config, sequence_length)
        if layer_ranks is None:
            key_rank, value_rank = config.resolve_ranks(geometry.head_dim, geometry.num_kv_heads)
            layer_ranks = [(key_rank * group, value_rank * group)] * geometry.num_layers
        elif len(layer_ranks) != geometry.num_layers:
            raise ValueError(f"{len(layer_ranks)} (key, value) ranks for a model with {geometry.num_layers} layers")
        limit = group * geometry.head_dim
        for i, ranks in enumerate(layer_ranks):
            if not all(0 < r <= limit for r in ranks):
                raise ValueError(f"layer {i} ranks {tuple(ranks)} outside 1..{limit} (group of {group} heads)")
        algorithm = algorithm or WeightSVD()
        layers = [
            algorithm.fit(i, attn, key_rank, value_rank, group).to("cpu", torch.float32)
            for i, (attn, (key_rank, value_rank)) in enumerate(zip(attention_modules(model), layer_ranks, strict=True))
        ]
        if layer_widths is not None:
            layers = [
                LayerBases(*(with_widths(p, w) for p, w in ((layer.key, widths[0]), (layer.value, widths[1]))))
                for layer, widths in zip(layers, layer_widths, strict=True)
            ]
        return cls(layers, geometry, group, algorithm.name, weight_fingerprint(model))

    @classmethod
    def calibrate(
        cls,
        model: nn.Module,
        texts: str | Sequence[str] | torch.Tensor,
        config: CompressionConfig,
        *,
        tokenizer: Any = None,
        max_tokens: int | None = None,
        sequence_length: int | None = None,
        **options: Any,
    ) -> SVDBases:
        """Calibrated bases: key PCA and output-aware value PCA on `texts` (strings with their `tokenizer`, or a 1-D
        tensor of token ids), ranks allocated for `config.target_ratio` as `config.calibration` says (`fast`: on the
        spectra; `full`: by measured sensitivity). `patch_model(model, config)` does this by itself, with a cache.

        Uses at most `max_tokens` tokens spread over the text (default: as many as `config.calibration` uses).
        `sequence_length` is the context length a target ratio is quoted at, so that the config's full-precision
        window is counted. Options go to `calibration.Calibrator` (seq_len, batch_size, progress, value_metric,
        sink_weight, allocation, probe_tokens)."""
        if isinstance(texts, torch.Tensor):
            token_ids = texts
        else:
            if tokenizer is None:
                raise ValueError("SVDBases.calibrate needs tokenizer= to turn calibration text into token ids")
            text = texts if isinstance(texts, str) else "\n\n".join(texts)
            token_ids = tokenize_text(tokenizer, text, vocab_size=model.config.get_text_config().vocab_size)
        if token_ids.dim() != 1 or token_ids.numel() == 0:
            raise ValueError(
                f"calibration needs a non-empty 1-D sequence of token ids, got shape {tuple(token_ids.shape)}"
            )
        token_ids = spread_tokens(token_ids, max_tokens or CALIBRATION_PRESETS[config.calibration].tokens)
        config = dataclasses.replace(config, method="calibrated")
        return calibrate_bases(model, token_ids, config, sequence_length=sequence_length, **options)

    @classmethod
    def from_calibrator(
        cls, calibrator: Calibrator, config: CompressionConfig, sequence_length: int | None = None
    ) -> SVDBases:
        """Calibrated bases for `config` from a `Calibrator`'s statistics (several configs share one calibration)."""
        if config.latent_bits == MIXED:
            widths = calibrator.layer_widths(config, sequence_length)
            return cls.from_model(calibrator.model, config, algorithm=calibrator.algorithm, layer_widths=widths)
        layer_ranks = calibrator.layer_ranks(config, sequence_length)
        return cls.from_model(calibrator.model, config, algorithm=calibrator.algorithm, layer_ranks=layer_ranks)

    # --- facts --------------------------------------------------------------------------------------------
    @property
    def key_ranks(self) -> list[int]:
        """Key latent dimensions per group of `group_size` KV heads, per layer."""
        return [layer.key.rank for layer in self.layers]

    @property
    def value_ranks(self) -> list[int]:
        """Value latent dimensions per group, per layer."""
        return [layer.value.rank for layer in self.layers]

    def latent_dims_per_token(self) -> int:
        """Latent values stored per token over all layers (keys + values)."""
        return sum((layer.key.rank + layer.value.rank) * layer.key.num_groups for layer in self.layers)

    def __repr__(self) -> str:
        g = self.geometry
        return (
            f"SVDBases(model_type={g.model_type!r}, layers={g.num_layers}, kv_heads={g.num_kv_heads}, "
            f"head_dim={g.head_dim}, group_size={self.group_size}, method={self.method!r}, "
            f"key_ranks={sorted(set(self.key_ranks))}, value_ranks={sorted(set(self.value_ranks))})"
        )

    # --- validation ---------------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raise BasesMismatchError naming the first difference between these bases' model and `model`."""
        geometry = model_geometry(model)
        for field, expected in self.geometry.to_dict().items():
            actual = getattr(geometry, field)
            if actual != expected:
                raise BasesMismatchError(
                    f"bases were computed for a model with {field}={expected}, this model has {actual}"
                )
        self._check_fingerprint(weight_fingerprint(model), "this model")

    def check_same_model(self, other: SVDBases) -> None:
        """Both sets of bases serve the same model (used when a cache meets a patched model)."""
        if self.geometry != other.geometry:
            raise BasesMismatchError(f"cache bases are for {other.geometry}, the model was patched for {self.geometry}")
        self._check_fingerprint(other.fingerprint, "the cache's bases")

    def _check_fingerprint(self, other: torch.Tensor, what: str) -> None:
        error = (self.fingerprint - other).norm(dim=-1) / self.fingerprint.norm(dim=-1).clamp_min(1e-12)
        worst = error.max().item()
        if worst > FINGERPRINT_TOLERANCE:
            layer, kind = divmod(int(error.argmax()), 2)
            raise BasesMismatchError(
                f"bases do not match {what}: layer {layer} W_{'kv'[kind]} differs by {worst:.1%} from the weights "
                f"the bases were computed on (another checkpoint?)"
            )

    # --- persistence --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {"fingerprint": self.fingerprint.contiguous()}
        for i, layer in enumerate(self.layers):
            for kind, proj in (("key", layer.key), ("value", layer.value)):
                for part in ("down", "up", "center"):
                    tensors[f"layers.{i}.{kind}.{part}"] = getattr(proj, part).contiguous()
                if proj.channel_bits is not None:
                    tensors[f"layers.{i}.{kind}.channel_bits"] = proj.channel_bits.contiguous()
        return tensors

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.state_dict()
        header = {
            "format_version": FORMAT_VERSION,
            "library": "hf_svdkv",
            "library_version": __version__,
            "geometry": self.geometry.to_dict(),
            "group_size": self.group_size,
            "method": self.method,
            "key_ranks": self.key_ranks,
            "value_ranks": self.value_ranks,
            "sha256": _state_digest(tensors),
        }
        path = directory / BASES_FILE
        save_file(tensors, str(path), metadata={"hf_svdkv": json.dumps(header)})
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SVDBases:
        path = Path(directory)
        path = path / BASES_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no bases at {path}: expected a directory written by SVDBases.save_pretrained")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {}).get("hf_svdkv", "null"))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"bases file {path} is corrupted or not a safetensors file: {err}") from None
        if not isinstance(header, dict) or header.get("library") != "hf_svdkv":
            raise ValueError(f"{path} is a safetensors file without hf_svdkv metadata: not a bases file")
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has bases format {header.get('format_version')}, this version reads {FORMAT_VERSION}"
            )
        if _state_digest(tensors) != header.get("sha256"):
            raise ValueError(f"bases file {path} was modified after it was written: its checksum does not match")
        # The checksum covers the tensors only: a header edited by hand must still agree with them.
        try:
            geometry, group_size, method = (
                ModelGeometry(**header["geometry"]),
                int(header["group_size"]),
                str(header["method"]),
            )
            groups = (geometry.num_kv_heads // group_size, group_size * geometry.head_dim)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
            raise ValueError(f"bases file {path} has a malformed header ({type(err).__name__}: {err})") from None
        try:
            layers = [
                LayerBases(
                    *(
                        Projection(
                            *(tensors[f"layers.{i}.{kind}.{p}"] for p in ("down", "up", "center")),
                            tensors.get(f"layers.{i}.{kind}.channel_bits"),
                        )
                        for kind in ("key", "value")
                    )
                )
                for i in range(geometry.num_layers)
            ]
        except KeyError as err:
            raise ValueError(
                f"bases file {path} lacks tensor {err}: it was not written for {geometry.num_layers} layers"
            ) from None
            for layer in layers:
                for proj in (layer.key, layer.value):
                    if proj.channel_bits is not None:
                        with_widths(proj, proj.channel_bits.tolist())
        except ValueError as err:  # channel widths that do not fit their projection
            raise ValueError(f"bases file {path}: {err}") from None
        if any(tuple(proj.down.shape[:2]) != groups for layer in layers for proj in (layer.key, layer.value)):
            raise ValueError(
                f"bases file {path}: its tensors do not fit the header's geometry and group_size "
                "(the header was edited?)"
            )
        return cls(layers, geometry, group_size, method, tensors["fingerprint"])


def with_widths(projection: Projection, widths: Sequence[int]) -> Projection:
    """`projection` with a bit width per channel (mixed-precision latents), checked: non-increasing, in WIDTHS."""
    if list(widths) != sorted(widths, reverse=True) or not set(widths) <= set(WIDTHS) - {0}:
        raise ValueError(f"channel widths must be non-increasing and in {WIDTHS[1:]}, got {list(widths)}")
    return dataclasses.replace(projection, channel_bits=torch.tensor(list(widths), dtype=torch.uint8))


def calibrate_bases(
    model: nn.Module,
    token_ids: torch.Tensor,
    config: CompressionConfig,
    *,
    sequence_length: int | None = None,
    **calibrator_options: Any,
) -> SVDBases:
    """Calibrated bases for `model` from the 1-D `token_ids` (use text disjoint from what you evaluate on), as many of
    them as `config.calibration` uses, spread over the text.

    With `config.target_ratio`, ranks are allocated per layer and between keys and values as `config.calibration`
    says; otherwise the config's uniform ranks are used. Options: those of `Calibrator` (they override the preset's)."""
    geometry = model_geometry(model)
    config.resolve_ranks(geometry.head_dim, geometry.num_kv_heads)  # fail on a bad config before calibrating
    preset = CALIBRATION_PRESETS[config.calibration]
    options = {"allocation": preset.allocation, "probe_tokens": preset.probe_tokens, **calibrator_options}
    calibrator = Calibrator(model, spread_tokens(token_ids, preset.tokens), **options)
    return SVDBases.from_calibrator(calibrator, config, sequence_length)
