"""`hf_svdkv.loading`, the import path the README's quickstart used: `ModelConfig` and `load_model` (`tools.loading`)."""

from .tools.loading import ModelConfig, load_model  # noqa: F401
