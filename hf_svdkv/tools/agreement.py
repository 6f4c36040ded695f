"""Does a compressed cache change what the model says? Teacher-forced next-token agreement with `DynamicCache`.

For each prompt, the model with its full cache writes a greedy continuation of `new_tokens` tokens. That continuation
is then fed, teacher-forced, through a fresh compressed cache after the prompt was prefilled into it (what
`generate()` does, minus the feedback of the compressed model's own choices), and at every position the compressed
model's most likely next token is compared with the one the full cache chose. Agreement is the share of positions
where they match: 1.0 = the same greedy text, token for token. Unlike perplexity it asks the question a user has
("will the answer change?"); unlike free generation one early difference does not decide all later ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..architectures import cache_kwargs


@dataclass
class Agreement:
    per_prompt: list[float]
    references: list[torch.Tensor]  # the full cache's greedy continuation of each prompt

    @property
    def mean(self) -> float:
        return sum(self.per_prompt) / len(self.per_prompt)


def greedy_continuations(model: nn.Module, prompts: Sequence[torch.Tensor], new_tokens: int = 32) -> list[torch.Tensor]:
    """The full cache's greedy continuation [new_tokens] of every 1-D prompt (no early stop at end-of-sequence)."""
    from transformers import DynamicCache

    references = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = prompt[None].to(model.device)
            cache = DynamicCache(config=model.config)
            logits = model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
            tokens = []
            for _ in range(new_tokens):
                token = logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
                logits = model(token, **cache_kwargs(model, cache), use_cache=True).logits
            references.append(torch.cat(tokens, dim=1)[0].cpu())
    return references


def next_token_agreement(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    make_cache: Callable[[], Any],
    references: Sequence[torch.Tensor] | None = None,
    new_tokens: int = 32,
) -> Agreement:
    """Share of positions where the model over `make_cache()` (a fresh cache per prompt, for the model as it is now
    patched) predicts the next token of the full cache's greedy continuation (`references`, computed when not
    given; compute them on the unpatched model)."""
    if references is None:
        references = greedy_continuations(model, prompts, new_tokens)
    scores = []
    with torch.inference_mode():
        for prompt, reference in zip(prompts, references, strict=True):
            cache = make_cache()
            ids = prompt[None].to(model.device)
            first = model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1:]
            rest = model(reference[None, :-1].to(model.device), **cache_kwargs(model, cache), use_cache=True).logits
            predicted = torch.cat([first, rest], dim=1).argmax(-1)[0].cpu()
            scores.append((predicted == reference).float().mean().item())
    return Agreement(scores, list(references))


def spread_prompts(ids: torch.Tensor, count: int, length: int) -> list[torch.Tensor]:
    """`count` disjoint prompts of `length` tokens spread evenly over the 1-D `ids`."""
    if ids.numel() < count * length:
        raise ValueError(f"{ids.numel():,} tokens cannot hold {count} disjoint prompts of {length:,} tokens")
    step = (ids.numel() - length) // max(count - 1, 1)
    return [ids[i * step : i * step + length].clone() for i in range(count)]


_WORD = re.compile(r"[A-Za-z]{2,}")


def non_word_share(text: str, vocabulary: set[str]) -> float:
    """Share of the letter runs of `text` (two letters or more, lower-cased) that are not in `vocabulary` (e.g. every
    word of a corpus, `corpus_vocabulary`): near 0 for fluent text, large for text made of word fragments."""
    words = [w.lower() for w in _WORD.findall(text)]
    return sum(w not in vocabulary for w in words) / len(words) if words else 1.0


def corpus_vocabulary(*texts: str) -> set[str]:
    """Every letter run of two letters or more (lower-cased) of the texts."""
    return {w.lower() for text in texts for w in _WORD.findall(text)}
