"""The seed's `ModelConfigWrapper` (one view of any model's configuration) and `LLaMA3Loader` (a model's attention
weights read layer by layer from its checkpoint, without loading the model), built on the core's geometry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from ..architectures import ModelGeometry, config_geometry
from ..tools.loading import ModelConfig

ATTENTION_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _resolve(source: Any) -> PretrainedConfig:
    """A transformers config from a config, a model, a `ModelConfig`, a folder or a Hub id."""
    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, nn.Module) and hasattr(source, "config"):
        return source.config
    return AutoConfig.from_pretrained(str(model_directory(source)))


def model_directory(source: ModelConfig | str | Path | None = None) -> Path:
    """The folder of a `save_pretrained` checkpoint: the embedded default (converted on first use), a local folder, or
    a Hub id already in the local Hugging Face cache."""
    from ..assets import default_model_dir

    if source is None or isinstance(source, ModelConfig):
        config = source or ModelConfig.from_env()
        if config.model_path is None:
            return default_model_dir(config.torch_dtype)
        source = config.model_path
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), local_files_only=True))
    except Exception as error:  # not downloaded: the loader reads checkpoints, it does not fetch them
        raise FileNotFoundError(
            f"no local checkpoint for {source!r} ({type(error).__name__}): download it first"
        ) from None


class ModelConfigWrapper:
    """The attention-relevant facts of any supported model's configuration under one set of names.

    Args:
        model_config: a transformers config, a model, a `ModelConfig`, a checkpoint folder or a Hub id (cached)."""

    def __init__(self, model_config: Any = None):
        self.config = _resolve(model_config)
        self.text_config = self.config.get_text_config(decoder=True)
        self.geometry: ModelGeometry = config_geometry(self.text_config)

    def __getattr__(self, name: str) -> Any:
        # The geometry's names first (num_layers, num_kv_heads, head_dim, ...), then the config's own.
        if name in ModelGeometry.__dataclass_fields__:
            return getattr(self.geometry, name)
        if name in ("config", "text_config", "geometry"):
            raise AttributeError(name)
        return getattr(self.text_config, name)

    @property
    def heads_per_kv_head(self) -> int:
        return self.geometry.num_heads // self.geometry.num_kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes a 16-bit full KV cache holds per token."""
        g = self.geometry
        return 2 * g.num_layers * g.num_kv_heads * g.head_dim * 2

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.geometry),
            "vocab_size": self.text_config.vocab_size,
            "max_position_embeddings": getattr(self.text_config, "max_position_embeddings", None),
            "kv_bytes_per_token": self.kv_bytes_per_token,
        }

    def __repr__(self) -> str:
        return f"ModelConfigWrapper({self.to_dict()})"


class LLaMA3Loader:
    """A model's attention weights, read one layer at a time from its safetensors checkpoint: memory holds one layer's
    q/k/v/o projections at a time, never the model (the seed's "memory-safe" loading of large checkpoints).

    Args:
        model_config: a `ModelConfig`, a checkpoint folder or a cached Hub id (None: `ModelConfig.from_env()`)."""

    def __init__(self, model_config: ModelConfig | str | Path | None = None):
        self.directory = model_directory(model_config)
        self.config = ModelConfigWrapper(self.directory)
        self._index = self._weight_index()

    def _weight_index(self) -> dict[str, Path]:
        """Tensor name -> the safetensors file holding it (one file, or a sharded index)."""
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            return {name: self.directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        single = self.directory / "model.safetensors"
        if not single.is_file():
            raise FileNotFoundError(f"{self.directory} has no safetensors checkpoint (model.safetensors or an index)")
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return {name: single for name in handle.keys()}

    def layer_weights(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """{"q_proj": W, "k_proj": W, ... (and "k_proj.bias" ... where they exist)} of one decoder layer."""
        from safetensors import safe_open

        if not 0 <= layer_idx < self.config.num_layers:
            raise IndexError(f"layer {layer_idx} out of range: the model has {self.config.num_layers} layers")
        prefix = next(
            (
                p
                for p in ("model.layers", "model.language_model.layers")
                if f"{p}.{layer_idx}.self_attn.k_proj.weight" in self._index
            ),
            None,
        )
        if prefix is None:
            raise KeyError(f"no attention weights for layer {layer_idx} in {self.directory}")
        weights = {}
        for projection in ATTENTION_WEIGHTS:
            for kind in ("weight", "bias"):
                name = f"{prefix}.{layer_idx}.self_attn.{projection}.{kind}"
                if name in self._index:
                    with safe_open(str(self._index[name]), framework="pt") as handle:
                        weights[projection if kind == "weight" else f"{projection}.bias"] = handle.get_tensor(name)
        return weights

    def iter_layers(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(layer index, its attention weights), one layer in memory at a time."""
        for layer_idx in range(self.config.num_layers):
            yield layer_idx, self.layer_weights(layer_idx)

    def load_model_data(self, layers: list[int] | None = None) -> dict[str, Any]:
        """The configuration and the attention weights of `layers` (default: all; each read on its own)."""
        chosen = range(self.config.num_layers) if layers is None else layers
        return {"config": self.config.to_dict(), "layers": {i: self.layer_weights(i) for i in chosen}}
