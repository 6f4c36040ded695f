"""Quantized latents on the default model: Δppl and real compression against DynamicCache and transformers'
QuantizedCache, continuation protocol (prefill `--context` tokens, then `--continuation` through the cache in one
forward, ppl over those). Writes quantized_sweep.md and quantized_sweep.json to `--out`.

    python scripts/quantized_sweep.py [--out out/quantized_sweep] [--windows 3] [--window 0] [--rows PATTERN ...]

Rows: full rank int8 / int4 (int4 with and without the Hadamard rotation), weight-only per-head ranks 48/48 and
32/32 in int8 and int4, quanto int4 / int2, and, when `hf_svdkv.bases.calibrate_bases` exists, calibrated
joint bases (all 3 KV heads of a layer share one basis) in int4 at ~4x, ~6x and ~8x of all bytes and in int8 at ~4x.
`--window W` keeps the last W tokens at full precision in every SVD row (their bytes counted); `--rows` keeps only
rows matching the given shell patterns (the dynamic baseline always runs).
"""

from __future__ import annotations

import argparse
import importlib
import math
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from hf_svdkv import CompressionConfig, SVDCompressedCache, patch_model, unpatch_model
from hf_svdkv.architectures import model_geometry
from hf_svdkv.text import load_text, split_calibration, tokenize_text
from hf_svdkv.tools.eval import EvalResult, RowSpec, dynamic_row, quantized_row, run_eval, svd_row
from hf_svdkv.tools.loading import load_model

GROUP = 32  # QuantizedLatentStore's default channels per scale / zero point
POSITION_BYTES = 4


class UnrotatedCache(SVDCompressedCache):
    """Quantized latents without the Hadamard rotation: the ablation that shows what it buys."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        for layer in self.layers:
            layer.store_options = {"rotate": False}


def unrotated_row(name: str, config: CompressionConfig) -> RowSpec:
    def setup(model: nn.Module):
        patch_model(model, config)
        return lambda: UnrotatedCache(model)

    return RowSpec(name, setup=setup, teardown=unpatch_model)


def latent_target_ratio(model: nn.Module, ratio: float, bits: int) -> float:
    """The `target_ratio` to give the rank allocator (which budgets 16-bit latents) for a cache `ratio` times smaller
    than 16-bit K/V once latents take bits / 8 bytes plus a float16 scale and zero per GROUP channels.

    Partial groups (a rank that is not a multiple of GROUP) add a little, so the measured ratio lands slightly below."""
    g = model_geometry(model)
    full = 2 * g.num_layers * g.num_kv_heads * g.head_dim * 2
    dims = (full / ratio - POSITION_BYTES * g.num_layers) / (bits / 8 + 4 / GROUP)
    return full / (2 * dims + POSITION_BYTES * g.num_layers)


def calibrated_row(
    name: str, calib_ids: torch.Tensor, ratio: float, bits: int, group_size: int, window: int
) -> RowSpec:
    from hf_svdkv.bases import calibrate_bases

    bases = {}

    # Fitting is part of the row's cost, and fails before any row runs. (run_eval also passes the update sizes.)
    def prepare(model: nn.Module, *_: object) -> None:
        target = latent_target_ratio(model, ratio, bits)
        config = CompressionConfig(target_ratio=target, group_size=group_size, method="calibrated", latent_bits=bits)
        bases["fitted"] = calibrate_bases(model, calib_ids, config, progress=False)

    def setup(model: nn.Module):
        patch_model(model, bases=bases["fitted"], latent_bits=bits, window=window)
        return lambda: SVDCompressedCache(model)

    return RowSpec(name, setup=setup, prepare=prepare, teardown=unpatch_model)


def build_rows(head_dim: int, calib_ids: torch.Tensor | None, window: int = 0) -> list[RowSpec]:
    suffix = f"-win{window}" if window else ""

    def config(rank: int, bits: int | None) -> CompressionConfig:
        return CompressionConfig(key_rank=rank, value_rank=rank, latent_bits=bits, window=window)

    rows = [
        dynamic_row(),
        quantized_row("quanto", 4),
        quantized_row("quanto", 2),
        svd_row(f"svd-full-bf16{suffix}", config=config(head_dim, None)),
        svd_row(f"svd-full-int8{suffix}", config=config(head_dim, 8)),
        svd_row(f"svd-full-int4{suffix}", config=config(head_dim, 4)),
        unrotated_row(f"svd-full-int4-no-hadamard{suffix}", config(head_dim, 4)),
    ]
    for rank in (48, 32):
        rows += [svd_row(f"svd-w{rank}-int{bits}{suffix}", config=config(rank, bits)) for bits in (8, 4)]
    if calib_ids is not None:
        for bits, ratio in ((4, 4), (4, 6), (4, 8), (8, 4)):
            rows.append(calibrated_row(f"calib-g3-int{bits}-{ratio}x{suffix}", calib_ids, ratio, bits, 3, window))
    return rows


def has_calibration() -> bool:
    try:
        return hasattr(importlib.import_module("hf_svdkv.bases"), "calibrate_bases")
    except ImportError:
        return False


def markdown(result: EvalResult) -> str:
    s = result.settings
    lines = [
        f"# Quantized latents · {result.model} · {result.dataset} · {result.protocol}",
        "",
        f"{s['windows']} windows: prefill {s['context']}, ppl over the next {s['continuation']} tokens fed in one "
        f"forward; {s['dtype']}; calibration: {s['calibration_tokens']} tokens disjoint from the windows. "
        "Compression = DynamicCache bytes / this cache's bytes for the same tokens (codes, scales, zero points, "
        "positions and any full-precision residual all counted). QuantizedCache returns the tokens of the current "
        "forward unquantized, so in this protocol the scored tokens see each other at full precision there, and "
        "as latents here unless a window is set. Seconds include fitting bases and are wall time on a shared CPU.",
        "",
        "| row | ppl | Δ ppl | KV bytes/token | compression | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result.rows:
        delta = f"{row.delta_pct:+.2f}%" if math.isfinite(row.delta_pct) else "diverged"
        lines.append(
            f"| {row.name} | {row.ppl:.3f} | {delta} | {row.kv_bytes_per_token:,.1f} | "
            f"{row.compression_ratio:.2f}x | {row.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/quantized_sweep"))
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--context", type=int, default=1536)
    parser.add_argument("--continuation", type=int, default=512)
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--no-calibrated", action="store_true", help="skip the calibrated rows even if available")
    parser.add_argument("--window", type=int, default=0, help="full-precision recent tokens in every SVD row")
    parser.add_argument("--rows", nargs="*", default=["*"], help="shell patterns of the rows to run")
    args = parser.parse_args()

    model, tokenizer = load_model()  # the embedded default, bfloat16
    ids = tokenize_text(tokenizer, load_text("wiki"), model.config.vocab_size)
    # Split even without calibrated rows, so every run scores the same windows; they never see calibration text.
    calib_ids, ids = split_calibration(ids, args.calibration_tokens)
    calibrated = has_calibration() and not args.no_calibrated
    rows = build_rows(model_geometry(model).head_dim, calib_ids if calibrated else None, args.window)
    rows = rows[:1] + [row for row in rows[1:] if any(fnmatch(row.name, pattern) for pattern in args.rows)]
    settings = {
        "dtype": str(model.dtype).removeprefix("torch."),
        "calibration_tokens": calib_ids.numel(),
        "window": args.window,
    }
    result = run_eval(
        model,
        ids,
        rows,
        context=args.context,
        continuation=args.continuation,
        n_windows=args.windows,
        model_name=model.config.name_or_path.rstrip("/").split("/")[-1],
        dataset_name="wiki",
        settings=settings,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantized_sweep.json").write_text(result.to_json())
    (args.out / "quantized_sweep.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
