"""One fused Triton kernel for a decoding step (one query token) over an `SVDCacheLayer`'s latents.

Per tile of BLOCK_T cached tokens, in registers: rebuild each KV head's keys from the key latents (c @ up + center),
rotate them at their stored positions (cos/sin computed in the kernel from the rotary module's inv_freq and
attention_scaling; a tile of consecutive positions by angle addition from its first one), score them against every query
head reading that KV head, and fold the tile into an online softmax over the *value latents*. Nothing full-size is ever
written to memory: per token the kernel reads key_rank + value_rank latent numbers and one int32 position, where SDPA
over a full cache reads 2 * kv_heads * d. Integer latents (8- or 4-bit codes, `quantization`) are read as stored, codes
plus a float16 scale and zero point per token and group of channels, and dequantized in registers: a 4-bit cache is read
at a quarter of a 16-bit one's bytes.

Flash-decoding layout: the sequence is split across programs (so one batch row still fills the GPU), each writes a
partial (max, sum, accumulator) per query head, and a second small kernel merges the splits. The output is the attention
over value latents per query head plus its log-sum-exp; `state` projects it up (or folds the value basis into o_proj)
and `window` merges the full-precision window (a few tokens) in torch.

Works on any batch, GQA ratio and head grouping (a program handles the KV heads that share both a key and a value
group), fp16/bf16/fp32 latents or int8/int4 codes (fp32 accumulation), and a per-token validity mask for left padding.
Runs on CPU tensors under TRITON_INTERPRET=1 (slowly), which is how the tests check it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ..latents import LatentStore
from ..svd_cache import SVDCacheLayer
from .base import DecodeBackend, Unsupported
from .rope import Rope, is_dynamic
from .state import LayerState
from .window import valid_latent_tokens

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path (blockwise) serves instead
    triton = None

LOG2E = math.log2(math.e)
_DOT_TYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16} if triton is not None else {}


def available() -> bool:
    """Triton importable and a CUDA device present: the kernel is then used for every single-token step."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _rotation(positions, inv_freq, rope_scale):
        """cos and sin [tokens, HALF] of every position's angles, times the rotary module's attention scaling."""
        angle = positions.to(tl.float32)[:, None] * inv_freq[None, :]
        return tl.cos(angle) * rope_scale, tl.sin(angle) * rope_scale

    @triton.jit
    def _read_latents(LAT, SCALE, ZERO, rows, scale_rows, channels, ok, BITS: tl.constexpr, GROUP: tl.constexpr):
        """A tile's latents [tokens, channels]: as stored (BITS 0), or dequantized from BITS-bit codes exactly as
        `QuantizedTensor.dequantize` does, code * scale + zero in float32. `rows` and `scale_rows` [tokens, 1] are each
        token's offsets into the latents (or codes) and into the scales and zero points; `ok` masks both."""
        if BITS == 0:
            latents = tl.load(LAT + rows + channels[None, :], mask=ok, other=0.0)
        else:
            # Channel c's code is bits [c * BITS % 8, + BITS) of byte c * BITS // 8: 4-bit codes share a byte, low
            # nibble first. Masked channels (an odd rank's padding code, past the rank) get scale and zero 0, so 0.
            bit = channels * BITS
            packed = tl.load(LAT + rows + (bit // 8)[None, :], mask=ok, other=0).to(tl.int32)
            codes = (packed >> (bit % 8)[None, :]) & ((1 << BITS) - 1)
            at = scale_rows + (channels // GROUP)[None, :]
            scale = tl.load(SCALE + at, mask=ok, other=0.0).to(tl.float32)
            zero = tl.load(ZERO + at, mask=ok, other=0.0).to(tl.float32)
            latents = codes.to(tl.float32) * scale + zero
        return latents

    @triton.jit
    def _partial_kernel(
        Q,
        KL,
        KS,
        KZ,
        VL,
        VS,
        VZ,
        KW,
        KB,
        POS,
        VALID,
        INV_FREQ,  # inputs; KS..VZ: integer latents' scales, zeros
        M,
        L,
        ACC,  # per split: running max (log2 units), sum of exponentials, unnormalised output
        sq_b,
        sq_h,
        sk_b,
        sk_g,
        sk_t,
        sks_b,
        sks_g,
        sks_t,
        sv_b,
        sv_g,
        sv_t,
        svs_b,
        svs_g,
        svs_t,
        sw_g,
        sw_n,
        sb_g,
        sp_b,
        sm_b,
        latent_len,
        split_len,
        num_units,
        qk_scale,
        rope_scale,
        U: tl.constexpr,
        HQ: tl.constexpr,
        GK: tl.constexpr,
        GV: tl.constexpr,
        HALF: tl.constexpr,
        HALF_P: tl.constexpr,
        RK: tl.constexpr,
        RKC: tl.constexpr,
        RV: tl.constexpr,
        RV_P: tl.constexpr,
        QP: tl.constexpr,
        BLOCK_T: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_VALID: tl.constexpr,
        DOT: tl.constexpr,
        PRECISION: tl.constexpr,
        ROPE_BY_TILE: tl.constexpr,
        K_BITS: tl.constexpr,
        K_GROUP: tl.constexpr,
        V_BITS: tl.constexpr,
        V_GROUP: tl.constexpr,
    ):
        split = tl.program_id(0)
        unit_id = tl.program_id(1)
        batch = unit_id // num_units
        head0 = (unit_id % num_units) * U  # first KV head of this program's unit
        key_group, slot0, value_group = head0 // GK, head0 % GK, head0 // GV

        freqs = tl.arange(0, HALF_P)
        freq_ok = freqs < HALF
        inv_freq = tl.load(INV_FREQ + freqs, mask=freq_ok, other=0.0)
        rows = tl.arange(0, QP)  # query heads head0 * HQ + row; row // HQ is the KV head within the unit
        rv = tl.arange(0, RV_P)
        rv_ok = rv < RV
        rk = tl.arange(0, RKC)
        offsets = tl.arange(0, BLOCK_T)
        # Rotations by 0..BLOCK_T-1 steps, once per program: a tile of consecutive positions is then rotated by
        # angle addition from its first position, HALF sines and cosines per tile instead of BLOCK_T * HALF (which
        # cost, in special-function throughput, about as much as reading a full-size cache).
        step_cos, step_sin = _rotation(offsets, inv_freq, rope_scale)
        q_ptr = Q + batch * sq_b + (head0 * HQ + rows)[:, None] * sq_h + freqs[None, :]
        q_ok = (rows < U * HQ)[:, None] & freq_ok[None, :]
        q1_unit = tl.load(q_ptr, mask=q_ok, other=0.0).to(tl.float32) * qk_scale
        q2_unit = tl.load(q_ptr + HALF, mask=q_ok, other=0.0).to(tl.float32) * qk_scale

        m_i = tl.full([QP], -1.0e30, tl.float32)  # finite: a fully masked tile must not make inf - inf
        l_i = tl.zeros([QP], tl.float32)
        acc = tl.zeros([QP, RV_P], tl.float32)
        start = split * split_len
        end = tl.minimum(start + split_len, latent_len)
        for t0 in range(start, end, BLOCK_T):
            tokens = t0 + offsets
            token_ok = tokens < end
            positions = tl.load(POS + batch * sp_b + tokens, mask=token_ok, other=0)
            if ROPE_BY_TILE:
                first = tl.load(POS + batch * sp_b + t0)
                if tl.max(tl.abs(tl.where(token_ok, positions - first - offsets, 0)), 0) == 0:
                    first_angle = first.to(tl.float32) * inv_freq
                    first_cos = tl.cos(first_angle)[None, :]
                    first_sin = tl.sin(first_angle)[None, :]
                    cos = first_cos * step_cos - first_sin * step_sin
                    sin = first_sin * step_cos + first_cos * step_sin
                else:  # positions with gaps (left padding, a reordered or cropped cache)
                    cos, sin = _rotation(positions, inv_freq, rope_scale)
            else:
                cos, sin = _rotation(positions, inv_freq, rope_scale)
            key_rows = (batch * sk_b + key_group * sk_g + tokens * sk_t)[:, None]
            key_scale_rows = (batch * sks_b + key_group * sks_g + tokens * sks_t)[:, None]
            scores = tl.zeros([QP, BLOCK_T], tl.float32)
            for u in tl.static_range(U):
                # Interleaved basis columns of KV head (slot0 + u): x1 of frequency f at 2f, x2 at 2f + 1.
                col1 = (slot0 + u) * 2 * HALF + 2 * freqs
                key1 = tl.zeros([BLOCK_T, HALF_P], tl.float32)
                key2 = tl.zeros([BLOCK_T, HALF_P], tl.float32)
                for r0 in tl.static_range(0, RK, RKC):
                    rank_ok = (r0 + rk) < RK
                    latents = _read_latents(
                        KL,
                        KS,
                        KZ,
                        key_rows,
                        key_scale_rows,
                        r0 + rk,
                        token_ok[:, None] & rank_ok[None, :],
                        K_BITS,
                        K_GROUP,
                    ).to(DOT)
                    basis = KW + key_group * sw_g + (r0 + rk)[:, None] + col1[None, :] * sw_n
                    basis_ok = rank_ok[:, None] & freq_ok[None, :]
                    basis1 = tl.load(basis, mask=basis_ok, other=0.0).to(DOT)
                    basis2 = tl.load(basis + sw_n, mask=basis_ok, other=0.0).to(DOT)
                    key1 += tl.dot(latents, basis1, input_precision=PRECISION)
                    key2 += tl.dot(latents, basis2, input_precision=PRECISION)
                if HAS_BIAS:
                    key1 += tl.load(KB + key_group * sb_g + col1, mask=freq_ok, other=0.0).to(tl.float32)[None, :]
                    key2 += tl.load(KB + key_group * sb_g + col1 + 1, mask=freq_ok, other=0.0).to(tl.float32)[None, :]
                rot1 = (key1 * cos - key2 * sin).to(DOT)
                rot2 = (key2 * cos + key1 * sin).to(DOT)
                # Only the rows of query heads reading this KV head take part; the others are 0 and score nothing.
                q_rows = (rows // HQ == u)[:, None]
                q1 = tl.where(q_rows, q1_unit, 0.0).to(DOT)
                q2 = tl.where(q_rows, q2_unit, 0.0).to(DOT)
                scores += tl.dot(q1, tl.trans(rot1), input_precision=PRECISION)
                scores += tl.dot(q2, tl.trans(rot2), input_precision=PRECISION)
            valid = token_ok
            if HAS_VALID:
                valid = valid & (tl.load(VALID + batch * sm_b + tokens, mask=token_ok, other=0) != 0)
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            values = _read_latents(
                VL,
                VS,
                VZ,
                (batch * sv_b + value_group * sv_g + tokens * sv_t)[:, None],
                (batch * svs_b + value_group * svs_g + tokens * svs_t)[:, None],
                rv,
                token_ok[:, None] & rv_ok[None, :],
                V_BITS,
                V_GROUP,
            ).to(DOT)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), values, input_precision=PRECISION)
            m_i = m_new
        partial = unit_id * tl.num_programs(0) + split
        tl.store(M + partial * QP + rows, m_i)
        tl.store(L + partial * QP + rows, l_i)
        tl.store(ACC + (partial * QP + rows[:, None]) * RV_P + rv[None, :], acc)

    @triton.jit
    def _combine_kernel(
        M,
        L,
        ACC,
        OUT,
        LSE,
        num_splits,
        num_units,
        so_b,
        so_h,
        sl_b,
        U: tl.constexpr,
        HQ: tl.constexpr,
        QP: tl.constexpr,
        RV: tl.constexpr,
        RV_P: tl.constexpr,
        SPLITS_P: tl.constexpr,
        SPLIT_CHUNK: tl.constexpr,
    ):
        unit_id = tl.program_id(0)
        row = tl.program_id(1)
        splits = tl.arange(0, SPLITS_P)
        first = unit_id * num_splits
        m = tl.load(M + (first + splits) * QP + row, mask=splits < num_splits, other=float("-inf"))
        sums = tl.load(L + (first + splits) * QP + row, mask=splits < num_splits, other=0.0)
        m_max = tl.max(m, 0)
        total = tl.sum(sums * tl.exp2(m - m_max), 0)
        rv = tl.arange(0, RV_P)
        out = tl.zeros([RV_P], tl.float32)
        for s0 in range(0, num_splits, SPLIT_CHUNK):
            chunk = s0 + tl.arange(0, SPLIT_CHUNK)
            chunk_ok = chunk < num_splits
            weight = tl.exp2(tl.load(M + (first + chunk) * QP + row, mask=chunk_ok, other=float("-inf")) - m_max)
            part = tl.load(
                ACC + ((first + chunk[:, None]) * QP + row) * RV_P + rv[None, :], mask=chunk_ok[:, None], other=0.0
            )
            out += tl.sum(part * weight[:, None], 0)
        seen = total > 0  # False only if the mask hid every latent token from this query
        out = tl.where(seen, out / tl.where(seen, total, 1.0), 0.0)
        batch = unit_id // num_units
        head = (unit_id % num_units) * U * HQ + row
        tl.store(OUT + batch * so_b + head * so_h + rv, out, mask=rv < RV)
        lse = tl.where(seen, (m_max + tl.log2(tl.where(seen, total, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(LSE + batch * sl_b + head, lse)


def _pow2(n: int, least: int = 16) -> int:
    # tl.arange needs powers of two; tl.dot needs every dimension >= 16.
    return max(least, 1 << (max(n, 1) - 1).bit_length())


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _num_splits(latent_len: int, units: int, block_t: int, device: torch.device, programs_per_sm: int) -> int:
    """`programs_per_sm` programs per multiprocessor (several, so that some wait on memory while others compute), each
    with at least one tile of tokens."""
    sms = _multiprocessors(device)
    tiles = triton.cdiv(latent_len, block_t)
    return max(1, min(tiles, triton.cdiv(programs_per_sm * sms, units), 1024))


class _KernelView(NamedTuple):
    """A latent store as the kernel reads it: latents (or codes), scales and zero points with their batch, group and
    token strides, and bits (0 for floating-point latents, whose scale and zero are any pointer, never read)."""

    latents: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    strides: tuple[int, ...]
    bits: int
    group: int


def _kernel_view(store: LatentStore) -> _KernelView:
    stored = store.stored
    if store.bits is None:
        assert stored.stride(-1) == 1
        return _KernelView(stored, stored, stored, (*stored.stride()[:3], 0, 0, 0), 0, 1)
    # One set of strides serves scales and zero points: they grow and are cropped and reordered together.
    assert stored.data.stride(-1) == stored.scale.stride(-1) == 1 and stored.zero.stride() == stored.scale.stride()
    return _KernelView(
        stored.data,
        stored.scale,
        stored.zero,
        (*stored.data.stride()[:3], *stored.scale.stride()[:3]),
        stored.bits,
        stored.group,
    )


def decode_latents(
    query: torch.Tensor,
    layer: SVDCacheLayer,
    state: LayerState,
    inv_freq: torch.Tensor,
    rope_scale: float,
    scaling: float,
    valid: torch.Tensor | None = None,
    block_t: int = 64,
    num_warps: int = 4,
    programs_per_sm: int = 4,
    rope_by_tile: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query [batch, heads, d] (one token, after RoPE) over the layer's stored latent tokens.

    Returns the output over value latents [batch, heads, value_rank] (float32, normalised) and its natural-log
    log-sum-exp [batch, heads] (-inf where `valid` [batch, latent_len] hides every token). The tuning arguments
    exist for scripts/gpu_check.py, which times them; `rope_by_tile=False` computes every token's angles directly."""
    batch, num_heads, head_dim = query.shape
    keys, values = _kernel_view(layer.keys), _kernel_view(layer.values)
    latent_len, key_rank, value_rank = layer.keys.length, layer.keys.rank, layer.values.rank
    num_kv_heads = state.value_center.shape[0]
    per_kv = num_heads // num_kv_heads
    heads_per_key_group = num_kv_heads // state.key_weight.shape[0]
    heads_per_value_group = num_kv_heads // layer.values.shape[1]
    unit = math.gcd(heads_per_key_group, heads_per_value_group)  # KV heads sharing one key and one value group
    num_units = num_kv_heads // unit
    qp, rv_p = _pow2(unit * per_kv), _pow2(value_rank)
    splits = _num_splits(latent_len, batch * num_units, block_t, query.device, programs_per_sm)
    split_len = triton.cdiv(triton.cdiv(latent_len, splits), block_t) * block_t
    splits = triton.cdiv(latent_len, split_len)

    f32 = dict(device=query.device, dtype=torch.float32)
    m = torch.empty((batch * num_units, splits, qp), **f32)
    sums = torch.empty_like(m)
    acc = torch.empty((batch * num_units, splits, qp, rv_p), **f32)
    bias = state.key_bias if state.key_bias is not None else state.key_weight  # any pointer when unused
    mask = valid if valid is not None else layer.positions  # any pointer when unused
    positions = layer.positions
    # Tensor cores take the model's 16-bit type (that of float latents, and that integer latents are dequantized
    # to on the torch path). float32 models (and the CPU interpreter, whose dot cannot read 16-bit floats) use exact
    # float32 products.
    dot_dtype = _DOT_TYPES.get(state.key_weight.dtype, tl.float32) if query.device.type == "cuda" else tl.float32
    assert query.stride(-1) == positions.stride(-1) == 1
    _partial_kernel[(splits, batch * num_units)](
        query,
        keys.latents,
        keys.scale,
        keys.zero,
        values.latents,
        values.scale,
        values.zero,
        state.key_weight,
        bias,
        positions,
        mask,
        inv_freq,
        m,
        sums,
        acc,
        query.stride(0),
        query.stride(1),
        *keys.strides,
        *values.strides,
        state.key_weight.stride(0),
        state.key_weight.stride(1),
        bias.stride(0),
        positions.stride(0),
        mask.stride(0),
        latent_len,
        split_len,
        num_units,
        scaling * LOG2E,
        rope_scale,
        U=unit,
        HQ=per_kv,
        GK=heads_per_key_group,
        GV=heads_per_value_group,
        HALF=head_dim // 2,
        HALF_P=_pow2(head_dim // 2),
        RK=key_rank,
        RKC=min(32, _pow2(key_rank)),
        RV=value_rank,
        RV_P=rv_p,
        QP=qp,
        BLOCK_T=block_t,
        HAS_BIAS=state.key_bias is not None,
        HAS_VALID=valid is not None,
        DOT=dot_dtype,
        PRECISION="ieee" if dot_dtype == tl.float32 else None,
        ROPE_BY_TILE=rope_by_tile,
        K_BITS=keys.bits,
        K_GROUP=keys.group,
        V_BITS=values.bits,
        V_GROUP=values.group,
        num_warps=num_warps,
    )
    out = torch.empty((batch, num_heads, value_rank), **f32)
    lse = torch.empty((batch, num_heads), **f32)
    _combine_kernel[(batch * num_units, unit * per_kv)](
        m,
        sums,
        acc,
        out,
        lse,
        splits,
        num_units,
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        U=unit,
        HQ=per_kv,
        QP=qp,
        RV=value_rank,
        RV_P=rv_p,
        SPLITS_P=_pow2(splits, least=64),
        SPLIT_CHUNK=16,  # few distinct sizes: few compilations
    )
    return out, lse


class TritonBackend(DecodeBackend):
    """Single-token steps on CUDA through the Triton kernel: latents in a floating-point dtype or as 8- or 4-bit codes,
    a rope type whose frequencies do not depend on the length. Ranks whose tiles exceed the GPU's shared memory are
    left to the torch path (remembered per shape)."""

    name = "triton"

    def __init__(self) -> None:
        self.too_large: set[tuple[int, int, int]] = set()  # (key rank, value rank, query heads) that did not fit

    def supports(self, query: torch.Tensor, layer: SVDCacheLayer, state: LayerState, rope: Rope) -> bool:
        shape = (layer.keys.rank, layer.values.rank, query.shape[1])
        return (
            query.device.type == "cuda"
            and query.shape[2] == 1
            and all(store.bits in (None, 8, 4) for store in (layer.keys, layer.values))
            and not is_dynamic(rope.rotary)
            and shape not in self.too_large
            and available()
        )

    def attend(self, query, layer, state, rope, *, scaling, attention_mask):
        from triton.runtime.errors import OutOfResources

        inv_freq = rope.rotary.inv_freq.to(device=query.device, dtype=torch.float32)
        valid = valid_latent_tokens(attention_mask, layer)
        if valid is not None:
            valid = valid.expand(query.shape[0], -1).contiguous()
        try:
            out, lse = decode_latents(
                query[:, :, 0], layer, state, inv_freq, float(rope.rotary.attention_scaling), scaling, valid
            )
        except OutOfResources as error:
            # Large ranks (e.g. full rank) need more shared memory than the kernel's tiles fit on this GPU.
            self.too_large.add((layer.keys.rank, layer.values.rank, query.shape[1]))
            raise Unsupported(str(error)) from error
        return out[:, None], lse[..., None]
