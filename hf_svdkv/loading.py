"""`hf_svdkv.loading`, the import path older quickstarts used: `ModelConfig` and `load_model` (`tools.loading`)."""

from .tools.loading import ModelConfig, load_model  # noqa: F401
