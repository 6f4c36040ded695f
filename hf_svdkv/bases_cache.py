"""Fitted bases kept on disk, so that fitting them once serves every later `patch_model` of the same model and config.

An entry is a folder `<cache>/bases/<key>/` written by `SVDBases.save_pretrained`. The key is a digest of everything
the bases depend on: the model's attention weights (k/v/o projections, as stored, so another checkpoint, a fine-tune
or another dtype is another key), its geometry, the config's fields that shape the bases, the calibration token ids,
and `FORMAT` (bumped whenever fitting changes). An entry is read back through `SVDBases.from_pretrained` (checksum)
and validated against the model; one that fails either is refitted and overwritten, never trusted.

Where: `$HF_SVDKV_BASES_CACHE` if set to a folder, else `<$HF_SVDKV_CACHE or ~/.cache/hf_svdkv>/bases`.
`HF_SVDKV_BASES_CACHE=0` (or `patch_model(..., bases_cache=False)`) turns the cache off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from .architectures import attention_modules, model_geometry
from .bases import BASES_FILE, SVDBases
from .bit_allocation import WIDTHS, relative_error
from .compression_config import MIXED, CompressionConfig

logger = logging.getLogger("hf_svdkv")

ENV = "HF_SVDKV_BASES_CACHE"
OFF = ("0", "false", "off", "no")
# Part of every key: entries written by an older way of fitting are simply never found again.
FORMAT = "hf_svdkv-bases-cache-1"
# CompressionConfig fields that decide the bases (the window and latent bits count in a ratio's byte budget).
_KEY_FIELDS = (
    "key_rank",
    "value_rank",
    "profile",
    "target_ratio",
    "method",
    "window",
    "sinks",
    "latent_bits",
    "calibration",
)


def cache_folder(bases_cache: bool | str | Path = True) -> Path | None:
    """Where cached bases live, or None when caching is off (`bases_cache=False` or HF_SVDKV_BASES_CACHE=0)."""
    env = os.environ.get(ENV, "").strip()
    if bases_cache is False or env.lower() in OFF:
        return None
    if isinstance(bases_cache, (str, Path)):
        return Path(bases_cache).expanduser()
    if env:
        return Path(env).expanduser()
    from .assets import cache_dir

    return cache_dir() / "bases"


def weights_digest(model: nn.Module) -> str:
    """sha256 of every layer's k/v/o projection weights and biases, exactly as stored (dtype included)."""
    digest = hashlib.sha256()
    for attn in attention_modules(model):
        for linear in (attn.k_proj, attn.v_proj, attn.o_proj):
            for tensor in (linear.weight, linear.bias):
                if tensor is None:
                    digest.update(b"none")
                    continue
                data = tensor.detach().to("cpu").contiguous()
                digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
                digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def entry_key(
    model: nn.Module, config: CompressionConfig, token_ids: torch.Tensor | None, sequence_length: int | None = None
) -> str:
    """The digest naming the cache entry of these bases."""
    geometry = model_geometry(model)
    description = {
        "format": FORMAT,
        "geometry": geometry.to_dict(),
        "weights": weights_digest(model),
        "config": {name: getattr(config, name) for name in _KEY_FIELDS},
        "group_size": config.heads_per_group(geometry.num_kv_heads),
        "sequence_length": sequence_length,
        "tokens": None
        if token_ids is None
        else hashlib.sha256(token_ids.to(torch.int64).numpy().tobytes()).hexdigest(),
    }
    if config.latent_bits == MIXED:
        # Channel widths follow the quantizer's measured errors: a better quantizer allocates differently.
        description["quantizer"] = [round(relative_error(bits), 6) for bits in WIDTHS]
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def _load(entry: Path, model: nn.Module) -> SVDBases | None:
    if not (entry / BASES_FILE).is_file():
        return None
    try:
        bases = SVDBases.from_pretrained(entry)
        bases.validate(model)
    except (ValueError, OSError) as error:  # corrupted, edited, or for other weights: refit, never trust
        logger.warning("cached bases at %s are unusable (%s): fitting them again", entry, error)
        return None
    return bases


def _store(entry: Path, bases: SVDBases, description: dict) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary sibling, then renamed: a reader never sees half an entry.
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        bases.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_bases(
    model: nn.Module,
    config: CompressionConfig,
    fit: Callable[[], SVDBases],
    *,
    token_ids: torch.Tensor | None = None,
    sequence_length: int | None = None,
    bases_cache: bool | str | Path = True,
    description: dict | None = None,
) -> tuple[SVDBases, Path | None, bool]:
    """(bases, their cache entry or None, whether they came from the cache): the cached entry for this model,
    config and calibration tokens when there is a usable one, else `fit()`, stored for next time."""
    folder = cache_folder(bases_cache)
    if folder is None:
        return fit(), None, False
    entry = folder / entry_key(model, config, token_ids, sequence_length)
    folder.mkdir(parents=True, exist_ok=True)
    # Two processes fitting the same entry at once would do the work twice: the second waits, then reads it.
    with FileLock(str(entry) + ".lock"):
        bases = _load(entry, model)
        if bases is not None:
            return bases, entry, True
        bases = fit()
        record = {"config": dataclasses.asdict(config), "sequence_length": sequence_length, **(description or {})}
        _store(entry, bases, record)
    return bases, entry, False
