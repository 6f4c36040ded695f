"""How much calibration is enough: Δppl and seconds of calibrated bases fitted on fewer tokens, with cheaper rank
allocation, against today's full calibration, on the default model and corpus (docs/calibration_tradeoff.md).

    python scripts/calibration_tradeoff.py --json docs/calibration_tradeoff.json --markdown docs/calibration_tradeoff.md

Every variant calibrates on tokens of the last 65,536 of the wiki corpus (the text `hf-svdkv eval` reserves and never
scores; spread over it as `calibration.spread_tokens` takes them, or its last tokens in one run), or of the Lee news
corpus (another domain), then the eval's recommended rows are scored on the same windows (continuation protocol,
hf_svdkv.tools.eval). "seconds" is what `patch_model` spends on a cold cache for the first row: statistics, probes
when the allocation needs them, and the fit; the other rows reuse the statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_svdkv import CompressionConfig, SVDBases
from hf_svdkv.calibration import CALIBRATION_PRESETS, Calibrator, spread_tokens
from hf_svdkv.text import load_text, split_calibration, tokenize_text
from hf_svdkv.tools.eval import dynamic_row, run_eval, svd_row
from hf_svdkv.tools.loading import ModelConfig, load_model

# The recommended rows of a bare `hf-svdkv eval`.
ROWS = (
    ("2x", {"target_ratio": 2.0, "window": 128}),
    ("3x", {"target_ratio": 3.0, "window": 128}),
    ("6x-int4", {"target_ratio": 6.0, "window": 64, "latent_bits": 4}),
)


@dataclass(frozen=True)
class Variant:
    label: str
    tokens: int
    allocation: str
    probe_tokens: int = 2048
    corpus: str = "wiki"
    spread: bool = True


def variants() -> list[Variant]:
    full, fast = CALIBRATION_PRESETS["full"], CALIBRATION_PRESETS["fast"]
    return [
        Variant("full: 65,536 tokens, sensitivity probes", full.tokens, full.allocation, full.probe_tokens),
        Variant("65,536 tokens, spectrum", 65536, "spectrum"),
        Variant(f"fast: {fast.tokens:,} tokens spread, spectrum", fast.tokens, fast.allocation),
        Variant("8,192 tokens spread, spectrum", 8192, "spectrum"),
        Variant("4,096 tokens spread, spectrum", 4096, "spectrum"),
        Variant("2,048 tokens spread, spectrum", 2048, "spectrum"),
        Variant("16,384 tokens in one run (the last), spectrum", 16384, "spectrum", spread=False),
        Variant("8,192 tokens in one run (the last), spectrum", 8192, "spectrum", spread=False),
        Variant("16,384 tokens spread, probes on 512 tokens", 16384, "sensitivity", 512),
        Variant("16,384 tokens spread, uniform ranks", 16384, "uniform"),
        Variant("16,384 tokens of the Lee corpus spread, spectrum", 16384, "spectrum", corpus="lee"),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--context", type=int, default=1536)
    parser.add_argument("--continuation", type=int, default=512)
    parser.add_argument("--only", nargs="+", help="substrings selecting variants (default: all)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(ModelConfig(dtype="bfloat16"))
    vocab = model.config.vocab_size
    wiki_calib, eval_ids = split_calibration(tokenize_text(tokenizer, load_text("wiki"), vocab), 65536)
    corpora = {"wiki": wiki_calib, "lee": tokenize_text(tokenizer, load_text("lee"), vocab)}
    length = args.context + args.continuation
    chosen = [v for v in variants() if not args.only or any(s in v.label for s in args.only)]

    rows, seconds = [dynamic_row()], {}
    load_start = os.getloadavg()[0]
    for variant in chosen:
        source = corpora[variant.corpus]
        token_ids = spread_tokens(source, variant.tokens) if variant.spread else source[-variant.tokens :]
        start = time.perf_counter()
        calibrator = Calibrator(
            model, token_ids, allocation=variant.allocation, probe_tokens=variant.probe_tokens, progress=False
        )
        for index, (name, fields) in enumerate(ROWS):
            config = CompressionConfig(**fields, group_size=3)
            bases = SVDBases.from_calibrator(calibrator, config, length)
            if index == 0:
                seconds[variant.label] = time.perf_counter() - start
            rows.append(svd_row(f"{variant.label} | {name}", config=config, bases_factory=lambda m, c, b=bases: b))
        print(f"{variant.label}: {seconds[variant.label]:.1f} s", flush=True)

    result = run_eval(
        model,
        eval_ids,
        rows,
        context=args.context,
        continuation=args.continuation,
        n_windows=args.windows,
        model_name="smollm2-135m-instruct",
        dataset_name="wiki",
        settings={"dtype": "bfloat16"},
        progress=False,
    )
    report = result.to_dict()
    report["settings"].update(
        calibration_seconds=seconds,
        load_average=[load_start, os.getloadavg()[0]],
        command="python scripts/calibration_tradeoff.py "
        + " ".join(f"--{k} {v}" for k, v in (("json", args.json), ("markdown", args.markdown))),
    )
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    args.markdown.write_text(to_markdown(report, [v.label for v in chosen]), encoding="utf-8")
    print(args.markdown.read_text())


def to_markdown(report: dict, labels: list[str]) -> str:
    settings = report["settings"]
    cells = {row["name"]: row for row in report["rows"]}
    base = report["rows"][0]
    lines = [
        f"`{settings['command']}`",
        "",
        f"smollm2-135m-instruct · wiki · continuation {settings['context']} + {settings['continuation']} · "
        f"{settings['windows']} windows · bfloat16 · dynamic ppl {base['ppl']:.3f} · load average "
        f"{settings['load_average'][0]:.1f} → {settings['load_average'][1]:.1f} (2 cores)",
        "",
        "| calibration | seconds (cold, first row) | " + " | ".join(f"{name} Δ ppl" for name, _ in ROWS) + " |",
        "|---|---:|" + "---:|" * len(ROWS),
    ]
    for label in labels:
        deltas = []
        for name, _ in ROWS:
            row = cells[f"{label} | {name}"]
            deltas.append(f"{row['delta_pct']:+.2f}% ({row['compression_ratio']:.2f}x)")
        lines.append(f"| {label} | {settings['calibration_seconds'][label]:.1f} | " + " | ".join(deltas) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
