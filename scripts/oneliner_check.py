"""The line a user tries first, measured: `patch_model(model, CompressionConfig(...), tokenizer=tokenizer)` on the
default model, cold and from the bases cache, and how often the patched model still says what the full cache says.

    python scripts/oneliner_check.py --json docs/oneliner.json --markdown docs/oneliner.md

Agreement (hf_svdkv.tools.agreement): the full cache's greedy continuation (32 tokens) of each held-out prompt is
teacher-forced through the compressed cache after the prompt was prefilled into it; the share of positions where the
compressed model predicts the same next token. Two sets of six 1,536-token prompts: the Lee news corpus (another
domain than the calibration text) and the scored part of the wiki corpus (never calibrated on). "non-words": share
of the words of each row's free greedy answer to the first Lee prompt (64 tokens) that appear nowhere in either corpus.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from hf_svdkv import CompressionConfig, SVDCompressedCache, patch_model, unpatch_model
from hf_svdkv.architectures import model_geometry
from hf_svdkv.text import load_text, split_calibration, tokenize_text
from hf_svdkv.tools.agreement import (
    corpus_vocabulary,
    greedy_continuations,
    next_token_agreement,
    non_word_share,
    spread_prompts,
)
from hf_svdkv.tools.generate import greedy
from hf_svdkv.tools.kivi import kivi_cache
from hf_svdkv.tools.loading import ModelConfig, load_model
from hf_svdkv.tools.memory import cache_nbytes

PROMPT_TOKENS = 1536
PROMPTS_PER_SET = 6
NEW_TOKENS = 32
ANSWER_TOKENS = 64
# (row, CompressionConfig fields) patched with one patch_model line each; the first is the README's quickstart line.
ONE_LINERS = [
    ("CompressionConfig()", {}),
    ("CompressionConfig(target_ratio=6.0)", {"target_ratio": 6.0}),
    ('CompressionConfig(calibration="full")', {"calibration": "full"}),
    (
        "CompressionConfig(target_ratio=2.0, latent_bits=None, window=128) (the default before mixed widths)",
        {"target_ratio": 2.0, "latent_bits": None, "window": 128},
    ),
    (
        'CompressionConfig(key_rank=32, value_rank=32, method="weights")',
        {"key_rank": 32, "value_rank": 32, "method": "weights"},
    ),
    (
        "weight-only k32/v32, no window (the old quickstart line)",
        {"key_rank": 32, "value_rank": 32, "method": "weights", "window": 0},
    ),
]
# transformers' QuantizedCache with KIVI's axes (keys per channel, values per token), the strongest peer setting.
PEERS = [("QuantizedCache quanto int4, KIVI axes", 4, 64), ("QuantizedCache quanto int2, KIVI axes, group 32", 2, 32)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, required=True)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(ModelConfig(dtype="bfloat16"))
    vocab = model.config.vocab_size
    lee_text, wiki_text = load_text("lee"), load_text("wiki")
    _, wiki_scored = split_calibration(tokenize_text(tokenizer, wiki_text, vocab), 65536)
    sets = {
        "lee": spread_prompts(tokenize_text(tokenizer, lee_text, vocab), PROMPTS_PER_SET, PROMPT_TOKENS),
        "wiki": spread_prompts(wiki_scored, PROMPTS_PER_SET, PROMPT_TOKENS),
    }
    vocabulary = corpus_vocabulary(lee_text, wiki_text)
    eos = {model.generation_config.eos_token_id}
    references = {name: greedy_continuations(model, prompts, NEW_TOKENS) for name, prompts in sets.items()}
    geometry = model_geometry(model)
    full_bytes = 2 * geometry.num_layers * geometry.num_kv_heads * geometry.head_dim * 2  # 16-bit keys and values
    rows = []

    def measure(label: str, make_cache, patch_seconds: float | None, cached_seconds: float | None = None) -> None:
        agreement = {
            name: next_token_agreement(model, prompts, make_cache, references[name]) for name, prompts in sets.items()
        }
        cache = make_cache()
        answer, _, _ = greedy(model, sets["lee"][0][None], cache, ANSWER_TOKENS, eos)
        text = tokenizer.decode(answer, skip_special_tokens=True)
        ratio = full_bytes / (cache_nbytes(cache) / (PROMPT_TOKENS + len(answer)))
        rows.append(
            {
                "row": label,
                "patch_seconds": patch_seconds,
                "cached_seconds": cached_seconds,
                **{f"agreement_{name}": a.mean for name, a in agreement.items()},
                **{f"agreement_{name}_per_prompt": a.per_prompt for name, a in agreement.items()},
                "kv_ratio": ratio,
                "non_words": non_word_share(text, vocabulary),
                "answer": text,
            }
        )
        print(f"{label}: {rows[-1]['agreement_lee']:.3f} / {rows[-1]['agreement_wiki']:.3f}, {ratio:.2f}x", flush=True)

    measure("DynamicCache", lambda: DynamicCache(config=model.config), None)
    with tempfile.TemporaryDirectory() as folder:
        for label, fields in ONE_LINERS:
            start = time.perf_counter()
            patch_model(model, CompressionConfig(**fields), tokenizer=tokenizer, bases_cache=folder)
            cold = time.perf_counter() - start
            unpatch_model(model)
            start = time.perf_counter()
            patch_model(model, CompressionConfig(**fields), tokenizer=tokenizer, bases_cache=folder)
            cached = time.perf_counter() - start
            try:
                measure(label, lambda: SVDCompressedCache(model), cold, cached)
            finally:
                unpatch_model(model)
    for label, bits, group in PEERS:
        measure(
            label,
            lambda bits=bits, group=group: kivi_cache(
                model.config, bits, axis_key=-1, axis_value=0, q_group_size=group, residual_length=128
            ),
            None,
        )

    command = f"python scripts/oneliner_check.py --json {args.json} --markdown {args.markdown}"
    args.json.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    args.markdown.write_text(to_markdown(rows, command), encoding="utf-8")
    print(args.markdown.read_text())


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def to_markdown(rows: list[dict], command: str) -> str:
    lines = [
        f"`{command}`",
        "",
        f"smollm2-135m-instruct · bfloat16 · {PROMPTS_PER_SET} + {PROMPTS_PER_SET} held-out prompts of "
        f"{PROMPT_TOKENS:,} tokens · {NEW_TOKENS} teacher-forced tokens each",
        "",
        "| cache | patch_model s (cold) | patch_model s (cached) | agreement, Lee | agreement, wiki | KV ratio "
        "| non-words |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['row']} | {_seconds(row['patch_seconds'])} | {_seconds(row['cached_seconds'])} | "
            f"{row['agreement_lee']:.2f} | {row['agreement_wiki']:.2f} | {row['kv_ratio']:.2f}x | "
            f"{row['non_words']:.0%} |"
        )
    lines += [
        "",
        "KV ratio: bytes of a 16-bit full cache over the bytes each cache held after a 1,536-token prompt and "
        f"its {ANSWER_TOKENS}-token answer (window and positions included). Answers to the first Lee prompt:",
        "",
    ]
    lines += [f"- {row['row']}: {json.dumps(row['answer'][:160])}" for row in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
