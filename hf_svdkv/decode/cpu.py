"""The fused CPU kernel for a decoding step (`cpu_decode.cpp`): the CPU's counterpart of `triton_kernel`.

On a CPU, the torch path (`blockwise`) makes several passes over a full-size key tensor per step (rebuild,
convert, rotate, score), each bound by memory bandwidth: slower than SDPA reading a full cache once. The kernel
rebuilds, rotates and scores keys a few tokens at a time in registers and folds them into an online softmax over the
value latents, so a step reads only the latents and their cos/sin.

The kernel is plain C++ with OpenMP and no torch headers: the first use on a machine compiles it with the system's
C++ compiler (about 10 s) into the cache folder (`$HF_SVDKV_CACHE/kernels`, keyed by source, flags and CPU), later
processes load it with ctypes. Without a compiler, or with HF_SVDKV_CPU_KERNEL=0, `available()` is False and the
torch path serves (same function, slower).

Integer latents (8- or 4-bit codes, or mixed-precision latents: runs of channels at 8, 4, 2 or 1 bits, each packed
on its own) are read as codes: the kernel dequantizes a span of a group's tokens
at a time into a per-thread buffer that stays in cache, to the same numbers the torch path reads (float32, rounded
to bfloat16 for a bfloat16 model), and the group's KV heads read them there as float latents. A step reads half or a
quarter of the bytes of bfloat16 latents (and a float16 scale and zero point per 32 channels) at about the speed of
bfloat16 latents on the default model; the torch path, which dequantizes whole blocks in memory first, is 3-4x slower.

On CPUs with AMX tiles (Intel Sapphire Rapids and later, Linux) bfloat16 latents, and integer latents of a bfloat16
model, are rebuilt by the tile unit, from the up projection split into two bfloat16 parts (`up_tiles`): the same
keys to float32 rounding, and the kernel 1.4-1.9x faster on the default model at 8k tokens. HF_SVDKV_CPU_TILES=0
keeps the vector rebuild.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from ..compression_config import MIXED
from ..latents import LatentStore
from ..quantization import QuantizedRuns, QuantizedTensor
from ..svd_cache import ExactTokens, SVDCacheLayer
from .base import DecodeBackend
from .rope import Rope
from .state import LatentAttentionOutput, LayerState
from .window import exact_mask, valid_latent_tokens

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
# -ffast-math: vectorised exp (glibc's libmvec) and reassociated dot products; the kernel never relies on infinities
# or NaNs (hidden tokens are skipped, not given -inf scores).
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
HEAD_DIMS = (32, 64, 80, 96, 128, 256)  # the kernel's compiled head sizes
LATENT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # of float latents, or that integer latents are read as
LATENT_BITS = (None, 8, 4, MIXED)  # store formats the kernel reads
CODE_BITS = (8, 4, 2, 1)  # widths of the integer codes it unpacks
MAX_VALUE_RANK = 512
MAX_QUERY_HEADS_PER_KV_HEAD = 32
SPAN = 512  # tokens per work item: enough to amortise a span's setup, small enough to share 8k tokens among threads


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's feature flags (Linux), else the platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    from ..assets import cache_dir

    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(), _cpu_signature().encode()]))
    library = cache_dir() / "kernels" / f"cpu_decode-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name, then renamed: a concurrent process never loads a half-written library.
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        built = Path(tmp) / library.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True, text=True)
        os.replace(built, library)
    return library


MAX_SEGMENTS = 8  # runs of channels at one width a latent row may have (kMaxSegments)


class _Segment(ctypes.Structure):
    """A run of channels of integer latents at one width: `Segment` in cpu_decode.cpp."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("zero", ctypes.c_void_p),
        ("bits", ctypes.c_int64),
        ("width", ctypes.c_int64),
        ("stride", ctypes.c_int64 * 3),
        ("scale_stride", ctypes.c_int64 * 3),
    ]


class _Latents(ctypes.Structure):
    """A store's latents as the kernel reads them: `Latents` in cpu_decode.cpp."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("stride", ctypes.c_int64 * 3),
        ("group", ctypes.c_int64),
        ("segments", ctypes.c_int64),
        ("segment", _Segment * MAX_SEGMENTS),
    ]


class _Exact(ctypes.Structure):
    """The exact copies of tokens merged into the kernel's softmax: `Exact` in cpu_decode.cpp."""

    _fields_ = [
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
        ("rope", ctypes.c_void_p),
        ("valid", ctypes.c_void_p),
        ("value_center", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("count", ctypes.c_int64),
    ]


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("HF_SVDKV_CPU_KERNEL", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"hf_svdkv: could not build the CPU decode kernel ({detail}); using the torch path", stacklevel=2)
        return None
    function = library.hf_svdkv_latent_decode
    function.restype = ctypes.c_int
    function.argtypes = (
        [ctypes.POINTER(_Latents)] * 2
        + [ctypes.c_void_p] * 12
        + [ctypes.c_int64] * 14
        + [ctypes.c_float, ctypes.POINTER(_Exact), ctypes.c_int, ctypes.c_int]
    )
    library.hf_svdkv_tiles_available.restype = ctypes.c_int
    return library


def available() -> bool:
    """The kernel is built (or buildable) and loadable on this machine."""
    return _library() is not None


@functools.cache
def tiles_available() -> bool:
    """bfloat16 latents are rebuilt with AMX tiles: the kernel was built for a CPU that has them, the OS grants
    this process their registers, and HF_SVDKV_CPU_TILES is not 0."""
    if os.environ.get("HF_SVDKV_CPU_TILES", "1") == "0" or not available():
        return False
    return bool(_library().hf_svdkv_tiles_available())


TILE_RANK = 32  # latent dimensions per tile step (one 64-byte row of bfloat16)


def up_tiles(key_rows: torch.Tensor) -> torch.Tensor:
    """The up projection [key groups, rank, width] float32 as the kernel's AMX tiles: ranks zero-padded to a multiple
    of TILE_RANK, split into hi = bf16(up) and lo = bf16(up - hi), each tile 16 rank pairs x 16 columns x 2 (AMX's
    pair-interleaved layout): [groups, rank_pad / 32, width / 16, hi|lo, 16, 16, 2] bfloat16."""
    groups, rank, width = key_rows.shape
    rank_pad = -(-rank // TILE_RANK) * TILE_RANK
    padded = key_rows.new_zeros((groups, rank_pad, width))
    padded[:, :rank] = key_rows
    hi = padded.bfloat16()
    lo = (padded - hi.float()).bfloat16()
    # [g, rank step, pair, pair member, hi|lo, column tile, column]
    #   -> [g, step, column tile, hi|lo, pair, column, member]
    parts = torch.stack([hi, lo], dim=2).view(groups, rank_pad // TILE_RANK, TILE_RANK // 2, 2, 2, width // 16, 16)
    return parts.permute(0, 1, 5, 4, 2, 6, 3).contiguous()


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _segments(store: LatentStore) -> list[QuantizedTensor]:
    """The runs of channels at one width an integer store holds, in channel order."""
    return list(store.stored.runs) if isinstance(store.stored, QuantizedRuns) else [store.stored]


def _latents(store: LatentStore) -> _Latents:
    """The kernel's description of `store`. It holds the tensors it points into (`held`): a contiguous copy would
    otherwise be freed before the kernel reads it."""
    strides = ctypes.c_int64 * 3
    if store.bits is None:
        data = store.stored if store.stored.stride(-1) == 1 else store.stored.contiguous()
        latents = _Latents(data.data_ptr(), strides(*data.stride()[:3]), 0, 0)
        latents.held = (data,)
        return latents
    latents = _Latents(None, strides(0, 0, 0), store.group, 0)
    held = []
    for part in _segments(store):
        data, scale, zero = part.data, part.scale, part.zero
        if data.stride(-1) != 1:
            data = data.contiguous()
        # The kernel reads zero points with the scales' strides; centred codes have none (a null pointer).
        if scale.stride(-1) != 1 or (zero is not None and scale.stride() != zero.stride()):
            scale, zero = scale.contiguous(), None if zero is None else zero.contiguous()
        latents.segment[latents.segments] = _Segment(
            data.data_ptr(),
            scale.data_ptr(),
            None if zero is None else zero.data_ptr(),
            part.bits,
            part.dim,
            strides(*data.stride()[:3]),
            strides(*scale.stride()[:3]),
        )
        latents.segments += 1
        held += [data, scale] if zero is None else [data, scale, zero]
    latents.held = tuple(held)
    return latents


def _readable(store: LatentStore) -> bool:
    """The kernel reads these codes: at most MAX_SEGMENTS runs, each group of channels starting on a byte."""
    if store.bits is None:
        return True
    parts = _segments(store)
    return len(parts) <= MAX_SEGMENTS and all(
        part.bits in CODE_BITS and part.group == store.group and part.group * part.bits % 8 == 0 for part in parts
    )


def decode_latents(
    query: torch.Tensor,
    layer: SVDCacheLayer,
    state: LayerState,
    rope: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    tiles: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query [batch, heads, d] (one token, after RoPE) over the layer's latent tokens.

    `rope` = `rope.rope_factors` of the layer's positions [batch, >= latent tokens, d/2] complex64;
    `valid` [batch, latent tokens] uint8 hides tokens (left padding). Returns the output over value latents
    [batch, heads, value_rank] float32 (normalised) and its natural-log log-sum-exp [batch, heads] (-inf where every
    token is hidden), as `triton_kernel.decode_latents`. `tiles`: rebuild latents read as bfloat16 with AMX
    (default: where `tiles_available()`)."""
    out, lse, _ = _decode(query, layer, state, rope, scaling, valid, tiles)
    return out, lse


def decode_with_exact(
    query: torch.Tensor,
    layer: SVDCacheLayer,
    state: LayerState,
    rope: torch.Tensor,
    scaling: float,
    exact: ExactTokens,
    exact_rope: torch.Tensor,
    exact_valid: torch.Tensor | None,
    valid: torch.Tensor | None = None,
    tiles: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`decode_latents` with the exact copies `exact` (the window, the sinks: keys and values of the latents' dtype)
    in the same softmax: `exact_rope` [batch, copies, d/2] complex64 their rotation, `exact_valid` [batch, copies]
    uint8 those the query reads (None: all). Returns the output over value latents and the output over exact values
    minus their center [batch, heads, d], both normalised over every token read, and the log-sum-exp over them all."""
    out, lse, exact_out = _decode(query, layer, state, rope, scaling, valid, tiles, (exact, exact_rope, exact_valid))
    return out, exact_out, lse


def _decode(
    query: torch.Tensor,
    layer: SVDCacheLayer,
    state: LayerState,
    rope: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None,
    tiles: bool | None,
    exact: tuple[ExactTokens, torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    batch, num_heads, head_dim = query.shape
    value_groups, latent_len, value_rank = layer.values.shape[1:]
    key_rank = layer.keys.shape[-1]
    num_kv_heads = state.value_center.shape[0]
    up = state.key_rows
    key_groups, width = up.shape[0], up.shape[-1]
    use_tiles = layer.keys.dtype == torch.bfloat16 and (tiles_available() if tiles is None else tiles)
    if use_tiles and not tiles_available():
        raise RuntimeError("hf_svdkv CPU kernel: AMX tiles are not available on this machine (see tiles_available())")
    tile_tensor = None
    if use_tiles:
        if "amx_tiles" not in state.kernel_data:
            state.kernel_data["amx_tiles"] = up_tiles(state.key_rows)
        tile_tensor = state.kernel_data["amx_tiles"]
    keys, values = _latents(layer.keys), _latents(layer.values)
    queries = query.float().contiguous()  # [batch, heads, d]: a KV head's query heads adjacent; scaled in the kernel
    cos_sin = torch.view_as_real(rope.contiguous())  # [batch, positions, d/2, 2]
    if valid is not None:
        valid = valid.to(torch.uint8).contiguous()
    per_kv = num_heads // num_kv_heads
    spans = -(-latent_len // SPAN)
    # Every float32 the kernel writes, in one allocation: per span (max, sum, output) per query head, then the merged
    # output, max and sum.
    partial = batch * num_heads * spans
    sizes = [
        partial,
        partial,
        partial * value_rank,
        batch * num_heads * value_rank,
        batch * num_heads,
        batch * num_heads,
    ]
    if exact is not None:
        sizes.append(batch * num_heads * head_dim)
    part_max, part_sum, part_acc, out, out_max, out_sum, *exact_out = torch.empty(
        sum(sizes), dtype=torch.float32, device=query.device
    ).split(sizes)
    exact_arguments = None
    if exact is not None:
        copies, exact_rope, exact_valid = exact
        exact_keys, exact_values = (t.expand(batch, -1, -1, -1).contiguous() for t in (copies.keys, copies.values))
        exact_cos_sin = torch.view_as_real(exact_rope.expand(batch, -1, -1).contiguous()).contiguous()
        if exact_valid is not None:
            exact_valid = exact_valid.to(torch.uint8).expand(batch, -1).contiguous()
        exact_arguments = _Exact(
            exact_keys.data_ptr(),
            exact_values.data_ptr(),
            exact_cos_sin.data_ptr(),
            _pointer(exact_valid),
            state.value_center.data_ptr(),
            exact_out[0].data_ptr(),
            exact_keys.shape[-2],
        )
    status = _library().hf_svdkv_latent_decode(
        ctypes.byref(keys),
        ctypes.byref(values),
        up.data_ptr(),
        _pointer(tile_tensor),
        _pointer(state.key_bias),
        cos_sin.data_ptr(),
        queries.data_ptr(),
        _pointer(valid),
        part_max.data_ptr(),
        part_sum.data_ptr(),
        part_acc.data_ptr(),
        out_max.data_ptr(),
        out_sum.data_ptr(),
        out.data_ptr(),
        batch,
        latent_len,
        num_kv_heads,
        per_kv,
        num_kv_heads // key_groups,
        num_kv_heads // value_groups,
        key_rank,
        value_rank,
        width,
        head_dim,
        SPAN,
        -(-key_rank // TILE_RANK) * TILE_RANK,
        cos_sin.stride(0),
        0 if valid is None else valid.stride(0),
        ctypes.c_float(scaling),
        None if exact_arguments is None else ctypes.byref(exact_arguments),
        LATENT_DTYPES[layer.keys.dtype],
        torch.get_num_threads(),
    )
    if status:
        raise ValueError(
            f"hf_svdkv CPU kernel: unsupported shape (head_dim {head_dim}, {per_kv} query heads per KV head, "
            f"value rank {value_rank})"
        )
    lse = out_max.view(batch, num_heads) + out_sum.view(batch, num_heads).log()  # log(0) = -inf: every token hidden
    exact_out = exact_out[0].view(batch, num_heads, head_dim) if exact is not None else None
    return out.view(batch, num_heads, value_rank), lse, exact_out


class CpuKernelBackend(DecodeBackend):
    """Single-token steps on CPU through the fused kernel: float32 or bfloat16 latents, or integer codes of a float32 or
    bfloat16 model (8- or 4-bit, or mixed widths; each group of channels starting on a byte), a compiled head size,
    at most MAX_QUERY_HEADS_PER_KV_HEAD query heads per KV head, value rank at most MAX_VALUE_RANK."""

    name = "cpu"

    def supports(self, query: torch.Tensor, layer: SVDCacheLayer, state: LayerState, rope: Rope) -> bool:
        num_heads, query_len, head_dim = query.shape[1:]
        keys, values = layer.keys, layer.values
        return (
            query.device.type == "cpu"
            and query_len == 1
            and keys.bits in LATENT_BITS
            and values.bits in LATENT_BITS
            and (keys.bits is None) == (values.bits is None)
            and _readable(keys)
            and _readable(values)
            and keys.dtype in LATENT_DTYPES
            and values.dtype == keys.dtype
            and head_dim in HEAD_DIMS
            and num_heads // state.num_kv_heads <= MAX_QUERY_HEADS_PER_KV_HEAD
            and values.rank <= MAX_VALUE_RANK
            and available()
        )

    def attend(self, query, layer, state, rope, *, scaling, attention_mask):
        out, lse = decode_latents(
            query[:, :, 0], layer, state, rope.factors, scaling, self._valid(query, layer, attention_mask)
        )
        return out[:, None], lse[..., None]

    def attend_with_exact(self, query, layer, state, rope, exact, *, scaling, attention_mask):
        # The window and the sinks are scored in the kernel's own softmax: a step makes one call, not the ~40 small
        # ops of `attend_window`.
        if exact is None or exact.keys.dtype != layer.keys.dtype:
            return super().attend_with_exact(
                query, layer, state, rope, exact, scaling=scaling, attention_mask=attention_mask
            )
        total = layer.get_seq_length()
        allowed = exact_mask(attention_mask, 1, total, exact, layer.window, layer.sink_flags(exact.index))
        out, exact_out, _ = decode_with_exact(
            query[:, :, 0],
            layer,
            state,
            rope.factors,
            scaling,
            exact,
            rope.at(exact.index),
            allowed[:, 0, 0],
            self._valid(query, layer, attention_mask),
        )
        return LatentAttentionOutput(out[:, None], exact_out[:, None])

    @staticmethod
    def _valid(query: torch.Tensor, layer: SVDCacheLayer, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        valid = valid_latent_tokens(attention_mask, layer)
        return None if valid is None else valid.expand(query.shape[0], -1)
