"""Speed and memory of KV caches on one model: prefill time, decode tokens/s, peak memory, KV bytes.

For every context length and batch size, each row (a cache recipe from `eval`: dynamic, SVD configurations,
transformers' quantized peers) gets a fresh cache, a prefill of random tokens and a few untimed decode steps; then
the rows take `steps` timed single-token steps in turn (row A's step, row B's step, ...), so that load on a shared
machine, which comes and goes over seconds, slows every row alike. Decode speed is batch / median step time. With
`repeat` rounds, each row keeps its best round. Peak memory is the process's growth during a row's prefill and
warm-up: CUDA's max_memory_allocated, or on CPU the peak resident set size (Linux keeps it in /proc/self/status as
VmHWM and resets it on request; tracemalloc does not see torch's allocations). On CPU the resident set also holds what
the heap kept from earlier rows and how glibc happened to place freed blocks (the same row measured 391-512 MiB at 8k
in one process), so by default (`peak="isolated"`) each row's prefill is measured again in a fresh process
(`isolated_peak`) with glibc's mmap threshold fixed at 1 MiB: every large tensor is then mapped on allocation and
returned on free, and the figure is the memory the row needs (stable to 1% between runs). KV bytes are what the cache
holds at the end (`memory.cache_nbytes`). Ratios are to `dynamic`.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architectures import cache_kwargs
from ..patch import patch_model, unpatch_model
from ..svd_cache import CacheSettings, cache_settings
from . import report
from .memory import cache_nbytes

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MMAP_THRESHOLD = 1 << 20  # bytes: larger allocations are mmapped by glibc and unmapped when freed


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
        return {
            "model": self.model,
            "device": self.device,
            "rows": [asdict(r) for r in self.rows],
            "settings": self.settings,
        }


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


def default_peak_mode(device: torch.device) -> str:
    """`isolated` where the peak is the resident set (CPU on Linux), `inline` where the allocator counts it (CUDA)."""
    return "isolated" if device.type == "cpu" and _STATUS.exists() else "inline"


def isolated_peak(argv: Sequence[str], name: str, context: int, batch: int) -> int | None:
    """Peak memory growth of row `name`'s prefill and warm-up at (`context`, `batch`), measured by a fresh
    `hf-svdkv bench` process given the same arguments (`argv`, so the same model, rows and prompts) and
    `--peak-of`, with glibc's mmap threshold fixed (`MMAP_THRESHOLD`) unless the environment sets it."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))}
    command = [sys.executable, "-m", "hf_svdkv.tools.cli", *argv, "--peak-of", f"{name}@{context}x{batch}"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"measuring {name}'s peak memory in a fresh process failed: {why}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mem_bytes"]


def measure_peak(model: nn.Module, spec: Any, ids: torch.Tensor, *, warmup: int, prefill_chunk: int) -> int | None:
    """One row's peak memory growth over its prefill of `ids` and warm-up steps, after a short run of the same row
    (what it loads or compiles once is not counted, as in a process that has served a prompt before)."""
    with torch.inference_mode():
        _prefill(model, spec, ids[:, :64], warmup=1, prefill_chunk=0)  # also pages the weights in
        return _prefill(model, spec, ids, warmup=warmup, prefill_chunk=prefill_chunk).peak


def available_memory(device: torch.device) -> int | None:
    """Bytes a run may still allocate on `device`: free GPU memory, or on CPU Linux's MemAvailable (None elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return 1024 * int(line.split()[1])
    except OSError:
        pass
    return None


# --- measuring ----------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _LiveRow:
    """A row's cache between its prefill and the end of the interleaved decoding, and how to patch the model for it."""

    spec: Any
    settings: CacheSettings | None  # what the row patched the model with, or None (an unpatched model)
    cache: Any
    token: torch.Tensor
    prefill_s: float
    peak: int | None
    times: list[float] = field(default_factory=list)


def _enter(model: nn.Module, settings: CacheSettings | None) -> None:
    if settings is not None:
        patch_model(
            model,
            bases=settings.bases,
            window=settings.window,
            latent_bits=settings.latent_bits,
            exact_prefill=settings.exact_prefill,
            sinks=settings.sinks,
        )


def _leave(model: nn.Module, settings: CacheSettings | None) -> None:
    if settings is not None:
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
    device = ids.device
    factory = spec.setup(model)
    try:
        settings = cache_settings(model)
        with PeakMemory(device) as peak:
            cache = factory()
            chunk = prefill_chunk or ids.shape[1]
            _sync(device)
            start = time.perf_counter()
            for begin in range(0, ids.shape[1], chunk):  # only the last logit is needed: skip the LM head elsewhere
                out = model(
                    ids[:, begin : begin + chunk], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1
                )
            _sync(device)
            live = _LiveRow(spec, settings, cache, out.logits[:, -1:].argmax(-1), time.perf_counter() - start, None)
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
            _enter(model, row.settings)
            try:
                row.times.append(_step(model, row))
            finally:
                _leave(model, row.settings)
    batch, context = ids.shape
    return [
        BenchRow(
            row.spec.name,
            context,
            batch,
            row.prefill_s,
            batch / statistics.median(row.times),
            row.peak,
            cache_nbytes(row.cache),
        )
        for row in live
    ]


def bench_prompts(
    model: nn.Module, contexts: Sequence[int], batches: Sequence[int], seed: int = 0
) -> dict[tuple[int, int], torch.Tensor]:
    """The random prompts of a run, by (context, batch): the same for the same arguments, in any process."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    return {
        (c, b): torch.randint(3, vocab, (b, c), generator=generator).to(model.device) for c in contexts for b in batches
    }


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
    on_row: Callable[[BenchRow, int], None] | None = None,
) -> list[BenchRow]:
    """Every row (an `eval.RowSpec`) at every (context, batch), on the same random prompts (`measure_interleaved`).

    With `repeat` > 1 everything runs that many rounds and every row keeps its best: fastest prefill and decode,
    smallest peak. `on_row(row, round)` hears each row's own figures as it is measured (the CLI prints them)."""
    prompts = bench_prompts(model, contexts, batches, seed)
    best: dict[tuple[str, int, int], BenchRow] = {}
    with torch.inference_mode():
        for spec in rows:
            spec.prepare(model, [prefill_chunk or min(contexts), 1])  # the update sizes of one run
        model(
            prompts[contexts[0], batches[0]][:, :64], use_cache=False, logits_to_keep=1
        )  # page weights in, init kernels
        for round_ in range(repeat):
            for (context, batch), ids in prompts.items():
                for row in measure_interleaved(
                    model, rows, ids, steps=steps, warmup=warmup, prefill_chunk=prefill_chunk
                ):
                    if on_row is not None:  # this round's own figures; the table keeps each row's best round
                        on_row(row, round_)
                    if (key := (row.name, context, batch)) in best:
                        kept = best[key]
                        peaks = [p for p in (kept.peak_mem_bytes, row.peak_mem_bytes) if p is not None]
                        row = BenchRow(
                            row.name,
                            context,
                            batch,
                            min(kept.prefill_s, row.prefill_s),
                            max(kept.decode_tokens_per_s, row.decode_tokens_per_s),
                            min(peaks) if peaks else None,
                            row.kv_bytes,
                        )
                    best[key] = row
                gc.collect()
    return list(best.values())


# --- reporting ----------------------------------------------------------------------------------------------------
TABLE_COLUMNS = (
    "row",
    "context",
    "batch",
    "prefill s",
    "decode tok/s",
    "decode ×dyn",
    "peak MiB",
    "peak ÷dyn",
    "KV MiB",
    "KV ÷dyn",
)


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
        cells.append(
            (
                r.name,
                str(r.context),
                str(r.batch),
                f"{r.prefill_s:.2f}",
                f"{r.decode_tokens_per_s:,.2f}",
                _ratio(r.decode_tokens_per_s, ref and ref.decode_tokens_per_s),
                _mib(r.peak_mem_bytes),
                _ratio(ref and ref.peak_mem_bytes, r.peak_mem_bytes),
                _mib(r.kv_bytes),
                _ratio(ref and ref.kv_bytes, r.kv_bytes),
            )
        )
    return cells


def _title(result: BenchResult) -> str:
    settings = ", ".join(f"{k} {v}" for k, v in result.settings.items() if k != "command")
    return f"{result.model} · {result.device}" + (f" · {settings}" if settings else "")


def print_table(result: BenchResult, out: Any = None) -> None:
    """A rich table of every row, with its ratios to `dynamic`."""
    report.print_table(_title(result), TABLE_COLUMNS, table_rows(result), out)


def markdown_table(result: BenchResult, command: str | None = None) -> str:
    """The same table as `print_table`, as markdown (with the command that produced it, if given)."""
    lines = [f"**{_title(result)}**", ""]
    if command:
        lines += [f"`{command}`", ""]
    lines += report.markdown_table(TABLE_COLUMNS, table_rows(result))
    lines += [
        "",
        "decode ×dyn: decode tokens/s over dynamic's (higher is faster); peak ÷dyn and KV ÷dyn: dynamic's "
        "peak memory growth and KV bytes over this row's (higher is smaller).",
    ]
    return "\n".join(lines) + "\n"


def plot(result: BenchResult, path: str | Path) -> Path:
    """Decode tokens/s and KV MiB against context, one line per row and batch size."""
    fig, (speed_ax, kv_ax) = report.subplots(1, 2, figsize=(11, 4.2))
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
    return report.save_figure(fig, path)
