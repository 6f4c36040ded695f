"""Speed and memory of KV caches on one model: prefill time, decode tokens/s, peak memory, KV bytes.

For every context length and batch size, each row (a cache recipe from `eval`: dynamic, SVD configurations,
transformers' quantized peers) gets a fresh cache, a prefill of random tokens and a few untimed decode steps; then
the rows take `steps` timed single-token steps in turn (row A's step, row B's step, ...), so that load on a shared
machine, which comes and goes over seconds, slows every row alike. Decode speed is batch / median step time. With
`repeat` rounds, each row keeps its best round. Peak memory is the process's growth during a row's prefill and
warm-up: CUDA's max_memory_allocated, or on CPU the peak resident set size (Linux keeps it in /proc/self/status as
VmHWM and resets it on request; tracemalloc does not see torch's allocations). KV bytes are what the cache holds at
the end (`memory.cache_nbytes`). Ratios are to `dynamic`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import cache_kwargs
from .memory import cache_nbytes

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class BenchRow:
    name: str
    context: int
    batch: int
    prefill_s: float
    decode_tokens_per_s: float
    peak_mem_bytes: int | None
    kv_bytes: int


@dataclass
class BenchResult:
    model: str
    device: str
    rows: list[BenchRow]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "rows": [asdict(r) for r in self.rows], "settings": self.settings}


# --- memory -------------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory growth over a `with` block: CUDA allocator statistics, or the process's resident set on Linux.
    `bytes` is None where neither is available (CPU off Linux)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        try:  # hand freed heap pages back, so the next allocations show up in the resident set again
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM (the peak) to the current resident set
            self._start = _status_kib("VmRSS")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start is not None and (peak := _status_kib("VmHWM")) is not None:
            self.bytes = 1024 * (peak - self._start)


# --- measuring ----------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _LiveRow:
    """A row's cache between its prefill and the end of the interleaved decoding, and how to patch the model for it."""

    spec: Any
    patch: Any  # hf_svdkv.patch.PatchState the row runs under, or None (an unpatched model)
    cache: Any
    token: torch.Tensor
    prefill_s: float
    peak: int | None
    times: list[float] = field(default_factory=list)


def _enter(model: nn.Module, patch: Any) -> None:
    if patch is not None:
        from . import patch_model

        patch_model(model, bases=patch.bases, window=patch.window, latent_bits=patch.latent_bits)


def _leave(model: nn.Module, patch: Any) -> None:
    if patch is not None:
        from . import unpatch_model

        unpatch_model(model)


def _step(model: nn.Module, live: _LiveRow) -> float:
    """One timed decoding step of a row's cache: seconds."""
    device = live.token.device
    _sync(device)
    start = time.perf_counter()
    out = model(live.token, **cache_kwargs(model, live.cache), use_cache=True)
    _sync(device)
    elapsed = time.perf_counter() - start
    live.token = out.logits[:, -1:].argmax(-1)
    return elapsed


def _prefill(model: nn.Module, spec: Any, ids: torch.Tensor, *, warmup: int, prefill_chunk: int) -> _LiveRow:
    """Set the row up, prefill a fresh cache and take its untimed warm-up steps; peak memory growth over all that."""
    from .patch import patch_state

    device = ids.device
    factory = spec.setup(model)
    try:
        patch = patch_state(model)
        with PeakMemory(device) as peak:
            cache = factory()
            chunk = prefill_chunk or ids.shape[1]
            _sync(device)
            start = time.perf_counter()
            for begin in range(0, ids.shape[1], chunk):  # only the last logit is needed: skip the LM head elsewhere
                out = model(ids[:, begin : begin + chunk], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            _sync(device)
            live = _LiveRow(spec, patch, cache, out.logits[:, -1:].argmax(-1), time.perf_counter() - start, None)
            del out
            for _ in range(warmup):
                _step(model, live)
    finally:
        spec.teardown(model)
    live.peak = peak.bytes
    return live


def measure_interleaved(
    model: nn.Module, rows: Sequence, ids: torch.Tensor, *, steps: int, warmup: int, prefill_chunk: int = 0
) -> list[BenchRow]:
    """Every row on `ids` [batch, context]: prefill (timed, with its peak memory growth), then `steps` decoding
    steps taken in turn, one row after another, so that load coming and going on the machine hits every row alike
    (the order rotates each step). Decode speed is batch / median step time; KV bytes are counted at the end."""
    live = [_prefill(model, spec, ids, warmup=warmup, prefill_chunk=prefill_chunk) for spec in rows]
    for step in range(steps):
        shift = step % len(live)
        for row in live[shift:] + live[:shift]:
            _enter(model, row.patch)
            try:
                row.times.append(_step(model, row))
            finally:
                _leave(model, row.patch)
    batch, context = ids.shape
    return [
        BenchRow(row.spec.name, context, batch, row.prefill_s, batch / statistics.median(row.times), row.peak, cache_nbytes(row.cache))
        for row in live
    ]


def run_rows(
    model: nn.Module,
    rows: Sequence,
    contexts: Sequence[int],
    batches: Sequence[int],
    *,
    steps: int = 16,
    warmup: int = 2,
    prefill_chunk: int = 0,
    repeat: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> list[BenchRow]:
    """Every row (an `eval.RowSpec`) at every (context, batch), on the same random prompts (`measure_interleaved`).

    With `repeat` > 1 everything runs that many rounds and every row keeps its best: fastest prefill and decode,
    smallest peak."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    prompts = {(c, b): torch.randint(3, vocab, (b, c), generator=generator).to(model.device) for c in contexts for b in batches}
    best: dict[tuple[str, int, int], BenchRow] = {}
    with torch.inference_mode():
        for spec in rows:
            spec.prepare(model, [prefill_chunk or min(contexts), 1])  # the update sizes of one run
        model(prompts[contexts[0], batches[0]][:, :64], use_cache=False, logits_to_keep=1)  # page weights in, init kernels
        for round_ in range(repeat):
            for (context, batch), ids in prompts.items():
                for row in measure_interleaved(model, rows, ids, steps=steps, warmup=warmup, prefill_chunk=prefill_chunk):
                    if progress:  # this round's own figures; the table keeps each row's best round
                        label = f" (round {round_ + 1}/{repeat})" if repeat > 1 else ""
                        print(f"  {row.name:24s} context {context:6d} batch {batch:3d}: prefill {row.prefill_s:7.2f} s, "
                              f"decode {row.decode_tokens_per_s:8.2f} tok/s{label}", flush=True)
                    if (key := (row.name, context, batch)) in best:
                        kept = best[key]
                        peaks = [p for p in (kept.peak_mem_bytes, row.peak_mem_bytes) if p is not None]
                        row = BenchRow(row.name, context, batch, min(kept.prefill_s, row.prefill_s),
                                       max(kept.decode_tokens_per_s, row.decode_tokens_per_s), min(peaks) if peaks else None,
                                       row.kv_bytes)
                    best[key] = row
                gc.collect()
    return list(best.values())


# --- reporting ----------------------------------------------------------------------------------------------------
TABLE_COLUMNS = ("row", "context", "batch", "prefill s", "decode tok/s", "decode ×dyn", "peak MiB", "peak ÷dyn",
                 "KV MiB", "KV ÷dyn")


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"


def table_rows(result: BenchResult) -> list[tuple[str, ...]]:
    """The cells of the table, one tuple per row: decode speed as a multiple of `dynamic`'s (higher is faster), peak
    memory growth and KV bytes as how many times smaller than `dynamic`'s, at the same context and batch."""
    base = {(r.context, r.batch): r for r in result.rows if r.name == "dynamic"}
    cells = []
    for r in result.rows:
        ref = base.get((r.context, r.batch))
        cells.append((
            r.name, str(r.context), str(r.batch), f"{r.prefill_s:.2f}", f"{r.decode_tokens_per_s:,.2f}",
            _ratio(r.decode_tokens_per_s, ref and ref.decode_tokens_per_s), _mib(r.peak_mem_bytes),
            _ratio(ref and ref.peak_mem_bytes, r.peak_mem_bytes), _mib(r.kv_bytes), _ratio(ref and ref.kv_bytes, r.kv_bytes),
        ))
    return cells


def _title(result: BenchResult) -> str:
    settings = ", ".join(f"{k} {v}" for k, v in result.settings.items() if k != "command")
    return f"{result.model} · {result.device}" + (f" · {settings}" if settings else "")


def print_table(result: BenchResult, console: Any = None) -> None:
    """A rich table of every row, with its ratios to `dynamic`."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or logged: rich would wrap at 80 columns
            console = Console(width=140)
    table = Table(title=_title(result))
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="left" if column == "row" else "right", no_wrap=True)
    for cells in table_rows(result):
        table.add_row(*cells)
    console.print(table)


def markdown_table(result: BenchResult, command: str | None = None) -> str:
    """The same table as `print_table`, as markdown (with the command that produced it, if given)."""
    lines = [f"**{_title(result)}**", ""]
    if command:
        lines += [f"`{command}`", ""]
    lines += ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(result)]
    lines += ["", "decode ×dyn: decode tokens/s over dynamic's (higher is faster); peak ÷dyn and KV ÷dyn: dynamic's "
              "peak memory growth and KV bytes over this row's (higher is smaller)."]
    return "\n".join(lines) + "\n"


def plot(result: BenchResult, path: str | Path) -> Path:
    """Decode tokens/s and KV MiB against context, one line per row and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed_ax, kv_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r.name for r in result.rows):
        for batch in sorted({r.batch for r in result.rows}):
            rows = sorted((r for r in result.rows if r.name == name and r.batch == batch), key=lambda r: r.context)
            label = f"{name} (batch {batch})"
            style = {"marker": "o", "label": label}
            speed_ax.plot([r.context for r in rows], [r.decode_tokens_per_s for r in rows], **style)
            kv_ax.plot([r.context for r in rows], [r.kv_bytes / 2**20 for r in rows], **style)
    for ax, ylabel in ((speed_ax, "decode tokens/s"), (kv_ax, "KV cache MiB")):
        if len({r.context for r in result.rows}) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    speed_ax.legend(fontsize=7)
    fig.suptitle(f"{result.model} · {result.device}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- command line -------------------------------------------------------------------------------------------------
def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{flag} takes positive integers, got {text!r}")
    return values


def _ratios(text: str | None) -> list[float]:
    try:
        return [float(item) for item in (text or "").split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--target-ratio takes comma-separated numbers above 1, got {text!r}") from None


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `hf-svdkv bench` (also scripts/benchmark.py)."""
    parser.add_argument("--model", help="Hub id or local directory (default: $HF_SVDKV_MODEL or the embedded SmolLM2-135M)")
    parser.add_argument("--dtype", help="torch dtype of the weights and the cache (default: bfloat16)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")
    parser.add_argument("--contexts", default="1024,4096,8192,16384",
                        help="comma-separated prompt lengths (default: 1024,4096,8192,16384)")
    parser.add_argument("--batch", default="1,4", help="comma-separated batch sizes (default: 1,4)")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per run (default: 16)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed decode steps first (default: 2)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every row this many rounds and keep its best figures (default: 1; more on a busy machine)")
    parser.add_argument("--prefill-chunk", type=int, default=0,
                        help="prefill this many tokens per forward (default: 0 = the whole prompt at once)")
    parser.add_argument("--ranks", default="32:32",
                        help="comma-separated KEY:VALUE ranks per KV head, one SVD row each (default: 32:32; 'none' for no rows)")
    parser.add_argument("--group-size", type=int, default=1, help="KV heads sharing one basis (default: 1)")
    parser.add_argument("--target-ratio",
                        help="comma-separated compression targets, one SVD row each, ranks allocated on the weight spectra")
    parser.add_argument("--latent-bits", type=int, choices=(8, 4), help="store the SVD rows' latents as 8- or 4-bit integers")
    parser.add_argument("--window", type=int, default=0, help="full-precision window of the SVD rows (default: 0)")
    parser.add_argument("--peers", action="store_true", help="also run transformers' QuantizedCache int4 and int2")
    parser.add_argument("--peer-backend", choices=("quanto", "hqq"), help="quantization backend (default: quanto, else hqq)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="write the result as JSON here")
    parser.add_argument("--plot", help="write decode speed and KV size vs context here (PNG, PDF, SVG ...)")
    parser.add_argument("--markdown", help="write the printed table as markdown here")


def build_bench_rows(args: argparse.Namespace) -> list:
    """dynamic, then one SVD row per --ranks pair and per --target-ratio, then the quantized peers. SVD rows use
    data-free "weights" bases (target ratios: ranks allocated on the weight spectra): speed does not depend on basis
    quality, and no calibration text is needed."""
    from .compression_config import CompressionConfig
    from .eval import build_rows, parse_ranks

    ranks = [] if args.ranks.strip().lower() == "none" else parse_ranks(args.ranks)
    shapes = [{"key_rank": k, "value_rank": v} for k, v in ranks] + [{"target_ratio": r} for r in _ratios(args.target_ratio)]
    configs = [CompressionConfig(**shape, method="weights", group_size=args.group_size, window=args.window,
                                 latent_bits=args.latent_bits) for shape in shapes]
    return build_rows(configs=configs, peers=args.peers, backend=args.peer_backend)


def run_bench(args: argparse.Namespace, command: str | None = None) -> int:
    """`hf-svdkv bench`: checks the flags, loads the model, runs every row, prints, writes --json / --plot / --markdown.
    `command` (the command line) is recorded in the markdown and the JSON settings."""
    import dataclasses
    from importlib.util import find_spec

    from .assets import MODEL_NAME as DEFAULT_MODEL_NAME
    from .loading import ModelConfig, load_model

    # Everything that can be checked without the model is checked first: a typo should cost seconds.
    contexts, batches = _ints(args.contexts, "--contexts"), _ints(args.batch, "--batch")
    if args.steps <= 0 or args.repeat <= 0 or args.warmup < 0 or args.prefill_chunk < 0:
        raise ValueError("--steps and --repeat must be positive, --warmup and --prefill-chunk not negative")
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    for flag in ("json", "plot", "markdown"):
        path = getattr(args, flag)
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"--{flag} {path}: directory {Path(path).resolve().parent} does not exist")
    if args.plot and find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)")
    rows = build_bench_rows(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"model_path": args.model, "dtype": args.dtype, "device": args.device}
    config = dataclasses.replace(ModelConfig.from_env(), **{k: v for k, v in overrides.items() if v is not None})
    model, _ = load_model(config)

    measured = run_rows(model, rows, contexts, batches, steps=args.steps, warmup=args.warmup,
                        prefill_chunk=args.prefill_chunk, repeat=args.repeat)
    settings = {"dtype": config.dtype, "steps": args.steps, "warmup": args.warmup, "prefill_chunk": args.prefill_chunk,
                "threads": torch.get_num_threads(), "repeat": args.repeat}
    result = BenchResult(config.model_path or DEFAULT_MODEL_NAME, str(model.device), measured, settings)
    if command:
        result.settings["command"] = command
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(result, args.plot)
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(result, command), encoding="utf-8")
    return 0
