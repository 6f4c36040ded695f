"""Should key bases minimise the error of the attention scores rather than of the keys? A quality probe on the default
eval (docs/key_metric.md):

    python scripts/key_metric_probe.py --markdown docs/key_metric.md

`plain` is hf_svdkv's key basis: PCA of the pre-RoPE keys. `query` PCA's them in the metric of the squared error they
make in the scores, E[(q_rot · R(n) e)²] for a key error e, with the queries' second moment from the same calibration
statistics and the rotary rotation averaged over query-key distances of 32-8,192 tokens (`calibration.query_metric`),
as the value basis is PCA'd in the metric of the output. Each variant runs `hf-svdkv eval --method calibrated
--target-ratio 2,4,8 --latent-bits none,mixed --window 32` with freshly fitted bases (the bases cache does not know
the metric), in one process with the same threads (the thread count alone moves Δ ppl by a few tenths of a point).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path

import torch

from hf_svdkv import calibration
from hf_svdkv.tools.cli import main as cli
from hf_svdkv.tools.report import markdown_table

EVAL = [
    "eval",
    "--method",
    "calibrated",
    "--target-ratio",
    "2,4,8",
    "--latent-bits",
    "none,mixed",
    "--window",
    "32",
    "--no-bases-cache",
]


def run(metric: str, json_path: Path) -> dict:
    original = calibration.Calibrator.__init__
    calibration.Calibrator.__init__ = functools.partialmethod(original, key_metric=metric)
    try:
        cli([*EVAL, "--json", str(json_path)])
    finally:
        calibration.Calibrator.__init__ = original
    return json.loads(json_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {metric: run(metric, Path(tmp) / f"{metric}.json") for metric in calibration.KEY_METRICS}
    names = [row["name"] for row in next(iter(results.values()))["rows"][1:]]
    cells = [[m, *(f"{row['delta_pct']:+.2f}%" for row in result["rows"][1:])] for m, result in results.items()]
    lines = [
        "`python scripts/key_metric_probe.py --markdown docs/key_metric.md` "
        f"(torch threads: {torch.get_num_threads()})",
        "",
        *markdown_table(["key metric", *(f"{name} Δ ppl" for name in names)], cells),
    ]
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
