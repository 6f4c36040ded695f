"""`patch_model`: the one-line, in-place, per-instance transform that makes `generate()` use compressed KV."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .architectures import attention_modules, cache_argument, decoder_model, model_geometry
from .attention import AttentionPatch, compressed_attention_forward
from .bases import SVDBases
from .compression_config import MIXED, CompressionConfig, check_latent_bits, check_window
from .fit import CalibrationText, fit_bases
from .svd_cache import SETTINGS_ATTRIBUTE, CacheSettings, SVDCompressedCache

STATE_ATTRIBUTE = "_hf_svdkv_patch"
ModelT = TypeVar("ModelT", bound=nn.Module)


@dataclass
class PatchState:
    """What `patch_model` did to a model: the settings its caches are built with, the config it was given, and every
    attribute it replaced."""

    settings: CacheSettings
    config: CompressionConfig | None
    # (object, attribute, the instance attribute it had before or None): exactly what unpatch puts back.
    replaced: list[tuple[object, str, Callable | None]] = field(default_factory=list)

    def replace(self, obj: object, attribute: str, new: Callable) -> None:
        self.replaced.append((obj, attribute, obj.__dict__.get(attribute)))
        obj.__dict__[attribute] = new


def patch_state(model: nn.Module) -> PatchState | None:
    """The patch installed on `model` by `patch_model`, or None."""
    return model.__dict__.get(STATE_ATTRIBUTE)


def is_patched(model: nn.Module) -> bool:
    return patch_state(model) is not None


def _forward_attribute(module: nn.Module) -> str:
    # accelerate's device-map hooks wrap `forward` and call `_old_forward`: patch underneath them.
    return "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"


@contextmanager
def onloaded_kv_weights(model: nn.Module) -> Iterator[None]:
    """Inside, every layer's k/v/o projection weights are real CPU tensors even where accelerate offloaded them (to
    cpu or disk, leaving `meta` placeholders behind its hooks), so bases can be fitted and validated; on exit the
    hooks offload them again. Costs CPU memory for all k/v/o projections at once (whole decoder layers where a layer
    is offloaded as one block). A no-op for a model without offloading."""
    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:  # accelerate < 1.1: nothing to onload with
        yield
        return
    cpu = torch.device("cpu")
    with ExitStack() as stack:
        for layer in decoder_model(model).layers:
            attn = getattr(layer, "self_attn", None)
            owners = (layer, attn, *(getattr(attn, name, None) for name in ("k_proj", "v_proj", "o_proj")))
            for owner in owners:
                if owner is not None and has_offloaded_params(owner):
                    stack.enter_context(align_module_device(owner, cpu))
        yield


def _prepare_compressed_cache(
    model: nn.Module, original: Callable, cache_name: str, generation_config, model_kwargs: dict, *args, **kwargs
):
    """generate()'s cache preparation, choosing an SVDCompressedCache where it would have built a DynamicCache."""
    wants_default_cache = (
        model_kwargs.get("past_key_values") is None
        and model_kwargs.get("cache") is None
        and generation_config.use_cache is not False
        and generation_config.cache_implementation is None
    )
    if not wants_default_cache:
        return original(generation_config, model_kwargs, *args, **kwargs)
    model_kwargs[cache_name] = SVDCompressedCache(model)


def patch_model(
    model: ModelT,
    config: CompressionConfig | None = None,
    *,
    bases: SVDBases | None = None,
    tokenizer: Any = None,
    calibration_text: CalibrationText | None = None,
    bases_cache: bool | str | Path = True,
    window: int | None = None,
    latent_bits: int | None = None,
    exact_prefill: bool | None = None,
    sinks: int | None = None,
) -> ModelT:
    """Make `model` store its KV cache as low-rank latents; returns the same model, patched in place.

    `patch_model(model, CompressionConfig(target_ratio=4.0), tokenizer=tokenizer)` fits calibrated bases (key PCA
    before RoPE, output-aware value PCA, a bit width per latent channel allocated for the ratio) on
    `calibration_text` (a string, strings or 1-D token ids; default: the embedded offline corpus), in seconds, and
    caches them on disk (`bases_cache`: True = the default folder, a path, or False; see `hf_svdkv.bases_cache`), so
    the next call loads them. Without a config the cache is 4x smaller (`CompressionConfig()`). `tokenizer` defaults
    to the one saved with the model. Or give precomputed `bases` (validated against the model). `window` and
    `latent_bits` (default: the config's) keep that many recent tokens at full precision and store latents as 8/4-bit
    integers or mixed widths; `exact_prefill` (default: the config's, else True) lets a prompt attend over its own
    exact keys and values; `sinks` keeps the first tokens at full precision.

    Only this instance changes; `unpatch_model` undoes it exactly. A stock `model.generate(...)` then uses an
    `SVDCompressedCache`; passing `cache_implementation="dynamic"` or another cache still works and bypasses
    compression.
    """
    if config is not None and bases is not None:
        raise ValueError("patch_model takes a CompressionConfig or SVDBases, not both")
    if bases is None and config is None:
        config = CompressionConfig()
    if config is not None and not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
    model_geometry(model)
    modules = attention_modules(model)
    if is_patched(model):
        unpatch_model(model)
    with onloaded_kv_weights(model):
        if bases is None:
            bases = fit_bases(
                model, config, tokenizer=tokenizer, calibration_text=calibration_text, bases_cache=bases_cache
            )
        else:
            bases.validate(model)

    if window is None:
        window = config.window if config is not None else 0
    check_window(window)
    if window and getattr(model.config, "_attn_implementation", None) not in ("eager", "sdpa"):
        raise ValueError(
            "a full-precision window needs the eager or sdpa attention backend, "
            f"not {model.config._attn_implementation!r}"
        )
    if latent_bits is None and config is not None:
        latent_bits = config.latent_bits
    elif latent_bits is None and all(p.channel_bits is not None for b in bases.layers for p in (b.key, b.value)):
        latent_bits = MIXED  # bases fitted with a bit width per channel are read at those widths
    check_latent_bits(latent_bits)
    if exact_prefill is None:
        exact_prefill = config.exact_prefill if config is not None else True
    if sinks is None:
        sinks = config.sinks if config is not None else 0
    check_window(sinks, "sinks")
    settings = CacheSettings(bases, window, latent_bits, bool(exact_prefill), sinks)
    state = PatchState(settings=settings, config=config)
    rotary_emb = decoder_model(model).rotary_emb
    for module in modules:
        attribute = _forward_attribute(module)
        original_forward = getattr(module, attribute)
        patch = AttentionPatch(
            original_forward=original_forward,
            rotary_emb=rotary_emb,
            bases=bases,
            cache_argument=cache_argument(original_forward),
        )
        state.replace(module, attribute, partial(compressed_attention_forward, module, patch))
    if hasattr(model, "_prepare_cache_for_generation"):
        original = model._prepare_cache_for_generation
        state.replace(
            model,
            "_prepare_cache_for_generation",
            partial(_prepare_compressed_cache, model, original, cache_argument(model.forward)),
        )
    model.__dict__[STATE_ATTRIBUTE] = state
    model.__dict__[SETTINGS_ATTRIBUTE] = settings  # what SVDCompressedCache(model) is built with
    return model


def unpatch_model(model: ModelT) -> ModelT:
    """Undo `patch_model`: the model behaves, and is, as before. A no-op on an unpatched model."""
    state = model.__dict__.pop(STATE_ATTRIBUTE, None)
    model.__dict__.pop(SETTINGS_ATTRIBUTE, None)
    if state is None:
        return model
    for obj, attribute, previous in reversed(state.replaced):
        if previous is None:
            del obj.__dict__[attribute]
        else:
            obj.__dict__[attribute] = previous
    return model
