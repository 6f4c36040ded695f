"""Where the bytes of a mixed-precision cache go, per token, at each target ratio (docs/mixed_budget.md):

    python scripts/mixed_budget.py --markdown docs/mixed_budget.md

The default model's calibrated bases (`calibration="fast"`, a 32-token window and 4 sinks, ratios quoted at the
default eval's 2,048 tokens) are fitted as `hf-svdkv eval` fits them; for each ratio the table splits the bytes the
allocation spends into packed codes, scales, the full-precision window and sinks, and positions, and counts the latent
channels stored at each width. Nothing is evaluated: it shows what the budget buys, and what is left for codes when
the ratio grows.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from hf_svdkv import CompressionConfig, SVDBases
from hf_svdkv.allocation import FULL_BYTES, POSITION_BYTES
from hf_svdkv.bit_allocation import hull_steps, segment_parts
from hf_svdkv.calibration import CALIBRATION_PRESETS, Calibrator, spread_tokens
from hf_svdkv.text import load_text, split_calibration, tokenize_text
from hf_svdkv.tools.loading import ModelConfig, load_model

SEQUENCE_LENGTH = 2048  # the default eval's context + continuation


def budget_rows(ratios: list[float], window: int, sinks: int) -> tuple[list[str], list[list[str]]]:
    model, tokenizer = load_model(ModelConfig(dtype="bfloat16"))
    ids = tokenize_text(tokenizer, load_text("wiki"), vocab_size=model.config.vocab_size)
    preset = CALIBRATION_PRESETS["fast"]
    calibration, _ = split_calibration(ids, 65536)
    calibrator = Calibrator(
        model, spread_tokens(calibration, preset.tokens), allocation=preset.allocation, progress=False
    )
    layers = model.config.num_hidden_layers
    full = 2 * layers * model.config.num_key_value_heads * model.config.head_dim * FULL_BYTES
    held_in_full = (window + sinks) / SEQUENCE_LENGTH
    bought = sorted({bits for step in hull_steps() for bits in step} - {0}, reverse=True)  # the widths ever bought
    header = ["ratio", "bytes/token", "codes", "scales", "window + sinks", "positions"]
    header += [f"{w}-bit channels" for w in bought]
    rows = []
    for ratio in ratios:
        config = CompressionConfig(target_ratio=ratio, window=window, sinks=sinks, latent_bits="mixed")
        bases = SVDBases.from_calibrator(calibrator, config, SEQUENCE_LENGTH)
        codes = scales = 0.0
        channels: Counter[int] = Counter()
        for layer in bases.layers:
            for projection in (layer.key, layer.value):
                widths = projection.channel_bits.tolist()
                channels.update({bits: count * projection.num_groups for bits, count in Counter(widths).items()})
                code_bytes, scale_bytes = segment_parts(widths)
                codes += code_bytes * projection.num_groups
                scales += scale_bytes * projection.num_groups
        # The window's tokens are held in full instead of as latents; every token has a position.
        codes, scales = codes * (1 - held_in_full), scales * (1 - held_in_full)
        window_bytes = held_in_full * full
        positions = POSITION_BYTES * layers
        total = codes + scales + window_bytes + positions
        row = [f"{full / total:.2f}x", f"{total:,.0f}"]
        row += [f"{part:,.0f} ({part / total:.0%})" for part in (codes, scales, window_bytes, positions)]
        row += [f"{channels[w]:,}" for w in bought]
        rows.append(row)
    return header, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="2,4,6,8,12,16")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    header, rows = budget_rows([float(r) for r in args.ratios.split(",")], args.window, args.sinks)
    command = "python scripts/mixed_budget.py" + (f" --markdown {args.markdown}" if args.markdown else "")
    lines = [
        f"`{command}`",
        "",
        f"smollm2-135m-instruct · calibrated bases (fast) · window {args.window} + {args.sinks} sinks · "
        f"bytes per token at {SEQUENCE_LENGTH:,} tokens (a 16-bit cache: 23,040)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
