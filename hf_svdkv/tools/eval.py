"""Perplexity of a model under different KV caches, measured the same way for every cache.

A row is a cache recipe (`RowSpec`): how to prepare the model, how to make a fresh cache per window,
how to restore the model afterwards. `run_eval` runs the uncompressed `DynamicCache` first, then every
other row on the same deterministic windows, and reports perplexity, its increase over the baseline,
and the bytes the cache really held per token (`memory.cache_nbytes`).

Protocols (both score only tokens whose context went through the cache under test):
- `continuation`: each window is `context + continuation` tokens. The context is prefilled into a
  fresh cache in one forward; the continuation is then teacher-forced through that cache in one
  forward. Perplexity is over the continuation tokens, the first of which is predicted by the
  prefill's last logit.
- `sliding`: each window of `window_len` tokens is fed through a fresh cache in chunks of `chunk`
  tokens. The first chunk only fills the cache; perplexity is over the other `window_len - chunk`
  tokens, the first of which is predicted by the first chunk's last logit.
Perplexity is exp of the mean NLL over all scored tokens of all windows (token-weighted).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..architectures import cache_kwargs
from ..compression_config import DEFAULT_SINKS
from . import report
from .memory import cache_nbytes

logger = logging.getLogger("hf_svdkv")

PROTOCOLS = ("continuation", "sliding")
# transformers' QuantizedCache rows of `--peers`, per backend: (name, bits, QuantizedCache arguments). quanto's defaults
# quantize keys per token; KIVI (the method QuantizedCache follows) quantizes keys per channel over groups of
# `q_group_size` tokens and values per token, keeping the last `residual_length` tokens in full precision: with int2
# that is +13% ppl where the defaults give +283% (REFERENCE), so both are shown. hqq quantizes along the head dim (axis
# 1) in transformers' own examples; its other axis groups elements far apart, not KIVI's layout.
HQQ_AXES = {"axis_key": 1, "axis_value": 1}


def _kivi(group: int) -> dict[str, int]:
    return {"axis_key": -1, "axis_value": 0, "q_group_size": group, "residual_length": 128}


PEERS = {
    "quanto": [
        ("quantized-int4", 4, {}),
        ("quantized-int2", 2, {}),
        ("kivi-int4", 4, _kivi(64)),
        ("kivi-int2-g32", 2, _kivi(32)),
        ("kivi-int2-g64", 2, _kivi(64)),
    ],
    "hqq": [("quantized-int4", 4, HQQ_AXES), ("quantized-int2", 2, HQQ_AXES)],
}
# Above this spread of ppl increases (in %), a linear y axis squashes every good row onto 0.
LOG_Y_SPAN_PCT = 100.0


@dataclass
class EvalRow:
    name: str
    ppl: float
    delta_pct: float
    kv_bytes_per_token: float
    compression_ratio: float
    seconds: float


@dataclass
class EvalResult:
    model: str
    dataset: str
    protocol: str
    rows: list[EvalRow]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; a non-finite number (a diverged row) becomes null, which strict JSON allows."""
        rows = [{k: _finite_or_none(v) for k, v in asdict(row).items()} for row in self.rows]
        return {
            "model": self.model,
            "dataset": self.dataset,
            "protocol": self.protocol,
            "rows": rows,
            "settings": self.settings,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# --- rows ---------------------------------------------------------------------------------------------------
CacheFactory = Callable[[], Any]


def _no_op(model: nn.Module, *args: Any) -> None:
    return None


@dataclass
class RowSpec:
    """One cache to evaluate.

    prepare: checks done before any row runs, so that bad input fails in seconds rather than after the
        baseline. Called with the model and the sizes of the successive cache updates of one window.
    setup: patches the model if needed and returns a factory giving a fresh cache per window.
    teardown: restores the model; always runs, even if the row fails.
    """

    name: str
    setup: Callable[[nn.Module], CacheFactory]
    prepare: Callable[[nn.Module, Sequence[int]], None] = _no_op
    teardown: Callable[[nn.Module], None] = _no_op


def dynamic_row() -> RowSpec:
    from transformers import DynamicCache

    return RowSpec("dynamic", setup=lambda model: lambda: DynamicCache(config=model.config))


BasesFactory = Callable[[nn.Module, Any], Any]


def svd_row(
    name: str,
    *,
    config: Any = None,
    bases_dir: str | Path | None = None,
    bases_factory: BasesFactory | None = None,
    window: int = 0,
    latent_bits: int | str | None = None,
    sinks: int = DEFAULT_SINKS,
) -> RowSpec:
    """A row for `SVDCompressedCache`: `patch_model` with a CompressionConfig, or with bases saved on disk.

    `bases_factory(model, config)` builds the bases for `config` (e.g. a shared `Calibrator`'s `bases`); without
    it, `patch_model` computes data-free bases from the config. `window`, `latent_bits` and `sinks` apply to saved
    bases (a config carries its own)."""
    from .. import SVDBases, SVDCompressedCache, patch_model, unpatch_model
    from ..architectures import model_geometry

    if (config is None) == (bases_dir is None):
        raise ValueError("an SVD row needs exactly one of a CompressionConfig or a bases directory")
    loaded: dict[str, Any] = {}

    def prepare(model: nn.Module, update_sizes: Sequence[int]) -> None:
        if bases_dir is not None:
            loaded["bases"] = SVDBases.from_pretrained(bases_dir)
            loaded["bases"].validate(model)
        else:
            # Cheap checks (supported model, ranks that fit its heads); the bases are fitted in setup, so
            # that the row's time includes them and the config alone decides how (method, window, bits).
            geometry = model_geometry(model)
            config.resolve_ranks(geometry.head_dim, geometry.num_kv_heads)

    def setup(model: nn.Module) -> CacheFactory:
        if bases_dir is not None:
            patch_model(model, bases=loaded["bases"], window=window, latent_bits=latent_bits, sinks=sinks)
        elif bases_factory is not None:
            bases = bases_factory(model, config)
            patch_model(model, bases=bases, window=config.window, latent_bits=config.latent_bits, sinks=config.sinks)
        else:
            patch_model(model, config)
        return lambda: SVDCompressedCache(model)

    return RowSpec(name, setup=setup, prepare=prepare, teardown=unpatch_model)


def quantized_row(backend: str, nbits: int, name: str | None = None, **kwargs: Any) -> RowSpec:
    """transformers' QuantizedCache, the peer a user would pick today, with `kwargs` (axes, group size, residual;
    hqq's head-dim axes by default); with KIVI's axes on quanto, its layer for prompts of any length (tools/kivi.py)."""
    from transformers import QuantizedCache

    from .kivi import kivi_cache

    kwargs = kwargs or (HQQ_AXES if backend == "hqq" else {})

    def make(model: nn.Module) -> Any:
        if backend == "quanto" and kwargs.get("axis_key") == -1:
            return kivi_cache(model.config, nbits, **kwargs)
        return QuantizedCache(backend=backend, config=model.config, nbits=nbits, **kwargs)

    def prepare(model: nn.Module, update_sizes: Sequence[int]) -> None:
        # Replays one window's cache updates on one layer with random states: an unsupported model fails here,
        # and so do sizes the backend cannot pack (hqq packs 2 or 4 codes per byte and crashes deep inside
        # when the number of quantization groups does not divide evenly), instead of after the baseline ran.
        layer = make(model).layers[0]
        config = model.config.get_text_config(decoder=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        try:
            for size in update_sizes:
                states = torch.randn(
                    1, config.num_key_value_heads, size, head_dim, dtype=model.dtype, device=model.device
                )
                layer.update(states, states)
        except (RuntimeError, ValueError) as error:  # KIVI's axes no longer raise here (tools/kivi.py); hqq's may
            raise ValueError(
                f"the {backend} backend cannot quantize int{nbits} caches filled {list(update_sizes)} tokens at a time "
                f"({' '.join(str(error).split())}); try token counts that are multiples of 8"
            ) from error

    return RowSpec(name or f"quantized-int{nbits}", setup=lambda model: lambda: make(model), prepare=prepare)


def _importable(module: str) -> bool:
    # find_spec on "a.b" imports "a" first and raises if it is missing, hence the two steps.
    return find_spec(module.split(".")[0]) is not None and find_spec(module) is not None


def peer_backend(requested: str | None) -> str | None:
    """The quantization backend to use: the requested one, else quanto, else hqq, else None."""
    modules = {"quanto": "optimum.quanto", "hqq": "hqq"}
    if requested is not None:
        if requested not in modules:
            raise ValueError(f"unknown peer backend {requested!r}: choose quanto or hqq")
        if not _importable(modules[requested]):
            raise ValueError(f"--peer-backend {requested} needs the {modules[requested]} package installed")
        return requested
    return next((backend for backend, module in modules.items() if _importable(module)), None)


def parse_ranks(text: str) -> list[tuple[int, int]]:
    """`"32:32,16:48"` -> [(32, 32), (16, 48)] (key rank : value rank, per KV head)."""
    pairs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"bad --ranks entry {item.strip()!r}: expected KEY:VALUE integers, e.g. 32:32,16:48")
        pairs.append((int(parts[0]), int(parts[1])))
    return pairs


def row_name(config: Any) -> str:
    """`svd-low`, `svd-k32-v32-g3`, `calib-2x-w64-int4-s4`: method, ranks or ratio, then what differs from defaults."""
    prefix = "calib" if config.method == "calibrated" else "svd"
    if config.target_ratio is not None:
        body = f"{config.target_ratio:g}x"
    elif config.profile is not None and config.key_rank is None and config.value_rank is None:
        body = config.profile
    else:
        body = f"k{config.key_rank}-v{config.value_rank}"
    suffix = f"-g{config.group_size}" if config.group_size not in (None, 1) else ""
    suffix += f"-w{config.window}" if config.window else ""
    if config.latent_bits:
        suffix += "-mixed" if config.latent_bits == "mixed" else f"-int{config.latent_bits}"
    suffix += f"-s{config.sinks}" if getattr(config, "sinks", 0) else ""
    return f"{prefix}-{body}{suffix}"


def build_rows(
    *,
    profiles: Sequence[str] = (),
    ranks: Sequence[tuple[int, int]] = (),
    target_ratios: Sequence[float] = (),
    methods: Sequence[str] = ("weights",),
    group_size: int = 1,
    windows: Sequence[int] = (0,),
    latent_bits: Sequence[int | None] = (None,),
    configs: Sequence[Any] = (),
    bases_dirs: Sequence[str | Path] = (),
    calibrated_bases: BasesFactory | None = None,
    weight_bases: BasesFactory | None = None,
    peers: bool = False,
    backend: str | None = None,
) -> list[RowSpec]:
    """The rows of an evaluation: dynamic first (the baseline), then SVD rows, then quantized peers.

    SVD rows are every combination of (profile, ranks or target ratio) x method x window x latent bits, then the
    explicit `configs`. Rows with method "calibrated" get their bases from `calibrated_bases(model, config)`, others
    from `weight_bases(model, config)` if given (else `patch_model` fits them)."""
    from .. import CompressionConfig

    shapes = [{"profile": p} for p in profiles] + [{"key_rank": k, "value_rank": v} for k, v in ranks]
    shapes += [{"target_ratio": r} for r in target_ratios]
    all_configs = [
        CompressionConfig(**shape, method=method, group_size=group_size, window=window, latent_bits=bits)
        for shape in shapes
        for method in methods
        for window in windows
        for bits in latent_bits
    ] + list(configs)
    rows = [dynamic_row()]
    for config in all_configs:
        factory = weight_bases
        if config.method == "calibrated":
            if calibrated_bases is None:
                raise ValueError(f"row {row_name(config)} is calibrated but no calibration was given")
            factory = calibrated_bases
        rows.append(svd_row(row_name(config), config=config, bases_factory=factory))
    for directory in bases_dirs:
        for window in windows:
            for bits in latent_bits:
                suffix = (f"-w{window}" if window else "") + (f"-int{bits}" if bits else "")
                rows.append(
                    svd_row(
                        f"bases:{Path(directory).name}{suffix}", bases_dir=directory, window=window, latent_bits=bits
                    )
                )
    if peers:
        chosen = peer_backend(backend)
        if chosen is None:
            logger.warning("neither optimum-quanto nor hqq is installed: skipping the quantized peers")
        else:
            rows.extend(quantized_row(chosen, nbits, name, **kwargs) for name, nbits, kwargs in PEERS[chosen])
    return rows


# --- protocols ----------------------------------------------------------------------------------------------
def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL, with the log-softmax in float32 even for a bf16 model (bf16 logits lose ~3 digits)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()


def _continuation_window(model: nn.Module, ids: torch.Tensor, cache: Any, context: int) -> tuple[float, int]:
    # Only the prefill's last logit is needed: skipping the LM head on the context saves real time.
    prefill = model(ids[:, :context], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    rest = model(ids[:, context:], **cache_kwargs(model, cache), use_cache=True)
    logits = torch.cat([prefill.logits[:, -1:], rest.logits[:, :-1]], dim=1)
    targets = ids[:, context:]
    return _nll_sum(logits, targets), targets.numel()


def _sliding_window(model: nn.Module, ids: torch.Tensor, cache: Any, chunk: int) -> tuple[float, int]:
    total = ids.shape[1]
    first = model(ids[:, :chunk], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    carry = first.logits[:, -1:]  # predicts the first scored token (position `chunk`)
    nll, count = 0.0, 0
    for start in range(chunk, total, chunk):
        piece = ids[:, start : start + chunk]
        out = model(piece, **cache_kwargs(model, cache), use_cache=True)
        logits = torch.cat([carry, out.logits[:, :-1]], dim=1)
        nll += _nll_sum(logits, piece)
        count += piece.numel()
        carry = out.logits[:, -1:]
    return nll, count


def _run_row(
    model: nn.Module, spec: RowSpec, windows: Sequence[torch.Tensor], score: Callable, progress: bool
) -> tuple[float, float, float]:
    """(ppl, kv bytes per token, seconds) of one row over all windows; the time includes setup (fitting bases)."""
    start = time.perf_counter()
    factory = spec.setup(model)
    try:
        nll, count, bytes_per_token = 0.0, 0, []
        for window in tqdm(windows, desc=spec.name, unit="window", disable=not progress, leave=False):
            ids = window.reshape(1, -1).to(model.device)
            cache = factory()
            window_nll, window_count = score(model, ids, cache)
            nll += window_nll
            count += window_count
            # Measured at the end of the window, when the cache holds every token of it.
            bytes_per_token.append(cache_nbytes(cache) / (ids.shape[0] * cache.get_seq_length()))
    finally:
        spec.teardown(model)
    mean_nll = nll / count
    ppl = math.exp(mean_nll) if mean_nll < math.log(torch.finfo(torch.float64).max) else math.inf
    return ppl, sum(bytes_per_token) / len(bytes_per_token), time.perf_counter() - start


def run_eval(
    model: nn.Module,
    ids: torch.Tensor,
    rows: Sequence[RowSpec],
    *,
    protocol: str = "continuation",
    context: int = 1536,
    continuation: int = 512,
    window_len: int = 512,
    chunk: int = 128,
    n_windows: int = 3,
    model_name: str = "",
    dataset_name: str = "",
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate every row on the same windows of the 1-D token stream `ids`; rows[0] is the baseline."""
    from ..text import make_windows

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if not rows:
        raise ValueError("nothing to evaluate: no rows")
    if protocol == "continuation":
        if context <= 0 or continuation <= 0:
            raise ValueError("--context and --continuation must be positive")
        length = context + continuation

        def score(model: nn.Module, window: torch.Tensor, cache: Any) -> tuple[float, int]:
            return _continuation_window(model, window, cache, context)

        shape = {"context": context, "continuation": continuation}
        update_sizes = [context, continuation]
    else:
        if not 0 < chunk < window_len:
            raise ValueError(f"--chunk must be positive and smaller than --window-len ({chunk} vs {window_len})")
        length = window_len

        def score(model: nn.Module, window: torch.Tensor, cache: Any) -> tuple[float, int]:
            return _sliding_window(model, window, cache, chunk)

        shape = {"window_len": window_len, "chunk": chunk}
        update_sizes = [min(chunk, window_len - start) for start in range(0, window_len, chunk)]
    windows = make_windows(ids, length, n_windows)

    start = time.perf_counter()
    measured = []
    with torch.inference_mode():
        for spec in rows:
            spec.prepare(model, update_sizes)
        # One untimed forward first: page-in of mmapped weights and kernel set-up would otherwise be charged
        # to whichever row runs first.
        model(windows[0].reshape(1, -1).to(model.device), use_cache=False, logits_to_keep=1)
        for spec in rows:
            ppl, bpt, seconds = _run_row(model, spec, windows, score, progress)
            measured.append((spec.name, ppl, bpt, seconds))

    _, base_ppl, base_bpt, _ = measured[0]
    result_rows = [
        EvalRow(name, ppl, 100.0 * (ppl / base_ppl - 1.0), bpt, base_bpt / bpt, seconds)
        for name, ppl, bpt, seconds in measured
    ]
    all_settings = {
        **shape,
        "windows": len(windows),
        "scored_tokens_per_window": continuation if protocol == "continuation" else window_len - chunk,
        "baseline": rows[0].name,
        "total_seconds": time.perf_counter() - start,
        **(settings or {}),
    }
    return EvalResult(model_name, dataset_name, protocol, result_rows, all_settings)


# --- reporting ----------------------------------------------------------------------------------------------
def _pct(value: float) -> str:
    # A diverged row reads +204,116% rather than a truncated +204115.6…
    return f"{value:+,.2f}%" if abs(value) < 100 else f"{value:+,.0f}%"


EVAL_COLUMNS = ("row", "ppl", "Δ ppl", "KV bytes/token", "ratio", "seconds")


def table_rows(result: EvalResult) -> list[tuple[str, ...]]:
    return [
        (
            row.name,
            f"{row.ppl:,.3f}",
            _pct(row.delta_pct),
            f"{row.kv_bytes_per_token:,.1f}",
            f"{row.compression_ratio:.2f}x",
            f"{row.seconds:.1f}",
        )
        for row in result.rows
    ]


def print_table(result: EvalResult, out: Any = None) -> None:
    """A rich table of the rows, one line per cache."""
    report.print_table(f"{result.model} · {result.dataset} · {result.protocol}", EVAL_COLUMNS, table_rows(result), out)


def to_markdown(result: EvalResult, command: str | None = None) -> str:
    """The table as Markdown (for READMEs), with the settings and the command that produced it."""
    settings = result.settings
    lines = [f"`{command}`", ""] if command else []
    lines.append(
        f"{result.model} · {result.dataset} · {result.protocol} · {settings.get('windows')} windows · "
        f"{settings.get('dtype', '')} · rows in {settings.get('total_seconds', 0):.0f} s"
    )
    if settings.get("calibration_seconds"):
        lines[-1] += (
            f" · calibration {settings['calibration_seconds']:.0f} s on {settings['calibration_tokens']:,} tokens "
            f"({settings.get('calibration_text')}, never scored)"
        )
    lines += ["", *report.markdown_table(EVAL_COLUMNS, table_rows(result))]
    return "\n".join(lines) + "\n"


def plot(result: EvalResult, path: str | Path) -> Path:
    """Perplexity increase (%) against compression ratio, one labelled point per row."""
    rows = [r for r in result.rows if math.isfinite(r.delta_pct)]
    fig, ax = report.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.scatter(row.compression_ratio, row.delta_pct)
        ax.annotate(
            row.name, (row.compression_ratio, row.delta_pct), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
    deltas = [r.delta_pct for r in rows]
    if deltas and max(deltas) - min(deltas) > LOG_Y_SPAN_PCT:
        # symlog: logarithmic for large increases yet still shows 0 (the baseline) and small negatives.
        ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.margins(x=0.15)  # room for the labels of the outermost points
    ax.set_xlabel("KV compression ratio (x, bytes per token vs dynamic)")
    ax.set_ylabel("perplexity increase (%)")
    ax.set_title(f"{result.model} · {result.dataset} · {result.protocol}")
    ax.grid(True, alpha=0.3)
    return report.save_figure(fig, path)
