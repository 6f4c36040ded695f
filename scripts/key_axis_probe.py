"""Should integer latents be quantized per channel over groups of tokens (KIVI's axis for raw keys) rather than per
token over groups of channels (hf_svdkv's format)? A quality probe on the default eval (docs/key_axis.md):

    python scripts/key_axis_probe.py --markdown docs/key_axis.md

Each variant runs `hf-svdkv eval --method calibrated --target-ratio 4,8 --latent-bits 4 --window 32` with the chosen
latents (keys, values or both) quantized per channel: 4-bit codes with a float16 scale and zero point per channel and
group of 32 tokens, with or without the Hadamard rotation. Such latents are fake-quantized (rounded to their codes,
then held in the model dtype), so only quality is measured: both formats cost one scale and zero point per 32 values,
and a per-channel store would also hold the last, incomplete group of tokens at full precision. Eval windows are
multiples of 32 tokens, so every group is whole. All variants run in one process with the same threads, since the
thread count alone moves Δ ppl by a few tenths of a point.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import torch

import hf_svdkv.svd_cache as svd_cache
from hf_svdkv.latents import LatentStore, QuantizedLatentStore
from hf_svdkv.quantization import quantize, rotate_projection
from hf_svdkv.tools.cli import main as cli

TOKENS_PER_GROUP = 32
EVAL = ["eval", "--method", "calibrated", "--target-ratio", "4,8", "--latent-bits", "4", "--window", "32"]
# (label, latents quantized per channel, Hadamard rotation)
VARIANTS = (
    ("per token (hf_svdkv)", (), True),
    ("keys per channel", ("keys",), False),
    ("keys per channel, rotated", ("keys",), True),
    ("keys and values per channel", ("keys", "values"), False),
)


def per_channel(latents: torch.Tensor, bits: int) -> torch.Tensor:
    """Latents [..., seq, rank] rounded to `bits`-bit codes per channel and group of TOKENS_PER_GROUP tokens."""
    seq = latents.shape[-2]
    if seq % TOKENS_PER_GROUP:
        raise ValueError(f"{seq} tokens are not whole groups of {TOKENS_PER_GROUP}")
    grouped = latents.float().unflatten(-2, (seq // TOKENS_PER_GROUP, TOKENS_PER_GROUP)).transpose(-1, -2)
    return quantize(grouped, bits, TOKENS_PER_GROUP).dequantize().transpose(-1, -2).flatten(-3, -2)


class PerChannelStore(LatentStore):
    def __init__(self, store: QuantizedLatentStore, rotate: bool):
        self.code_bits, self.rotate = store.bits, rotate
        super().__init__(*store.shape[:2], store.rank, store.dtype, store.device)

    def prepare(self, projection):
        return rotate_projection(projection) if self.rotate else projection

    def encode(self, latents: torch.Tensor) -> torch.Tensor:
        return per_channel(latents, self.code_bits).to(self.dtype)


def run(kinds: tuple[str, ...], rotate: bool, json_path: Path) -> dict:
    kind_of_store = itertools.cycle(("keys", "values"))  # an SVDCacheLayer makes its key store, then its value store

    def latent_store(*args, **kwargs):
        store, kind = original(*args, **kwargs), next(kind_of_store)
        return PerChannelStore(store, rotate) if kind in kinds and type(store) is QuantizedLatentStore else store

    original = svd_cache.latent_store
    svd_cache.latent_store = latent_store
    try:
        cli([*EVAL, "--json", str(json_path)])
    finally:
        svd_cache.latent_store = original
    return json.loads(json_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, kinds, rotate) in enumerate(VARIANTS):
            results[label] = run(kinds, rotate, Path(tmp) / f"{i}.json")
    names = [row["name"] for row in next(iter(results.values()))["rows"][1:]]
    header = ["latents", *(f"{name} Δ ppl" for name in names)]
    lines = [
        f"`python scripts/key_axis_probe.py --markdown docs/key_axis.md` (torch threads: {torch.get_num_threads()})",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for label, result in results.items():
        cells = [f"{row['delta_pct']:+.2f}%" for row in result["rows"][1:]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
