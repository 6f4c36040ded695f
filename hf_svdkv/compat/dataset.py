"""`LLaMADatasetProcessor`: the seed's dataset loader, on `hf_svdkv.data` (offline corpus when the Hub is away)."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..text import load_text, make_windows, tokenize_text

FALLBACK_DATASET = "wiki"


class LLaMADatasetProcessor:
    """Loads a text corpus as documents and cuts it into token windows for compression experiments.

    Args:
        model_loader: supplies the tokenizer (and vocab size); default: a `LLaMAModelLoader` from the environment,
            created only when a tokenizer is first needed.
        tokenizer: used instead of the loader's.
        max_length: tokens per window in `preprocess_for_compression`.
    """

    def __init__(
        self, model_loader: Any = None, tokenizer: PreTrainedTokenizerBase | None = None, max_length: int = 512
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.model_loader = model_loader
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.source: str | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            if self.model_loader is None:
                from .model_loader import LLaMAModelLoader

                self.model_loader = LLaMAModelLoader()
            self._tokenizer = self.model_loader.tokenizer
        return self._tokenizer

    def load_dataset(self, name: str = "wikitext", text_file: str | None = None) -> list[str]:
        """The corpus as a list of documents (paragraphs, or lines where it has no blank lines).

        ``wikitext`` needs the Hugging Face Hub; without it the offline default (a Wikipedia excerpt, CC BY-SA 3.0)
        is used, with a warning. ``wiki`` and ``lee`` are offline. `self.source` records what was loaded."""
        try:
            text = load_text(name, text_file)
            self.source = text_file or name
        except ConnectionError as err:
            warnings.warn(f"{err}; using the offline '{FALLBACK_DATASET}' corpus instead", stacklevel=2)
            text = load_text(FALLBACK_DATASET)
            self.source = FALLBACK_DATASET
        documents = re.split(r"\n\s*\n", text)
        if len(documents) == 1:  # no blank lines: one document per line (the Lee corpus)
            documents = text.splitlines()
        return [doc.strip() for doc in documents if doc.strip()]

    def preprocess_for_compression(
        self,
        dataset: str | list[str],
        max_length: int | None = None,
        num_samples: int | None = 8,
    ) -> dict[str, Any]:
        """`num_samples` consecutive windows of `max_length` tokens from the start of the corpus (None = every
        window of the whole corpus). Returns ``input_ids`` [samples, max_length], ``attention_mask``, the counts
        and the source. Only as much text as the windows need is tokenized."""
        length = max_length or self.max_length
        documents = [dataset] if isinstance(dataset, str) else list(dataset)
        if not documents:
            raise ValueError("the dataset is empty")
        tokenizer = self.tokenizer
        # The model's vocab (without the tokenizer's added tokens) bounds the ids it can embed, when it is loaded.
        loaded = self.model_loader is not None and getattr(self.model_loader, "is_loaded", False)
        vocab_size = getattr(self.model_loader, "vocab_size", None) if loaded else None
        needed = None if num_samples is None else num_samples * length
        pieces, count = [], 0
        for doc in documents:
            ids = tokenize_text(tokenizer, doc + "\n\n", vocab_size)
            pieces.append(ids)
            count += ids.numel()
            if needed is not None and count >= needed:
                break
        stream = torch.cat(pieces)
        if stream.numel() < length:
            raise ValueError(f"the dataset has {stream.numel()} tokens, fewer than one window of {length}")
        fits = stream.numel() // length
        n = fits if num_samples is None else min(num_samples, fits)
        if num_samples is not None and n < num_samples:
            warnings.warn(f"only {n} windows of {length} tokens fit (asked for {num_samples})", stacklevel=2)
        windows = make_windows(stream[: n * length], length, n)
        input_ids = torch.stack(windows)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "num_samples": n,
            "sequence_length": length,
            "source": self.source,
        }
