"""Δppl vs DynamicCache of every basis recipe at several compression ratios, on the default model and corpus.

    python scripts/quality_sweep.py results.json [--markdown results.md] [--ratios 1.5 2 3 4]

Protocol (hf_svdkv.tools.eval, "continuation"): prefill `context` tokens, feed `continuation` more through the cache in
one forward, ppl over those; `windows` windows cut from the corpus minus its last `calib-tokens` tokens, which
calibrate the bases (disjoint text). Ranks for every ratio respect the byte budget of hf_svdkv.allocation.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from hf_svdkv import CompressionConfig, SVDBases, SVDCompressedCache, patch_model, unpatch_model
from hf_svdkv.allocation import allocate_ranks, budget_bytes, uniform_ranks, weight_spectra, weight_spectrum_ranks
from hf_svdkv.calibration import PROBE_RATIO, CalibratedPCA, collect_statistics, plan_ranks, probe_weights
from hf_svdkv.text import load_text, split_calibration, tokenize_text
from hf_svdkv.tools.eval import RowSpec, dynamic_row, run_eval
from hf_svdkv.tools.loading import ModelConfig, load_model

# (label, method, group_size, value metric, allocation): the variants compared at every ratio.
VARIANTS = [
    ("weights, per-head, uniform", "weights", 1, None, "uniform"),
    ("weights, joint, uniform", "weights", 3, None, "uniform"),
    ("weights, joint, spectrum", "weights", 3, None, "spectrum"),
    ("calibrated, per-head, output, uniform", "calibrated", 1, "output", "uniform"),
    ("calibrated, joint, plain, uniform", "calibrated", 3, "plain", "uniform"),
    ("calibrated, joint, output, uniform", "calibrated", 3, "output", "uniform"),
    ("calibrated, joint, output, spectrum", "calibrated", 3, "output", "spectrum"),
    ("calibrated, joint, output, sensitivity", "calibrated", 3, "output", "sensitivity"),
    ("calibrated, joint, plain, sensitivity", "calibrated", 3, "plain", "sensitivity"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_path", type=Path, help="where to write the results as JSON")
    parser.add_argument("--markdown", type=Path, help="where to write the table (default: JSON path with .md)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--calib-tokens", type=int, default=65536)
    parser.add_argument("--probe-tokens", type=int, default=2048, help="tokens for the sensitivity probes")
    parser.add_argument("--context", type=int, default=1536)
    parser.add_argument("--continuation", type=int, default=512)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--variants", nargs="+", help="substrings selecting variants (default: all)")
    parser.add_argument("--stats", type=Path, help="calibration statistics file: loaded if present, else written")
    return parser.parse_args()


def bases_row(name: str, bases: SVDBases) -> RowSpec:
    def setup(model: torch.nn.Module):
        patch_model(model, bases=bases)
        return lambda: SVDCompressedCache(model)

    return RowSpec(name, setup=setup, teardown=unpatch_model)


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(ModelConfig(dtype="bfloat16"))
    ids = tokenize_text(tokenizer, load_text("wiki"), model.config.vocab_size)
    calib_ids, eval_ids = split_calibration(ids, args.calib_tokens)
    variants = [v for v in VARIANTS if not args.variants or any(s in v[0] for s in args.variants)]

    # The machine may be shared: the load average says how far the timings are from an idle one.
    timings: dict[str, float] = {"load_average_start": os.getloadavg()[0]}
    if args.stats is not None and args.stats.exists():
        statistics = torch.load(args.stats, weights_only=False)
    else:
        start = time.perf_counter()
        statistics = collect_statistics(model, calib_ids)
        timings["statistics_seconds"] = time.perf_counter() - start
        if args.stats is not None:
            torch.save(statistics, args.stats)
    algorithms = {metric: CalibratedPCA(statistics, metric) for metric in ("output", "plain")}

    rows, plans, weights = [dynamic_row()], {}, {}
    for ratio in args.ratios:
        for label, method, group, metric, allocation in variants:
            config = CompressionConfig(target_ratio=ratio, group_size=group, method=method)
            start = time.perf_counter()
            if method == "weights":
                spectra = weight_spectra(model, group)
                ranks = (
                    uniform_ranks(spectra, ratio) if allocation == "uniform" else weight_spectrum_ranks(model, config)
                )
                bases = SVDBases.from_model(model, config, layer_ranks=ranks)
            else:
                algorithm = algorithms[metric]
                spectra = algorithm.spectra(model, group)
                if allocation == "sensitivity":
                    # What plan_ranks does, with the probes shared by every ratio that uses the same probe point.
                    key = (metric, group, max(ratio, PROBE_RATIO))
                    if key not in weights:
                        probe_start = time.perf_counter()
                        weights[key] = probe_weights(
                            model, algorithm, calib_ids, group, key[2], probe_tokens=args.probe_tokens
                        )
                        timings[f"probe_seconds_{metric}_g{group}_{key[2]:g}x"] = time.perf_counter() - probe_start
                    ranks = allocate_ranks(spectra, ratio, weights[key])
                else:
                    ranks = plan_ranks(model, algorithm, calib_ids, group, ratio, allocation)
                bases = SVDBases.from_model(model, config, algorithm=algorithm, layer_ranks=ranks)
            name = f"{ratio:g}x | {label}"
            plans[name] = {
                "ratio": ratio,
                "variant": label,
                "ranks": ranks,
                "planned_bytes_per_token": budget_bytes(ranks, spectra),
                "plan_seconds": time.perf_counter() - start,
            }
            rows.append(bases_row(name, bases))

    result = run_eval(
        model,
        eval_ids,
        rows,
        protocol="continuation",
        context=args.context,
        continuation=args.continuation,
        n_windows=args.windows,
        model_name="SmolLM2-135M-Instruct bf16",
        dataset_name="wiki",
        settings={"calib_tokens": args.calib_tokens, **timings, "load_average_end": os.getloadavg()[0]},
    )
    report = result.to_dict()
    for row in report["rows"]:
        row.update(plans.get(row["name"], {}))
    args.json_path.write_text(json.dumps(report, indent=2))
    markdown = to_markdown(report, args.ratios, [v[0] for v in variants])
    (args.markdown or args.json_path.with_suffix(".md")).write_text(markdown)
    print(markdown)


def to_markdown(report: dict, ratios: list[float], labels: list[str]) -> str:
    """One line per variant, one column per target ratio: Δppl (measured compression)."""
    rows = {(r.get("variant"), r.get("ratio")): r for r in report["rows"]}
    base = report["rows"][0]
    settings = report["settings"]
    seconds = ", ".join(
        f"{k.removesuffix('_seconds').replace('_', ' ')} {v:.0f} s"
        for k, v in settings.items()
        if k.endswith("_seconds") and k != "total_seconds"
    )
    lines = [
        f"Baseline (DynamicCache) ppl {base['ppl']:.3f}; {settings['windows']} windows, "
        f"context {settings['context']} + {settings['continuation']} scored tokens; calibration on "
        f"{settings['calib_tokens']} disjoint tokens.",
        f"Calibration timings: {seconds or 'statistics loaded from file'} (load average "
        f"{settings['load_average_start']:.1f} at start, {settings['load_average_end']:.1f} at end).",
        "",
        "| variant | " + " | ".join(f"{r:g}x" for r in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for label in labels:
        cells = []
        for ratio in ratios:
            row = rows.get((label, ratio))
            delta = row["delta_pct"] if row else None
            cells.append("n/a" if delta is None else f"{delta:+.1f}% ({row['compression_ratio']:.2f}x)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
