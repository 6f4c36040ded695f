"""`hf-svdkv generate`: the same prompt answered with the full `DynamicCache` and with a compressed cache, side by side.

Greedy decoding token by token (the model's own forward, as `generate()` runs it), so each side's prefill and
decoding are timed apart: decode tokens/s is new tokens after the first over the seconds they took. KV bytes are what
each cache holds at the end (`memory.cache_nbytes`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..architectures import cache_kwargs
from .memory import cache_nbytes


@dataclass
class Generation:
    name: str
    text: str
    new_tokens: int
    prompt_tokens: int
    prefill_s: float
    decode_tokens_per_s: float
    kv_bytes: int

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes / max(self.prompt_tokens + self.new_tokens, 1)


def greedy(
    model: nn.Module, ids: torch.Tensor, cache: Any, max_new_tokens: int, eos_token_ids: set[int]
) -> tuple[list[int], float, float]:
    """(new token ids, prefill seconds, decode seconds) of greedy decoding from `ids` [1, n] into `cache`."""
    tokens: list[int] = []
    with torch.inference_mode():
        start = time.perf_counter()
        logits = model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            if token in eos_token_ids or step == max_new_tokens - 1:
                break
            logits = model(
                torch.tensor([[token]], device=ids.device), **cache_kwargs(model, cache), use_cache=True
            ).logits
        decode = time.perf_counter() - start
    return tokens, prefill, decode


def prompt_ids(tokenizer: Any, prompt: str, chat: bool | None = None) -> torch.Tensor:
    """Token ids [1, n] of `prompt`, wrapped in the tokenizer's chat template when it has one (or `chat`)."""
    chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise ValueError("the prompt is empty")
    return ids


def side_by_side(
    model: nn.Module, tokenizer: Any, ids: torch.Tensor, make_compressed: Any, max_new_tokens: int = 64
) -> list[Generation]:
    """[dynamic, compressed]: `make_compressed()` patches the model and returns a fresh compressed cache."""
    from transformers import DynamicCache

    from .. import unpatch_model

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    ids = ids.to(model.device)
    results = []
    for name in ("dynamic", "compressed"):
        cache = DynamicCache(config=model.config) if name == "dynamic" else make_compressed()
        try:
            tokens, prefill, decode = greedy(model, ids, cache, max_new_tokens, eos_ids)
        finally:
            if name == "compressed":
                unpatch_model(model)
        speed = (len(tokens) - 1) / decode if len(tokens) > 1 and decode > 0 else float("nan")
        results.append(
            Generation(
                name,
                tokenizer.decode(tokens, skip_special_tokens=True),
                len(tokens),
                ids.shape[1],
                prefill,
                speed,
                cache_nbytes(cache),
            )
        )
    return results


def print_side_by_side(results: list[Generation], compressed_label: str, console: Any = None) -> None:
    from rich.table import Table

    from .report import console as default_console

    console = console or default_console()
    base = results[0]
    table = Table(show_lines=True)
    table.add_column("")
    for result in results:
        table.add_column("DynamicCache" if result.name == "dynamic" else compressed_label, ratio=1, overflow="fold")
    table.add_row("text", *(r.text for r in results))
    table.add_row("KV bytes", *(f"{r.kv_bytes:,} ({r.kv_bytes_per_token:,.0f} per token)" for r in results))
    table.add_row("KV ratio", *(f"{base.kv_bytes / r.kv_bytes:.2f}x" if r.kv_bytes else "-" for r in results))
    table.add_row("prefill", *(f"{r.prefill_s:.2f} s ({r.prompt_tokens:,} tokens)" for r in results))
    table.add_row("decode", *(f"{r.decode_tokens_per_s:.1f} tokens/s ({r.new_tokens} tokens)" for r in results))
    console.print(table)
