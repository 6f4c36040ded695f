"""The library's logger, "hf_svdkv": what it fitted, loaded or skipped, one line each.

Like transformers' own logger, it writes to stderr by itself (level INFO, or $HF_SVDKV_VERBOSITY: debug, info,
warning, error) and does not propagate to the root logger; `logging.getLogger("hf_svdkv").setLevel(...)` or
removing its handler changes that."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("hf_svdkv")


def configure() -> None:
    """Give the library logger its stderr handler and level, once (idempotent)."""
    if any(getattr(handler, "_hf_svdkv", False) for handler in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("hf_svdkv: %(message)s"))
    handler._hf_svdkv = True
    logger.addHandler(handler)
    level = os.environ.get("HF_SVDKV_VERBOSITY", "info").strip().upper()
    logger.setLevel(level if level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "INFO")
    logger.propagate = False
