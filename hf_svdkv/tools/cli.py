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

from ..compression_config import DEFAULT_SINKS, MIXED, MIXED_WINDOW

PROG = "hf-svdkv"
CALIBRATIONS = ("fast", "full")
PEAK_MODES = ("isolated", "inline")  # bench --peak (`bench.default_peak_mode` picks one)
USER_ERRORS = (ValueError, FileNotFoundError, OSError)
DEFAULT_CALIB_TOKENS = 65536
# Measured on the default model, calibrated joint bases, 3 windows of 1536 + 512 tokens: window 0 / 32 / 64 / 128
# cost +16.0 / +2.0 / +2.3 / +2.2% ppl at 2x and +67.0 / +7.0 / +6.8 / +5.2% at 3x (every byte counted).
RECOMMENDED_WINDOW = 128
# The recommended rows of a bare `hf-svdkv eval`: calibrated joint bases with mixed-width latents and a 32-token window,
# at 4x (what `CompressionConfig()` gives) and 6x. Measured at 1,536 + 512 tokens they beat calibrated bases cut to
# a rank (+0.33% vs +1.74% at 2x) and 4-bit latents (+1.65% vs +3.64% at 6x); a 32-token window beat 128
# (docs/mixed.md).
DEFAULT_ROWS = (
    {"method": "calibrated", "target_ratio": 4.0, "latent_bits": MIXED, "window": MIXED_WINDOW},
    {"method": "calibrated", "target_ratio": 6.0, "latent_bits": MIXED, "window": MIXED_WINDOW},
)
DEFAULT_ROWS_HELP = "calibrated joint bases with mixed-width latents and a 32-token window at 4x and 6x"


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


# --- shared options ----------------------------------------------------------------------------------------------
def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hub id or local directory (default: $HF_SVDKV_MODEL or the embedded SmolLM2-135M)")
    p.add_argument("--dtype", help="torch dtype of the weights and the cache (default: bfloat16)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")


def _load(args: argparse.Namespace):
    from .loading import ModelConfig, load_model

    # Flags override the HF_SVDKV_* environment; replace() re-runs ModelConfig's checks (dtype, device).
    overrides = {"model_path": args.model, "dtype": args.dtype, "device": args.device}
    config = dataclasses.replace(ModelConfig.from_env(), **{k: v for k, v in overrides.items() if v is not None})
    model, tokenizer = load_model(config)
    return config, model, tokenizer


def _add_row_arguments(p: argparse.ArgumentParser, *, peers_help: str) -> None:
    """The rows of eval, bench and needle: SVD rows (shapes x compression flags, saved bases) and the peers."""
    p.add_argument("--profiles", help="comma-separated SVD profiles (low, med, high)")
    p.add_argument("--ranks", help="comma-separated KEY:VALUE ranks per KV head, e.g. 32:32,16:48")
    _add_compression_arguments(p, lists=True)
    p.add_argument("--bases-dir", action="append", default=[], help="bases saved by `hf-svdkv bases` (repeatable)")
    p.add_argument("--peers", action="store_true", help=peers_help)
    p.add_argument("--peer-backend", choices=("quanto", "hqq"), help="quantization backend (default: quanto, else hqq)")


def _add_compression_arguments(p: argparse.ArgumentParser, *, lists: bool) -> None:
    many = "comma-separated " if lists else ""
    p.add_argument("--method", help=f"{many}weights (SVD of W_k/W_v, no data) or calibrated (PCA on calibration text)")
    p.add_argument(
        "--target-ratio",
        action="append",
        default=[],
        help=f"{many}memory budgets: x times smaller than a 16-bit cache, every byte counted (repeatable)",
    )
    p.add_argument(
        "--group-size", help="KV heads sharing one basis, or 'all' (default: 1 for weights, all for calibrated)"
    )
    # Rows of a table say every setting (a table's command reproduces it); one config follows CompressionConfig.
    window_default = (
        f"{RECOMMENDED_WINDOW} for calibrated rows, 0 for weights rows"
        if lists
        else f"CompressionConfig's: {MIXED_WINDOW} with mixed latents, {RECOMMENDED_WINDOW} with others, 0 for weights"
    )
    bits_default = "none" if lists else "CompressionConfig's: mixed for calibrated bases under a ratio, else none"
    p.add_argument("--window", help=f"{many}recent tokens kept at full precision (default: {window_default})")
    p.add_argument(
        "--latent-bits",
        help=f"{many}8, 4, mixed (a width per channel, under the target ratio) or none: store latents as integer "
        f"codes (default: {bits_default})",
    )
    p.add_argument(
        "--sinks",
        help=f"{many}first tokens of each sequence kept at full precision, attention sinks (default: {DEFAULT_SINKS})",
    )
    p.add_argument(
        "--calib-text",
        help="calibration text file (default: the last --calib-tokens tokens of the corpus, never scored)",
    )
    p.add_argument(
        "--calib-tokens",
        type=int,
        default=DEFAULT_CALIB_TOKENS,
        help=f"tokens at the end of the corpus reserved for calibration, never scored (default: "
        f"{DEFAULT_CALIB_TOKENS}); --calibration decides how many of them are used",
    )
    p.add_argument(
        "--calibration",
        choices=CALIBRATIONS,
        default="fast",
        help="fast (16,384 tokens, ranks on the spectra: seconds) or full (65,536 tokens and sensitivity probes: "
        "minutes); see docs/calibration_tradeoff.md (default: fast)",
    )
    p.add_argument(
        "--no-bases-cache",
        action="store_true",
        help="fit calibrated bases afresh instead of loading them from the bases cache (nor storing them)",
    )


def _split(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def _floats(values: Sequence[str], flag: str) -> list[float]:
    try:
        return [float(item) for value in values for item in _split(value)]
    except ValueError:
        raise ValueError(f"{flag} takes numbers, e.g. 2 or 1.5,2,3; got {' '.join(values)!r}") from None


def _ints_or_none(text: str | None, flag: str, default: list) -> list:
    if text is None:
        return default
    words = {"none": None, "mixed": "mixed"} if flag == "--latent-bits" else {"none": None}
    try:
        return [words[item.lower()] if item.lower() in words else int(item) for item in _split(text)]
    except ValueError:
        raise ValueError(f"{flag} takes integers (or {' or '.join(words)}), got {text!r}") from None


def _ints(text: str | None, flag: str, default: list[int]) -> list[int]:
    if text is None:
        return default
    try:
        return [int(item) for item in _split(text)]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _methods(args: argparse.Namespace, default: str) -> list[str]:
    from ..compression_config import METHODS

    methods = _split(args.method) or [default]
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown --method {method!r}: choose from {', '.join(METHODS)}")
    return methods


def _group_size(text: str | None, method: str, num_kv_heads: int) -> int:
    # Joint bases over all KV heads of a layer are far better for calibrated bases (+16% vs +172% at 2x on the
    # default model); weight-only bases keep the per-head default of CompressionConfig.
    if text is None:
        return num_kv_heads if method == "calibrated" else 1
    if text == "all":
        return num_kv_heads
    if not text.isdigit():
        raise ValueError(f"--group-size takes a positive integer or 'all', got {text!r}")
    return int(text)


def _token_ids(args: argparse.Namespace, tokenizer, model, text: str | None = None):
    """(ids to score, calibration ids): calibration is --calib-text, or the corpus' end, cut off the scored ids."""
    from ..text import load_text, split_calibration, tokenize_text

    vocab = model.config.get_text_config().vocab_size
    ids = tokenize_text(tokenizer, text, vocab_size=vocab) if text is not None else None
    if args.calib_text:
        return ids, tokenize_text(tokenizer, load_text(text_file=args.calib_text), vocab_size=vocab)[
            : args.calib_tokens
        ]
    if ids is None:
        ids = tokenize_text(tokenizer, load_text(args.dataset), vocab_size=vocab)
    if args.calib_tokens >= ids.numel():
        raise ValueError(f"--calib-tokens {args.calib_tokens} leaves nothing to score in a {ids.numel()}-token text")
    calib_ids, ids = split_calibration(ids, args.calib_tokens)
    return ids, calib_ids


def _calibrated_bases(
    args: argparse.Namespace, model, calib_ids, configs: Sequence, sequence_length: int | None
) -> dict:
    """{id(config): bases} for every calibrated config, from the bases cache or fitted now (one Calibrator per
    `--calibration` preset, built on the first miss), timed apart from the rows. Calibration takes its tokens spread
    over --calib-text, else over the corpus' reserved end."""
    import time

    from ..bases import SVDBases
    from ..bases_cache import cache_folder, cached_bases
    from ..calibration import CALIBRATION_PRESETS, Calibrator, spread_tokens

    start = time.perf_counter()
    calibrators, bases, hits, used = {}, {}, 0, {}
    for config in configs:
        preset = CALIBRATION_PRESETS[config.calibration]
        token_ids = spread_tokens(calib_ids, preset.tokens)
        if token_ids.numel() < preset.min_tokens:
            raise ValueError(
                f"calibration text too short: {token_ids.numel():,} tokens, the {config.calibration!r} "
                f"calibration needs at least {preset.min_tokens:,}"
            )
        used[config.calibration] = int(token_ids.numel())

        def fit(config=config, preset=preset, token_ids=token_ids):
            if config.calibration not in calibrators:
                calibrators[config.calibration] = Calibrator(
                    model, token_ids, allocation=preset.allocation, probe_tokens=preset.probe_tokens
                )
            return SVDBases.from_calibrator(calibrators[config.calibration], config, sequence_length)

        bases[id(config)], _, hit = cached_bases(
            model,
            config,
            fit,
            token_ids=token_ids,
            sequence_length=sequence_length,
            bases_cache=not args.no_bases_cache,
        )
        hits += hit
    seconds = time.perf_counter() - start
    folder = cache_folder(not args.no_bases_cache)
    summary = ", ".join(f"{name} on {tokens:,} tokens" for name, tokens in used.items())
    print(
        f"calibration: {summary}, {seconds:.1f} s; {hits} of {len(configs)} rows' bases from the cache "
        f"({folder if folder is not None else 'cache off'})",
        file=sys.stderr,
    )
    args.calibration_record = {
        "calibration": ", ".join(used),
        "calibration_tokens": max(used.values()),
        "calibration_seconds": round(seconds, 1),
        "bases_from_cache": hits,
    }
    return bases


# --- eval ---------------------------------------------------------------------------------------------------
def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    from .eval import PROTOCOLS

    p = subparsers.add_parser(
        "eval",
        help="perplexity with the dynamic cache vs compressed caches",
        description=(
            "Perplexity of the model with its full DynamicCache (the baseline) and with SVD-compressed caches "
            "(and, with --peers, transformers' int4/int2 QuantizedCache). SVD rows are every combination of "
            "(--profiles, --ranks, --target-ratio) x --method x --window x --latent-bits, plus --bases-dir. "
            "Without --profiles, --ranks, --target-ratio or --bases-dir the rows are the recommended ones: "
            f"{DEFAULT_ROWS_HELP}."
        ),
    )
    _add_model_arguments(p)
    p.add_argument(
        "--dataset", default="wiki", choices=("wiki", "lee", "wikitext"), help="text to score (default: wiki)"
    )
    p.add_argument("--text-file", help="score this UTF-8 text file instead of --dataset")
    p.add_argument(
        "--protocol", default="continuation", choices=PROTOCOLS, help="see hf_svdkv.eval (default: continuation)"
    )
    p.add_argument(
        "--context", type=int, default=1536, help="continuation: tokens prefilled per window (default: 1536)"
    )
    p.add_argument(
        "--continuation", type=int, default=512, help="continuation: tokens scored per window (default: 512)"
    )
    p.add_argument("--window-len", type=int, default=512, help="sliding: tokens per window (default: 512)")
    p.add_argument(
        "--chunk",
        type=int,
        default=128,
        help="sliding: tokens per forward; the first chunk is not scored (default: 128)",
    )
    p.add_argument("--windows", type=int, default=3, help="number of windows (default: 3)")
    _add_row_arguments(p, peers_help="also run transformers' QuantizedCache int4 and int2")
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--plot", help="write a ppl-increase vs compression plot here (PNG, PDF, SVG ...)")
    p.add_argument("--markdown", help="write the table as Markdown here")
    p.set_defaults(func=_cmd_eval)


def _eval_configs(args: argparse.Namespace, num_kv_heads: int | None) -> list:
    from ..compression_config import CompressionConfig
    from .eval import parse_ranks

    ratios = _floats(args.target_ratio, "--target-ratio")
    shapes = [{"profile": p} for p in _split(args.profiles)]
    shapes += [{"key_rank": k, "value_rank": v} for k, v in (parse_ranks(args.ranks) if args.ranks else [])]
    shapes += [{"target_ratio": r} for r in ratios]
    sinks = _ints(args.sinks, "--sinks", [DEFAULT_SINKS])
    if not shapes and not args.bases_dir:
        if args.method or args.window or args.latent_bits:
            raise ValueError(
                "--method, --window and --latent-bits need rows to apply to: --profiles, --ranks or --target-ratio"
            )
        return [
            CompressionConfig(**row, group_size=num_kv_heads, calibration=args.calibration, sinks=sink)
            for row in DEFAULT_ROWS
            for sink in sinks
        ]
    bits = _ints_or_none(args.latent_bits, "--latent-bits", [None])
    return [
        CompressionConfig(
            **shape,
            method=method,
            group_size=_group_size(args.group_size, method, num_kv_heads),
            window=window,
            latent_bits=bit,
            calibration=args.calibration,
            sinks=sink,
        )
        for shape in shapes
        for method in _methods(args, "calibrated")
        for window in _windows(args.window, method)
        for bit in bits
        for sink in sinks
    ]


def _rows(args: argparse.Namespace, model, configs: Sequence, calib_ids, sequence_length: int | None) -> list:
    """dynamic, a row per config (calibrated bases fitted or loaded from the bases cache first, timed apart;
    weight-only ones fitted in their row), the --bases-dir rows, then the peers. A target ratio is quoted at
    `sequence_length` tokens (None: long contexts), so a window's bytes come out of the latents' budget."""
    from ..bases import SVDBases
    from .eval import build_rows

    calibrated = [c for c in configs if c.method == "calibrated"]
    args.calibration_record = {"calibration_tokens": 0, "calibration_seconds": None}
    fitted = _calibrated_bases(args, model, calib_ids, calibrated, sequence_length) if calibrated else {}

    def weight_bases(model, row_config):
        return SVDBases.from_model(model, row_config, sequence_length=sequence_length)

    return build_rows(
        configs=configs,
        weight_bases=weight_bases,
        calibrated_bases=lambda model, row_config: fitted[id(row_config)],
        bases_dirs=args.bases_dir,
        windows=_ints_or_none(args.window, "--window", [0]),
        latent_bits=_ints_or_none(args.latent_bits, "--latent-bits", [None]),
        peers=args.peers,
        backend=args.peer_backend,
    )


def _check_positions(model, tokens: int, what: str, allowed: bool = False) -> None:
    """A length past the model's positions is refused (unless `allowed`): its quality is not the model's."""
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit and tokens > limit and not allowed:
        raise ValueError(f"{what} = {tokens:,} tokens is beyond the model's {limit:,} positions")


def _windows(text: str | None, method: str) -> list[int]:
    return _ints_or_none(text, "--window", [RECOMMENDED_WINDOW if method == "calibrated" else 0])


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..architectures import model_geometry
    from ..assets import MODEL_NAME as DEFAULT_MODEL_NAME
    from ..text import load_text
    from .eval import peer_backend, plot, print_table, run_eval, to_markdown

    # Everything that can be checked without the model is checked first: a typo should cost seconds.
    for flag in ("json", "plot", "markdown"):
        _check_output(getattr(args, flag), f"--{flag}")
    if args.plot and find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)")
    if args.windows <= 0:
        raise ValueError(f"--windows must be positive, got {args.windows}")
    _eval_configs(args, None)  # bad row flags fail before the model loads
    if args.peers:
        peer_backend(args.peer_backend)
    text = load_text(args.dataset, args.text_file) if args.text_file else None

    config, model, tokenizer = _load(args)
    configs = _eval_configs(args, model_geometry(model).num_kv_heads)
    calibrated = any(c.method == "calibrated" for c in configs)
    if calibrated or args.calib_text:
        ids, calib_ids = _token_ids(args, tokenizer, model, text)
    else:
        from ..text import tokenize_text

        ids = tokenize_text(
            tokenizer,
            text if text is not None else load_text(args.dataset),
            vocab_size=model.config.get_text_config().vocab_size,
        )
        calib_ids = None
    length = args.context + args.continuation if args.protocol == "continuation" else args.window_len
    _check_positions(model, length, "--context + --continuation" if args.protocol == "continuation" else "--window-len")
    rows = _rows(args, model, configs, calib_ids, length)
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
        settings={
            "dtype": config.dtype,
            "device": config.device,
            **args.calibration_record,
            "calibration_text": args.calib_text or ("end of the corpus" if calib_ids is not None else None),
        },
    )
    print_table(result)
    if args.json:
        Path(args.json).write_text(result.to_json() + "\n", encoding="utf-8")
    if args.plot:
        plot(result, args.plot)
    if args.markdown:
        Path(args.markdown).write_text(
            to_markdown(result, command="hf-svdkv " + " ".join(sys.argv[1:])), encoding="utf-8"
        )
    return 0


# --- bases --------------------------------------------------------------------------------------------------
def _add_bases(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bases",
        help="compute bases (weight-only or calibrated) and save them to a directory",
        description="Compute SVD bases for a model and save them with SVDBases.save_pretrained; "
        "use them with `hf-svdkv eval --bases-dir DIR` or SVDBases.from_pretrained(DIR).",
    )
    p.add_argument("output", help="directory to write bases.safetensors into")
    _add_model_arguments(p)
    p.add_argument(
        "--dataset", default="wiki", choices=("wiki", "lee", "wikitext"), help="calibration corpus (default: wiki)"
    )
    p.add_argument("--profile", choices=("low", "med", "high"), help="ranks from a profile")
    p.add_argument("--ranks", help="KEY:VALUE ranks per KV head, e.g. 32:32")
    _add_compression_arguments(p, lists=False)
    p.add_argument(
        "--context-length",
        type=int,
        default=2048,
        help="tokens a --target-ratio is quoted at, so a --window is counted (default: 2048)",
    )
    p.set_defaults(func=_cmd_bases)


def _single_config(args: argparse.Namespace, num_kv_heads: int | None = None):
    """The one CompressionConfig of single-valued flags (bases, generate): at most one of --profile, --ranks,
    --target-ratio (none: the default 4x). --window and --latent-bits default to the config's (mixed widths and a
    32-token window under a ratio). Without the model's `num_kv_heads` (a check before loading it) the group size is
    left to the config unless --group-size is a number."""
    from ..compression_config import AUTO, CompressionConfig
    from .eval import parse_ranks

    ratios = _floats(args.target_ratio, "--target-ratio")
    ranks = parse_ranks(args.ranks) if args.ranks else []
    if len(ratios) + len(ranks) + bool(args.profile) > 1:
        raise ValueError("give at most one of --profile, --ranks KEY:VALUE or --target-ratio R (none: 4x)")
    [method] = _methods(args, "calibrated")[:1]
    # Weight-only bases keep their window of 0 (as `eval` rows do); calibrated ones take the config's for their bits.
    window = _windows(args.window, method)[0] if args.window or method != "calibrated" else None
    bits = _ints_or_none(args.latent_bits, "--latent-bits", [None])[0] if args.latent_bits else AUTO
    shape = (
        {"target_ratio": ratios[0]}
        if ratios
        else {"key_rank": ranks[0][0], "value_rank": ranks[0][1]}
        if ranks
        else {"profile": args.profile}
        if args.profile
        else {}
    )
    group = None
    if args.group_size is not None and (num_kv_heads is not None or args.group_size != "all"):
        group = _group_size(args.group_size, method, num_kv_heads or 1)
    [sinks] = _ints(args.sinks, "--sinks", [DEFAULT_SINKS])[:1]
    return CompressionConfig(
        **shape,
        method=method,
        window=window,
        latent_bits=bits,
        calibration=args.calibration,
        group_size=group,
        sinks=sinks,
    )


def _cmd_bases(args: argparse.Namespace) -> int:
    from ..architectures import model_geometry
    from ..fit import fit_bases

    _single_config(args)  # bad flags fail before the model loads
    _, model, tokenizer = _load(args)
    config = _single_config(args, model_geometry(model).num_kv_heads)
    calibration_text = None
    if config.method == "calibrated" and (args.calib_text or args.dataset != "wiki"):
        calibration_text = _token_ids(args, tokenizer, model)[1]
    bases = fit_bases(
        model,
        config,
        tokenizer=tokenizer,
        calibration_text=calibration_text,
        bases_cache=not args.no_bases_cache,
        sequence_length=args.context_length,
    )
    path = bases.save_pretrained(args.output)
    print(f"{bases}\nsaved to {path}")
    return 0


# --- generate -----------------------------------------------------------------------------------------------
def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="the same prompt answered with the full cache and with a compressed one, side by side",
        description="Greedy answers to a prompt from the DynamicCache and from the compressed cache patch_model builds "
        "for the config the flags give (default: CompressionConfig(), calibrated bases at 4x), with the KV "
        "bytes, prefill time and decode speed of each.",
    )
    p.add_argument("prompt", nargs="?", help="the prompt (or --prompt-file)")
    p.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    p.add_argument(
        "--chat",
        choices=("auto", "yes", "no"),
        default="auto",
        help="wrap the prompt in the tokenizer's chat template (default: auto, when it has one)",
    )
    _add_model_arguments(p)
    p.add_argument("--profile", choices=("low", "med", "high"), help="ranks from a profile")
    p.add_argument("--ranks", help="KEY:VALUE ranks per KV head, e.g. 32:32")
    p.add_argument("--bases-dir", help="use bases saved by `hf-svdkv bases` instead of fitting them")
    _add_compression_arguments(p, lists=False)
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from .. import SVDBases, SVDCompressedCache, patch_model
    from ..architectures import model_geometry
    from ..text import load_text
    from .eval import row_name
    from .generate import print_side_by_side, prompt_ids, side_by_side

    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give a prompt or --prompt-file (one of them)")
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    prompt = args.prompt if args.prompt is not None else load_text(text_file=args.prompt_file)
    config = None if args.bases_dir else _single_config(args)
    bases = SVDBases.from_pretrained(args.bases_dir) if args.bases_dir else None
    model_config, model, tokenizer = _load(args)
    if config is not None:
        config = _single_config(args, model_geometry(model).num_kv_heads)
    calibration_text = (
        _token_ids(args, tokenizer, model)[1] if config and config.method == "calibrated" and args.calib_text else None
    )
    chat = {"auto": None, "yes": True, "no": False}[args.chat]
    ids = prompt_ids(tokenizer, prompt, chat)
    if model_config.device == "cpu":
        from ..decode.cpu import available

        available()  # builds the CPU decode kernel now (once per machine), not inside the timed decoding

    def make_compressed():
        if bases is not None:
            patch_model(
                model,
                bases=bases,
                window=int(args.window or 0),
                latent_bits=_ints_or_none(args.latent_bits, "--latent-bits", [None])[0],
                sinks=_ints(args.sinks, "--sinks", [DEFAULT_SINKS])[0],
            )
        else:
            patch_model(
                model,
                config,
                tokenizer=tokenizer,
                calibration_text=calibration_text,
                bases_cache=not args.no_bases_cache,
            )
        return SVDCompressedCache(model)

    results = side_by_side(model, tokenizer, ids, make_compressed, args.max_new_tokens)
    label = f"hf_svdkv {Path(args.bases_dir).name if bases is not None else row_name(config)}"
    print_side_by_side(results, label)
    return 0


# --- bench --------------------------------------------------------------------------------------------------
def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="prefill time, decode speed, peak memory and KV bytes vs the dynamic cache",
        description="Speed and memory of the dynamic cache, compressed caches (rows as in `eval`: without --profiles, "
        f"--ranks, --target-ratio or --bases-dir the recommended ones, {DEFAULT_ROWS_HELP}) and, with "
        "--peers, transformers' QuantizedCache, on random prompts of each --contexts length and --batch "
        "size. Ratios are to the dynamic cache.",
    )
    _add_model_arguments(p)
    p.add_argument(
        "--contexts", default="1024,4096,8192", help="comma-separated prompt lengths (default: 1024,4096,8192)"
    )
    p.add_argument("--batch", default="1,4", help="comma-separated batch sizes (default: 1,4)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per run (default: 16)")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps first (default: 2)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every row this many rounds and keep its best figures (default: 1; more on a busy machine)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=0,
        help="prefill this many tokens per forward (default: 0 = the whole prompt at once)",
    )
    p.add_argument(
        "--beyond-positions",
        action="store_true",
        help="allow contexts past the model's positions (speed and memory only: its output there is not the model's)",
    )
    p.add_argument(
        "--dataset",
        default="wiki",
        choices=("wiki", "lee", "wikitext"),
        help="calibration corpus of calibrated rows (default: wiki)",
    )
    _add_row_arguments(p, peers_help="also run transformers' QuantizedCache (see `eval --peers`)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--peak",
        choices=PEAK_MODES,
        help="isolated: each row's peak memory measured again in a fresh process, the resident set growth with "
        "glibc's mmap threshold fixed at 1 MiB; inline: in the timing run (default: isolated on CPU, inline on "
        "CUDA, whose allocator counts it exactly)",
    )
    p.add_argument("--peak-of", help=argparse.SUPPRESS)  # NAME@CONTEXTxBATCH: the fresh process of --peak isolated
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--plot", help="write decode speed and KV size vs context here (PNG, PDF, SVG ...)")
    p.add_argument("--markdown", help="write the printed table as markdown here")
    p.set_defaults(func=_cmd_bench)


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(item) for item in _split(text)]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{flag} takes positive integers, got {text!r}")
    return values


def _check_memory(model, contexts: Sequence[int], batches: Sequence[int], rows: int) -> None:
    """Refuse, before allocating, a run that would not fit: every row keeps its cache until the steps taken in turn
    are done, and a prefill adds its activations. Counted as if every cache were full size (an upper bound)."""
    from ..architectures import model_geometry
    from .bench import available_memory

    available = available_memory(model.device)
    if available is None:
        return
    geometry = model_geometry(model)
    config = model.config.get_text_config(decoder=True)
    element = next(model.parameters()).element_size()
    for context in contexts:
        for batch in batches:
            tokens = context * batch
            caches = rows * tokens * 2 * geometry.num_layers * geometry.num_kv_heads * geometry.head_dim * element
            activations = tokens * (4 * config.hidden_size + 2 * getattr(config, "intermediate_size", 0)) * 4
            if caches + activations > 0.9 * available:
                raise ValueError(
                    f"context {context:,} x batch {batch} needs about {(caches + activations) / 2**30:,.1f} GiB "
                    f"({rows} caches and a prefill), this machine has {available / 2**30:,.1f} GiB available: "
                    "use shorter --contexts, smaller --batch or fewer rows"
                )


def _cmd_bench(args: argparse.Namespace) -> int:
    """`hf-svdkv bench`: checks the flags, loads the model, runs every row, prints, writes --json / --plot / --markdown
    (the command line is recorded in the markdown and the JSON settings)."""
    import json

    import torch

    from ..architectures import model_geometry
    from ..assets import MODEL_NAME as DEFAULT_MODEL_NAME
    from .bench import (
        BenchResult,
        default_peak_mode,
        isolated_peak,
        markdown_table,
        plot,
        print_table,
        run_rows,
    )
    from .eval import peer_backend

    # Everything that can be checked without the model is checked first: a typo should cost seconds.
    contexts, batches = _positive_ints(args.contexts, "--contexts"), _positive_ints(args.batch, "--batch")
    if args.steps <= 0 or args.repeat <= 0 or args.warmup < 0 or args.prefill_chunk < 0:
        raise ValueError("--steps and --repeat must be positive, --warmup and --prefill-chunk not negative")
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    for flag in ("json", "plot", "markdown"):
        _check_output(getattr(args, flag), f"--{flag}")
    if args.plot and find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)")
    _floats(args.target_ratio, "--target-ratio")
    _eval_configs(args, None)  # bad row flags fail before the model loads
    if args.peers:
        peer_backend(args.peer_backend)
    if args.threads:
        torch.set_num_threads(args.threads)
    config, model, tokenizer = _load(args)
    for context in contexts:
        _check_positions(model, context, "a --contexts prompt", allowed=args.beyond_positions)
    configs = _eval_configs(args, model_geometry(model).num_kv_heads)
    calib_ids = _token_ids(args, tokenizer, model)[1] if any(c.method == "calibrated" for c in configs) else None
    # A target ratio is quoted at the longest context: the window's bytes are spread over it.
    rows = _rows(args, model, configs, calib_ids, max(contexts))
    if args.peak_of:
        return _peak_of(args, model, rows, contexts, batches)
    _check_memory(model, contexts, batches, len(rows))

    def report_row(row, round_: int) -> None:
        label = f" (round {round_ + 1}/{args.repeat})" if args.repeat > 1 else ""
        print(
            f"  {row.name:24s} context {row.context:6d} batch {row.batch:3d}: prefill {row.prefill_s:7.2f} s, "
            f"decode {row.decode_tokens_per_s:8.2f} tok/s{label}",
            flush=True,
        )

    measured = run_rows(
        model,
        rows,
        contexts,
        batches,
        steps=args.steps,
        warmup=args.warmup,
        prefill_chunk=args.prefill_chunk,
        repeat=args.repeat,
        on_row=report_row,
    )
    peak = args.peak or default_peak_mode(model.device)
    if peak == "isolated":
        for row in measured:
            print(f"  {row.name:24s} context {row.context:6d} batch {row.batch:3d}: peak (fresh process)", flush=True)
            row.peak_mem_bytes = isolated_peak(args.argv, row.name, row.context, row.batch)
    command = "hf-svdkv " + " ".join(sys.argv[1:])
    settings = {
        "dtype": config.dtype,
        "peak": peak,
        "steps": args.steps,
        "warmup": args.warmup,
        "prefill_chunk": args.prefill_chunk,
        "threads": torch.get_num_threads(),
        "repeat": args.repeat,
        "command": command,
        **args.calibration_record,
    }
    result = BenchResult(config.model_path or DEFAULT_MODEL_NAME, str(model.device), measured, settings)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(result, args.plot)
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(result, command), encoding="utf-8")
    return 0


def _peak_of(args: argparse.Namespace, model, rows: Sequence, contexts: Sequence[int], batches: Sequence[int]) -> int:
    """The fresh process of `bench --peak isolated`: one row's peak memory growth, printed as JSON."""
    import json

    from .bench import bench_prompts, measure_peak

    name, _, size = args.peak_of.rpartition("@")
    context, _, batch = size.partition("x")
    spec = next((row for row in rows if row.name == name), None)
    ids = bench_prompts(model, contexts, batches).get((int(context), int(batch))) if context and batch else None
    if spec is None or ids is None:
        raise ValueError(f"--peak-of {args.peak_of}: no such row, context and batch in this run")
    spec.prepare(model, [args.prefill_chunk or int(context), 1])
    peak = measure_peak(model, spec, ids, warmup=args.warmup, prefill_chunk=args.prefill_chunk)
    print(json.dumps({"peak_mem_bytes": peak}))
    return 0


# --- needle -----------------------------------------------------------------------------------------------------
def _add_needle(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "needle",
        help="passkey retrieval: a key hidden deep in a long prompt, asked for at the end",
        description="Passkey retrieval (see hf_svdkv.tools.needle) with the dynamic cache and compressed caches, rows "
        "as in `eval` (without row flags, the recommended ones): accuracy, the key's teacher-forced NLL and the KV "
        "bytes per row, per prompt length and depth. Filler is the corpus' scored part (never calibrated on) or "
        "--text-file.",
    )
    _add_model_arguments(p)
    p.add_argument(
        "--lengths", default="1024,2048,3072", help="comma-separated prompt lengths (default: 1024,2048,3072)"
    )
    p.add_argument(
        "--depths",
        default="0.1,0.5,0.9",
        help="comma-separated depths of the key in the document, 0 to 1 (default: 0.1,0.5,0.9)",
    )
    p.add_argument(
        "--trials",
        type=int,
        help="trials per (length, depth) cell (default: enough that a row's accuracy has a standard error "
        "under 5 points)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the keys, their depths and the filler (default: 0)")
    p.add_argument(
        "--dataset", default="wiki", choices=("wiki", "lee", "wikitext"), help="filler corpus (default: wiki)"
    )
    p.add_argument("--text-file", help="filler text file instead of --dataset")
    _add_row_arguments(p, peers_help="also run transformers' QuantizedCache (see `eval --peers`)")
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--plot", help="write one heat map per row here (PNG, PDF, SVG ...)")
    p.add_argument("--markdown", help="write the tables as Markdown here")
    p.set_defaults(func=_cmd_needle)


def _cmd_needle(args: argparse.Namespace) -> int:
    import json

    from ..architectures import model_geometry
    from ..assets import MODEL_NAME as DEFAULT_MODEL_NAME
    from ..text import load_text
    from .eval import peer_backend
    from .needle import default_trials, plot, print_table, run_needle, to_markdown

    for flag in ("json", "plot", "markdown"):
        _check_output(getattr(args, flag), f"--{flag}")
    if args.plot and find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)")
    lengths = _positive_ints(args.lengths, "--lengths")
    depths = _floats([args.depths], "--depths")
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(
            f"--depths must lie in [0, 1] (0 = the start of the document, 1 = its end), got {args.depths!r}"
        )
    if args.trials is not None and args.trials <= 0:
        raise ValueError(f"--trials must be positive, got {args.trials}")
    _floats(args.target_ratio, "--target-ratio")
    _eval_configs(args, None)
    if args.peers:
        peer_backend(args.peer_backend)
    text = load_text(args.dataset, args.text_file) if args.text_file else None
    config, model, tokenizer = _load(args)
    _check_positions(model, max(lengths), "--lengths")
    configs = _eval_configs(args, model_geometry(model).num_kv_heads)
    # Filler never comes from calibration text: the corpus without its reserved end (or the --text-file).
    filler, calib_ids = _token_ids(args, tokenizer, model, text)
    rows = _rows(args, model, configs, calib_ids, max(lengths))
    trials = args.trials or default_trials(lengths, depths)
    command = "hf-svdkv " + " ".join(sys.argv[1:])
    result = run_needle(
        model,
        tokenizer,
        rows,
        filler,
        lengths=lengths,
        depths=depths,
        trials=trials,
        seed=args.seed,
        model_name=config.model_path or DEFAULT_MODEL_NAME,
        settings={"dtype": config.dtype, "command": command, **args.calibration_record},
    )
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(result, args.plot)
    if args.markdown:
        Path(args.markdown).write_text(to_markdown(result, command), encoding="utf-8")
    return 0


# --- entry point ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Low-rank (SVD) KV-cache compression for Hugging Face transformers")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    _add_eval(subparsers)
    _add_bases(subparsers)
    _add_generate(subparsers)
    _add_bench(subparsers)
    _add_needle(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns 0, or exits with status 2 and a one-line message on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a fresh process of the same command is given
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        _fail(str(error) or type(error).__name__)


if __name__ == "__main__":
    sys.exit(main())
