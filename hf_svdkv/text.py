"""Text for calibration and evaluation: load a corpus, tokenize it, and cut deterministic, disjoint windows from it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import assets

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DATASETS = ("wiki", "lee", "wikitext")


def load_text(dataset: str = "wiki", text_file: str | None = None) -> str:
    """The evaluation text as one string.

    ``text_file`` (a UTF-8 file) wins over ``dataset``. Datasets: ``wiki`` (default, offline: an
    English Wikipedia excerpt, CC BY-SA 3.0), ``lee`` (offline: Lee news corpus, small and fast),
    ``wikitext`` (WikiText-2 raw test split from the Hugging Face Hub, joined with blank lines as usual).
    """
    if text_file is not None:
        path = Path(text_file).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"text file not found: {path}") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"text file {path} is not valid UTF-8 (byte {err.start}): convert it first") from None
        except OSError as err:
            raise OSError(f"cannot read text file {path}: {err.strerror or err}") from None
    if dataset in ("wiki", "lee"):
        return assets.default_corpus_path(dataset).read_text(encoding="utf-8")
    if dataset == "wikitext":
        return _load_wikitext()
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)} or pass a text file")


def _load_wikitext() -> str:
    hint = "use the offline default (--dataset wiki) or pass --text-file"
    if not assets.hub_offline() and not assets.hub_reachable():  # fail now instead of after a minute of retries
        raise ConnectionError(f"cannot load wikitext: the Hugging Face Hub is not reachable; {hint}")
    import datasets

    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, HfHubHTTPError...)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConnectionError(f"cannot load wikitext ({detail}); {hint}") from err
    return "\n\n".join(rows)


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str, vocab_size: int | None = None) -> torch.LongTensor:
    """Token ids of ``text`` as a 1-D LongTensor, without BOS/EOS (perplexity wants plain text).

    Ids at or above ``vocab_size`` (default ``tokenizer.vocab_size``, i.e. without added tokens;
    pass ``model.config.vocab_size``) would index past the embedding matrix, so they raise.
    """
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    limit = vocab_size if vocab_size is not None else tokenizer.vocab_size
    if ids.numel() and int(ids.max()) >= limit:
        bad = sorted(set(ids[ids >= limit].tolist()))[:5]
        raise ValueError(
            f"text tokenizes to ids {bad} >= vocab size {limit} (added/special tokens the model cannot embed)"
        )
    return ids


def make_windows(
    ids: torch.Tensor, window_len: int, n_windows: int, *, start: int = 0, stop: int | None = None
) -> list[torch.Tensor]:
    """``n_windows`` non-overlapping windows of ``window_len`` tokens, evenly spread over ``ids[start:stop]``.

    The first window starts at ``start`` and the last ends at ``stop``, so runs are reproducible and
    cover the whole range. If fewer windows fit, it warns and returns as many as fit.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if window_len < 1 or n_windows < 1:
        raise ValueError(f"window_len and n_windows must be >= 1, got {window_len} and {n_windows}")
    start, stop, _ = slice(start, stop).indices(ids.numel())
    available = max(stop - start, 0)
    if available < window_len:
        raise ValueError(
            f"text too short: {available} tokens, need at least {window_len} for one window of "
            f"{window_len} tokens; use a longer text or a shorter window"
        )
    fit = available // window_len
    if fit < n_windows:
        warnings.warn(
            f"only {fit} windows of {window_len} tokens fit in {available} tokens (asked for {n_windows})", stacklevel=2
        )
        n_windows = fit
    slack = available - n_windows * window_len
    gaps = [0 if n_windows == 1 else i * slack // (n_windows - 1) for i in range(n_windows)]
    return [
        ids[start + i * window_len + gap : start + (i + 1) * window_len + gap].clone() for i, gap in enumerate(gaps)
    ]


def split_calibration(ids: torch.Tensor, calib_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``ids`` into ``(calib_ids, eval_ids)``: calibration takes the last ``calib_tokens``.

    Fitting a compressor on text it is then scored on flatters it; reserving the end of the corpus
    keeps every evaluation window (cut from ``eval_ids``) disjoint from the calibration text.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if not 0 < calib_tokens < ids.numel():
        raise ValueError(f"calib_tokens must be in [1, {ids.numel() - 1}] for {ids.numel()} tokens, got {calib_tokens}")
    cut = ids.numel() - calib_tokens
    return ids[cut:], ids[:cut]
