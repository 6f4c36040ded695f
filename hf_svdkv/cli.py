"""`hf-svdkv` command line: one sub-command per task, each a parser-builder plus a function.

Bad input (unknown model, unreadable text, text too short, ranks the model cannot hold, bad syntax)
ends with one `hf-svdkv: error: ...` line on stderr and exit status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import NoReturn

PROG = "hf-svdkv"
USER_ERRORS = (ValueError, FileNotFoundError, OSError)


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are the same single line as every other user error."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see {self.prog} --help)")


def _fail(message: str) -> NoReturn:
    # Library messages can span lines (transformers' OSErrors do); the contract is one line.
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def _check_output(path: str | None, flag: str) -> None:
    """Fail before a long run rather than after it when an output cannot be written."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise ValueError(f"{flag} {path}: directory {Path(path).resolve().parent} does not exist")


# --- eval ---------------------------------------------------------------------------------------------------
def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    from .eval import PROTOCOLS

    p = subparsers.add_parser(
        "eval",
        help="perplexity with the dynamic cache vs compressed caches",
        description=(
            "Perplexity of the model with its full DynamicCache (the baseline) and with SVD-compressed caches "
            "(and, with --peers, transformers' int4/int2 QuantizedCache). Without --profiles, --ranks or "
            "--bases-dir the SVD rows are the profiles low,med,high; with --ranks or --bases-dir, profiles run "
            "only if --profiles is given too."
        ),
    )
    p.add_argument("--model", help="Hub id or local directory (default: $HF_SVDKV_MODEL or the embedded SmolLM2-135M)")
    p.add_argument("--dtype", help="torch dtype of the weights and the cache (default: bfloat16)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--dataset", default="wiki", choices=("wiki", "lee", "wikitext"), help="text to score (default: wiki)")
    p.add_argument("--text-file", help="score this UTF-8 text file instead of --dataset")
    p.add_argument("--protocol", default="continuation", choices=PROTOCOLS, help="see hf_svdkv.eval (default: continuation)")
    p.add_argument("--context", type=int, default=1536, help="continuation: tokens prefilled per window (default: 1536)")
    p.add_argument("--continuation", type=int, default=512, help="continuation: tokens scored per window (default: 512)")
    p.add_argument("--window-len", type=int, default=512, help="sliding: tokens per window (default: 512)")
    p.add_argument("--chunk", type=int, default=128, help="sliding: tokens per forward; the first chunk is not scored (default: 128)")
    p.add_argument("--windows", type=int, default=3, help="number of windows (default: 3)")
    p.add_argument("--profiles", help="comma-separated SVD profiles, 'none' for no profile rows (default: low,med,high)")
    p.add_argument("--ranks", help="comma-separated KEY:VALUE ranks per KV head, e.g. 32:32,16:48")
    p.add_argument("--group-size", type=int, default=1, help="KV heads sharing one basis (default: 1)")
    p.add_argument("--bases-dir", action="append", default=[], help="bases saved with SVDBases.save_pretrained (repeatable)")
    p.add_argument("--peers", action="store_true", help="also run transformers' QuantizedCache int4 and int2")
    p.add_argument("--peer-backend", choices=("quanto", "hqq"), help="quantization backend (default: quanto, else hqq)")
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--plot", help="write a ppl-increase vs compression plot here (PNG, PDF, SVG ...)")
    p.set_defaults(func=_cmd_eval)


def _profiles(args: argparse.Namespace) -> list[str]:
    if args.profiles is None:
        return [] if args.ranks or args.bases_dir else ["low", "med", "high"]
    names = [name.strip() for name in args.profiles.split(",") if name.strip()]
    return [] if names == ["none"] else names


def _cmd_eval(args: argparse.Namespace) -> int:
    from .assets import MODEL_NAME as DEFAULT_MODEL_NAME
    from .data import load_text, tokenize_text
    from .eval import build_rows, parse_ranks, plot, print_table, run_eval
    from .loading import ModelConfig, load_model

    # Everything that can be checked without the model is checked first: a typo should cost seconds.
    _check_output(args.json, "--json")
    _check_output(args.plot, "--plot")
    if args.plot and find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)")
    if args.windows <= 0:
        raise ValueError(f"--windows must be positive, got {args.windows}")
    rows = build_rows(
        profiles=_profiles(args),
        ranks=parse_ranks(args.ranks) if args.ranks else (),
        group_size=args.group_size,
        bases_dirs=args.bases_dir,
        peers=args.peers,
        backend=args.peer_backend,
    )
    text = load_text(args.dataset, args.text_file)

    # Flags override the HF_SVDKV_* environment; replace() re-runs ModelConfig's checks (dtype, device).
    overrides = {"model_path": args.model, "dtype": args.dtype, "device": args.device}
    config = dataclasses.replace(ModelConfig.from_env(), **{k: v for k, v in overrides.items() if v is not None})
    model, tokenizer = load_model(config)
    ids = tokenize_text(tokenizer, text, vocab_size=model.config.vocab_size)

    result = run_eval(
        model,
        ids,
        rows,
        protocol=args.protocol,
        context=args.context,
        continuation=args.continuation,
        window_len=args.window_len,
        chunk=args.chunk,
        n_windows=args.windows,
        model_name=config.model_path or DEFAULT_MODEL_NAME,
        dataset_name=Path(args.text_file).name if args.text_file else args.dataset,
        settings={"dtype": config.dtype, "device": config.device, "group_size": args.group_size},
    )
    print_table(result)
    if args.json:
        Path(args.json).write_text(result.to_json() + "\n", encoding="utf-8")
    if args.plot:
        plot(result, args.plot)
    return 0


# --- entry point ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Low-rank (SVD) KV-cache compression for Hugging Face transformers")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    _add_eval(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns 0, or exits with status 2 and a one-line message on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        _fail(str(error) or type(error).__name__)


if __name__ == "__main__":
    sys.exit(main())
