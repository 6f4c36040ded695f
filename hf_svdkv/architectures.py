"""Which models hf_svdkv can patch, and the shape facts the bases are validated against."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

from torch import nn

# Llama-family attention: q/k/v/o projections, rotate-half RoPE applied to q and k right after projection,
# no per-head norms. Qwen2 adds k/v biases, Mistral a sliding window mask; both fit the same forward.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    """The model's architecture is not one hf_svdkv knows how to patch."""


@dataclass(frozen=True)
class ModelGeometry:
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def decoder_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no transformers config: hf_svdkv patches transformers models"
        )
    return config.get_text_config(decoder=True)


def model_geometry(model: nn.Module) -> ModelGeometry:
    """Check the model is a supported architecture and return its attention geometry."""
    return config_geometry(decoder_config(model), type(model).__name__)


def config_geometry(config, what: str = "") -> ModelGeometry:
    """`model_geometry` from a (decoder) transformers config alone: no weights needed."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({what or type(config).__name__}) is not supported: hf_svdkv patches "
            f"Llama-family decoders ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    layer_types = getattr(config, "layer_types", None) or []
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        raise UnsupportedModelError(f"layer types {sorted(set(layer_types))} are not supported: only attention layers")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelGeometry(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
    )


def decoder_model(model: nn.Module) -> nn.Module:
    """The inner decoder (`LlamaModel`) that owns the layers and the rotary embedding."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder layers with a rotary embedding")
    return inner


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    modules = []
    for index, layer in enumerate(decoder_model(model).layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise UnsupportedModelError(f"decoder layer {index} has no q/k/v/o-projection self-attention")
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            raise UnsupportedModelError(
                f"decoder layer {index} normalises q/k per head, which hf_svdkv does not support"
            )
        modules.append(attn)
    return modules


def cache_argument(forward: object) -> str:
    """The name a model's or attention module's forward takes its KV cache under: `cache` since transformers 5.24,
    `past_key_values` before (the old name still works there, with a deprecation warning)."""
    try:
        return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def cache_kwargs(model: nn.Module, cache: object) -> dict[str, object]:
    """`{name: cache}` for a call of `model`, under the name its forward expects."""
    return {cache_argument(model.forward): cache}
