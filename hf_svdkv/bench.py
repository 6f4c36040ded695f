"""Speed and memory of KV caches on one model: prefill time, decode tokens/s, peak memory, KV bytes.

For every context length and batch size, each row (a cache recipe from `eval`: dynamic, SVD configurations,
transformers' quantized peers) gets a fresh cache, a prefill of random tokens, a few untimed decode steps, then
`steps` timed single-token steps; decode speed is batch / median step time. Peak memory is the process's growth
during that run: CUDA's max_memory_allocated, or on CPU the peak resident set size (Linux keeps it in
/proc/self/status as VmHWM and resets it on request; tracemalloc does not see torch's allocations). KV bytes are
what the cache holds at the end (`memory.cache_nbytes`). Rows run one after another on the same weights, so their
numbers compare; ratios are to `dynamic`.
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


def measure(
    model: nn.Module, make_cache, ids: torch.Tensor, *, steps: int, warmup: int, prefill_chunk: int = 0
) -> tuple[float, float, int | None, int]:
    """(prefill seconds, decode tokens/s, peak memory growth, KV bytes) of one fresh cache on `ids` [batch, context]."""
    device = ids.device
    with PeakMemory(device) as peak:
        cache = make_cache()
        chunk = prefill_chunk or ids.shape[1]
        _sync(device)
        start = time.perf_counter()
        for begin in range(0, ids.shape[1], chunk):  # only the last logit is needed: skip the LM head elsewhere
            out = model(ids[:, begin : begin + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        _sync(device)
        prefill_s = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        times = []
        for step in range(warmup + steps):
            _sync(device)
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            if step >= warmup:
                times.append(time.perf_counter() - start)
        kv_bytes = cache_nbytes(cache)
        del cache, out
    return prefill_s, ids.shape[0] / statistics.median(times), peak.bytes, kv_bytes


def run_rows(
    model: nn.Module,
    rows: Sequence,
    contexts: Sequence[int],
    batches: Sequence[int],
    *,
    steps: int = 16,
    warmup: int = 2,
    prefill_chunk: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> list[BenchRow]:
    """Every row (an `eval.RowSpec`) at every (context, batch), on the same random prompts."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    prompts = {(c, b): torch.randint(3, vocab, (b, c), generator=generator).to(model.device) for c in contexts for b in batches}
    results = []
    with torch.inference_mode():
        for spec in rows:
            spec.prepare(model, [prefill_chunk or min(contexts), 1])  # the update sizes of one run
        model(prompts[contexts[0], batches[0]][:, :64], use_cache=False, logits_to_keep=1)  # page weights in, init kernels
        for spec in rows:
            factory = spec.setup(model)
            try:
                for (context, batch), ids in prompts.items():
                    prefill_s, tokens_per_s, peak, kv = measure(model, factory, ids, steps=steps, warmup=warmup,
                                                                prefill_chunk=prefill_chunk)
                    results.append(BenchRow(spec.name, context, batch, prefill_s, tokens_per_s, peak, kv))
                    if progress:
                        print(f"  {spec.name:24s} context {context:6d} batch {batch:3d}: prefill {prefill_s:7.2f} s, "
                              f"decode {tokens_per_s:8.2f} tok/s", flush=True)
            finally:
                spec.teardown(model)
    return results


# --- reporting ----------------------------------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def print_table(result: BenchResult) -> None:
    """One line per row, with speed and memory ratios to `dynamic` at the same context and batch."""
    base = {(r.context, r.batch): r for r in result.rows if r.name == "dynamic"}
    header = ("row", "context", "batch", "prefill s", "decode tok/s", "x dyn", "peak MiB", "x dyn", "KV MiB", "x smaller")
    print(f"{result.model} on {result.device}")
    print(" | ".join(f"{h:>12s}" if i else f"{h:24s}" for i, h in enumerate(header)))
    for r in result.rows:
        ref = base.get((r.context, r.batch))
        speed = f"{r.decode_tokens_per_s / ref.decode_tokens_per_s:.2f}" if ref else "-"
        peak = f"{r.peak_mem_bytes / ref.peak_mem_bytes:.2f}" if ref and r.peak_mem_bytes and ref.peak_mem_bytes else "-"
        smaller = f"{ref.kv_bytes / r.kv_bytes:.2f}" if ref and r.kv_bytes else "-"
        cells = (r.context, r.batch, f"{r.prefill_s:.2f}", f"{r.decode_tokens_per_s:.2f}", speed, _mib(r.peak_mem_bytes),
                 peak, _mib(r.kv_bytes), smaller)
        print(f"{r.name:24s} | " + " | ".join(f"{c!s:>12s}" for c in cells))


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
            speed_ax.plot([r.context for r in rows], [r.decode_tokens_per_s for r in rows], marker="o", label=label)
            kv_ax.plot([r.context for r in rows], [r.kv_bytes / 2**20 for r in rows], marker="o", label=label)
    for ax, ylabel in ((speed_ax, "decode tokens/s"), (kv_ax, "KV cache MiB")):
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


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `hf-svdkv bench` (also scripts/benchmark.py)."""
    parser.add_argument("--model", help="Hub id or local directory (default: $HF_SVDKV_MODEL or the embedded SmolLM2-135M)")
    parser.add_argument("--dtype", help="torch dtype of the weights and the cache (default: bfloat16)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")
    parser.add_argument("--contexts", default="2048,8192", help="comma-separated prompt lengths (default: 2048,8192)")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes (default: 1)")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per run (default: 16)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed decode steps first (default: 2)")
    parser.add_argument("--prefill-chunk", type=int, default=0,
                        help="prefill this many tokens per forward (default: 0 = the whole prompt at once)")
    parser.add_argument("--ranks", default="32:32", help="comma-separated KEY:VALUE ranks per KV head (default: 32:32; 'none' for no rows)")
    parser.add_argument("--group-size", type=int, default=1, help="KV heads sharing one basis (default: 1)")
    parser.add_argument("--target-ratio", help="comma-separated compression targets, each an SVD row with allocated ranks")
    parser.add_argument("--latent-bits", type=int, choices=(8, 4), help="store the SVD rows' latents as 8- or 4-bit integers")
    parser.add_argument("--window", type=int, default=0, help="full-precision window of the SVD rows (default: 0)")
    parser.add_argument("--peers", action="store_true", help="also run transformers' QuantizedCache int4 and int2")
    parser.add_argument("--peer-backend", choices=("quanto", "hqq"), help="quantization backend (default: quanto, else hqq)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="write the result as JSON here")
    parser.add_argument("--plot", help="write decode speed and KV size vs context here (PNG, PDF, SVG ...)")


def build_bench_rows(args: argparse.Namespace) -> list:
    """dynamic, then one SVD row per --ranks pair and per --target-ratio, then the quantized peers."""
    from .config import CompressionConfig
    from .eval import dynamic_row, parse_ranks, peer_backend, quantized_row, svd_row

    common = {"group_size": args.group_size, "window": args.window, "latent_bits": args.latent_bits}
    suffix = (f"-g{args.group_size}" if args.group_size != 1 else "") + (f"-w{args.window}" if args.window else "")
    suffix += f"-int{args.latent_bits}" if args.latent_bits else ""
    rows = [dynamic_row()]
    ranks = [] if args.ranks.strip().lower() == "none" else parse_ranks(args.ranks)
    for key, value in ranks:
        rows.append(svd_row(f"svd-k{key}-v{value}{suffix}", config=CompressionConfig(key_rank=key, value_rank=value, **common)))
    for text in (args.target_ratio or "").split(","):
        if text.strip():
            ratio = float(text)
            rows.append(svd_row(f"svd-{ratio:g}x{suffix}", config=CompressionConfig(target_ratio=ratio, **common)))
    if args.peers:
        backend = peer_backend(args.peer_backend)
        if backend is None:
            print("note: neither optimum-quanto nor hqq is installed; skipping the quantized peers")
        else:
            rows += [quantized_row(backend, 4), quantized_row(backend, 2)]
    return rows


def run_bench(args: argparse.Namespace) -> int:
    """`hf-svdkv bench`: checks the flags, loads the model, runs every row, prints, writes --json / --plot."""
    import dataclasses

    from .assets import MODEL_NAME as DEFAULT_MODEL_NAME
    from .loading import ModelConfig, load_model

    contexts, batches = _ints(args.contexts, "--contexts"), _ints(args.batch, "--batch")
    if args.steps <= 0 or args.warmup < 0 or args.prefill_chunk < 0:
        raise ValueError("--steps must be positive, --warmup and --prefill-chunk not negative")
    for path in (args.json, args.plot):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"{path}: directory {Path(path).resolve().parent} does not exist")
    rows = build_bench_rows(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"model_path": args.model, "dtype": args.dtype, "device": args.device}
    config = dataclasses.replace(ModelConfig.from_env(), **{k: v for k, v in overrides.items() if v is not None})
    model, _ = load_model(config)

    measured = run_rows(model, rows, contexts, batches, steps=args.steps, warmup=args.warmup, prefill_chunk=args.prefill_chunk)
    settings = {"dtype": config.dtype, "steps": args.steps, "warmup": args.warmup, "prefill_chunk": args.prefill_chunk,
                "threads": torch.get_num_threads()}
    result = BenchResult(config.model_path or DEFAULT_MODEL_NAME, str(model.device), measured, settings)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(result, args.plot)
    return 0
