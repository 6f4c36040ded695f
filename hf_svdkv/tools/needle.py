"""Passkey retrieval: is a fact deep in a long prompt still there after compression?

A trial hides a random key (digits) in a sentence at depth `d` (0 = the start, 1 = the end) of a document of filler
text, then asks for it. The document is prefilled into a fresh cache and the question follows as a later forward, as a
follow-up turn does: so every token of the answer reads the document from the cache under test (a prompt is attended
exactly by an `SVDCompressedCache`, so a question inside it would be answered from full-precision keys). A trial passes
when the key appears in the greedy answer. `key_nll` is the mean negative log-likelihood of the key's tokens,
teacher-forced after the question: a continuous measure, far less noisy than pass or fail on a small model.

Filler comes from text never used for calibration (the scored part of the corpus, or a file); its offset, the key and
the depth's exact position are drawn from a seeded generator, so every row sees the same trials.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures import cache_kwargs
from . import report
from .memory import cache_nbytes

KEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
KEY_DIGITS = 5
ANSWER_TOKENS = 10
# A row's accuracy over this many trials has a standard error of at most 0.5 / sqrt(n) < 5 points.
MIN_TRIALS_PER_ROW = 101


@dataclass
class Trial:
    """One prompt: `document` [n] holds `key` at token `key_at`; `question` [m] asks for it; `key_ids` are the key's
    tokens as the model should answer them."""

    document: torch.Tensor
    question: torch.Tensor
    key: str
    key_ids: torch.Tensor
    key_at: int


@dataclass
class NeedleCell:
    length: int
    depth: float
    hits: int
    trials: int
    key_nll: float


@dataclass
class NeedleRow:
    name: str
    accuracy: float
    key_nll: float
    kv_bytes_per_token: float
    compression_ratio: float
    cells: list[NeedleCell]


@dataclass
class NeedleResult:
    model: str
    rows: list[NeedleRow]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "rows": [asdict(row) for row in self.rows], "settings": self.settings}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeedleResult:
        """The result a `--json` file holds (to redraw or re-tabulate it)."""
        rows = [NeedleRow(**{**row, "cells": [NeedleCell(**cell) for cell in row["cells"]]}) for row in data["rows"]]
        return cls(data["model"], rows, data["settings"])


def default_trials(lengths: Sequence[int], depths: Sequence[float]) -> int:
    """Trials per cell so that a row has at least MIN_TRIALS_PER_ROW."""
    return math.ceil(MIN_TRIALS_PER_ROW / (len(lengths) * len(depths)))


def make_trial(tokenizer: Any, filler: torch.Tensor, length: int, depth: float, rng: random.Random) -> Trial:
    """A document of `length` tokens minus the question's, filler from `filler` (1-D token ids) at a random offset, with
    the key sentence inserted at `depth` of it."""
    key = "".join(str(rng.randrange(10)) for _ in range(KEY_DIGITS))
    sentence = _ids(tokenizer, KEY_SENTENCE.format(key=key))
    question = _ids(tokenizer, QUESTION)
    filler_len = length - len(sentence) - len(question)
    if filler_len < 1:
        raise ValueError(f"a prompt of {length} tokens is too short for the key sentence and the question")
    if filler.numel() < filler_len:
        raise ValueError(f"the filler text has {filler.numel():,} tokens, a {length}-token prompt needs {filler_len:,}")
    start = rng.randrange(filler.numel() - filler_len + 1)
    text = filler[start : start + filler_len]
    at = round(depth * filler_len)
    document = torch.cat([text[:at], sentence, text[at:]])
    return Trial(document, question, key, _ids(tokenizer, " " + key), at)


def _ids(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def run_trial(model: nn.Module, tokenizer: Any, trial: Trial, cache: Any) -> tuple[bool, float]:
    """(the key is in the greedy answer, mean NLL of the key's tokens teacher-forced after the question)."""
    device = model.device
    kwargs = cache_kwargs(model, cache)
    with torch.inference_mode():
        model(trial.document[None].to(device), **kwargs, use_cache=True, logits_to_keep=1)
        last = model(trial.question[None].to(device), **kwargs, use_cache=True, logits_to_keep=1).logits[:, -1]
        # The key's likelihood on a copy, so that greedy decoding continues from the cache as the question left it.
        forced = fork(cache)
        key_ids = trial.key_ids[None].to(device)
        rest = (
            model(key_ids[:, :-1], **cache_kwargs(model, forced), use_cache=True).logits
            if key_ids.shape[1] > 1
            else None
        )
        logits = last[:, None] if rest is None else torch.cat([last[:, None], rest], dim=1)
        nll = torch.nn.functional.cross_entropy(logits[0].float(), key_ids[0]).item()
        answer = [int(last.argmax(-1))]
        # Once the key is in the answer the trial has passed, whatever follows.
        while len(answer) < ANSWER_TOKENS and trial.key not in tokenizer.decode(answer, skip_special_tokens=True):
            token = torch.tensor([answer[-1:]], device=device)
            answer.append(int(model(token, **kwargs, use_cache=True).logits[:, -1].argmax(-1)))
    return trial.key in tokenizer.decode(answer, skip_special_tokens=True), nll


def fork(cache: Any) -> Any:
    """An independent copy of `cache`. Quantized tensor subclasses (quanto's) cannot be deep-copied; a quantized cache
    layer replaces them on update and never writes into them, so the copy shares them."""
    shared = {
        id(value): value
        for layer in getattr(cache, "layers", ())
        for value in vars(layer).values()
        if isinstance(value, torch.Tensor) and type(value) not in (torch.Tensor, nn.Parameter)
    }
    return copy.deepcopy(cache, shared)


def run_needle(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Any],
    filler: torch.Tensor,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int = 0,
    model_name: str = "",
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> NeedleResult:
    """Every row (an `eval.RowSpec`; rows[0] the baseline) on the same trials: `trials` per (length, depth) cell."""
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit and max(lengths) + ANSWER_TOKENS > limit:
        raise ValueError(f"--lengths {max(lengths):,} (+ the answer) is beyond the model's {limit:,} positions")
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(
            f"--depths must lie in [0, 1] (0 = the start of the document, 1 = its end), got {list(depths)}"
        )
    cells = [(length, depth) for length in lengths for depth in depths]
    plan = {}
    for length, depth in cells:
        rng = random.Random(f"{seed}-{length}-{depth}")
        plan[length, depth] = [make_trial(tokenizer, filler, length, depth, rng) for _ in range(trials)]
    for spec in rows:
        spec.prepare(model, [min(lengths), 8])
    measured = []
    for spec in rows:
        factory = spec.setup(model)
        try:
            row_cells, bytes_per_token = [], []
            bar = tqdm(total=len(cells) * trials, desc=spec.name, unit="trial", disable=not progress, leave=False)
            for length, depth in cells:
                hits, nlls = 0, []
                for trial in plan[length, depth]:
                    cache = factory()
                    hit, nll = run_trial(model, tokenizer, trial, cache)
                    hits += hit
                    nlls.append(nll)
                    bytes_per_token.append(cache_nbytes(cache) / cache.get_seq_length())
                    bar.update()
                row_cells.append(NeedleCell(length, depth, hits, trials, sum(nlls) / len(nlls)))
            bar.close()
        finally:
            spec.teardown(model)
        total_hits = sum(c.hits for c in row_cells)
        key_nll = sum(c.key_nll for c in row_cells) / len(row_cells)
        measured.append(
            (
                spec.name,
                total_hits / (len(cells) * trials),
                key_nll,
                sum(bytes_per_token) / len(bytes_per_token),
                row_cells,
            )
        )
    base_bytes = measured[0][3]
    result_rows = [
        NeedleRow(name, acc, nll, bpt, base_bytes / bpt, row_cells) for name, acc, nll, bpt, row_cells in measured
    ]
    all_settings = {
        "lengths": list(lengths),
        "depths": list(depths),
        "trials_per_cell": trials,
        "seed": seed,
        "baseline": rows[0].name,
        **(settings or {}),
    }
    return NeedleResult(model_name, result_rows, all_settings)


# --- reporting --------------------------------------------------------------------------------------------------------
PLOT_COLUMNS = 5  # heat maps per line of the figure
COLUMNS = ("row", "accuracy", "± s.e.", "key NLL", "KV bytes/token", "ratio")


def table_rows(result: NeedleResult) -> list[tuple[str, ...]]:
    cells = []
    for row in result.rows:
        n = sum(c.trials for c in row.cells)
        error = math.sqrt(row.accuracy * (1 - row.accuracy) / n)
        cells.append(
            (
                row.name,
                f"{row.accuracy:.0%}",
                f"{error:.0%}",
                f"{row.key_nll:.3f}",
                f"{row.kv_bytes_per_token:,.1f}",
                f"{row.compression_ratio:.2f}x",
            )
        )
    return cells


def print_table(result: NeedleResult, out: Any = None) -> None:
    report.print_table(f"{result.model} · passkey retrieval", COLUMNS, table_rows(result), out)


def to_markdown(result: NeedleResult, command: str | None = None) -> str:
    """The table, then accuracy per length for every row next to the baseline's: lengths where the uncompressed model
    itself retrieves under half of the keys are marked, the model's limit rather than the cache's."""
    settings = result.settings
    lines = [f"`{command}`", ""] if command else []
    lines += [
        f"{result.model} · lengths {', '.join(map(str, settings['lengths']))} · depths "
        f"{', '.join(f'{d:g}' for d in settings['depths'])} · {settings['trials_per_cell']} trials per cell",
        "",
        *report.markdown_table(COLUMNS, table_rows(result)),
        "",
    ]
    lengths = settings["lengths"]
    base = {length: _accuracy(result.rows[0], length) for length in lengths}
    header = ["row", *(f"{length:,} tokens" + (" (*)" if base[length] < 0.5 else "") for length in lengths)]
    per_length = [(row.name, *(f"{_accuracy(row, length):.0%}" for length in lengths)) for row in result.rows]
    lines += report.markdown_table(header, per_length)
    if any(acc < 0.5 for acc in base.values()):
        lines += ["", f"(*) the uncompressed model ({result.rows[0].name}) retrieves under half of the keys there."]
    return "\n".join(lines) + "\n"


def _accuracy(row: NeedleRow, length: int) -> float:
    cells = [c for c in row.cells if c.length == length]
    return sum(c.hits for c in cells) / sum(c.trials for c in cells)


def plot(result: NeedleResult, path: str | Path) -> Path:
    """One heat map per row: accuracy by length (rows) and depth (columns), like RULER's needle plots."""
    lengths, depths = result.settings["lengths"], result.settings["depths"]
    columns = min(len(result.rows), PLOT_COLUMNS)
    lines = math.ceil(len(result.rows) / columns)
    fig, axes = report.subplots(
        lines, columns, figsize=(2.6 * columns + 1, (2.2 + 0.35 * len(lengths)) * lines), squeeze=False
    )
    for ax in axes.flat[len(result.rows) :]:
        ax.set_visible(False)
    for ax, row in zip(axes.flat, result.rows, strict=False):
        grid = [
            [next(c.hits / c.trials for c in row.cells if c.length == length and c.depth == depth) for depth in depths]
            for length in lengths
        ]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, values in enumerate(grid):
            for j, value in enumerate(values):
                ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [f"{length:,}" for length in lengths])
        ax.set_xlabel("depth")
        ax.set_title(f"{row.name}\n{row.compression_ratio:.2f}x · {row.accuracy:.0%}", fontsize=8)
    for line in axes:
        line[0].set_ylabel("prompt tokens")
    return report.save_figure(fig, path)
