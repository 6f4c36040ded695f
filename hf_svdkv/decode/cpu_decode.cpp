// One decoding step (one query token) of attention over an SVDCacheLayer, fused, for the CPU.
// Built and loaded by cpu_decode.py; see its docstring for the layout of every argument.
//
// Per block of cached tokens of one KV head, in registers: rebuild the head's keys from their latents (c @ up +
// center, four tokens at a time so each row of the up projection is loaded once for all four), rotate them at their
// positions, score them against the query heads that read this KV head, and fold the block into an online softmax
// over the *value latents*. Nothing full-size is written to memory: per token the kernel reads key_rank + value_rank
// latent numbers and its cos/sin.
//
// Work is split over (batch row, span of tokens, KV head) for OpenMP; each span writes a partial (max, sum,
// unnormalised output) per query head, and a second loop merges the spans (flash-decoding), together with the exact
// copies of the window and the sinks (a few hundred tokens at most, scored there), into one softmax.
//
// On CPUs with AMX (Intel Sapphire Rapids and later) bfloat16 latents are rebuilt by the tile unit instead: a block's
// latents times the up projection split in two bfloat16 parts (hi + lo, together float32 to 2^-17), accumulated in
// float32, so the keys agree with the vector path to float32 rounding while the rebuild's multiply-adds leave the
// vector units (the kernel 1.4-1.9x faster on the default model's geometry at 8k tokens).
//
// Integer latents are dequantized a span at a time into the latents the torch path reads (QuantizedTensor.dequantize:
// code * scale + zero in float32, rounded to bfloat16 for a bfloat16 model), which the span then reads as it reads
// float latents (AMX tiles included). A thread takes the KV heads of a group in turn, so they share one
// dequantization (joint bases: every KV head of the group reads the same latents). A latent row is one segment of
// 8- or 4-bit codes (uniform latents) or several, each a run of channels at its own width of 8, 4, 2 or 1 bits
// (mixed-precision latents, MixedLatentStore), each packed from a byte boundary with its own scales and zero points.

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define HF_SVDKV_TILES 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int kBlock = 32;     // tokens scored before one online-softmax update
constexpr int kUnroll = 4;     // tokens rebuilt together
constexpr int kMaxPerKv = 32;  // query heads per KV head (GQA ratio) this kernel handles
constexpr int kMaxRank = 512;  // value rank this kernel handles
constexpr int kTileRank = 32;  // latent dimensions per tile step: one 64-byte tile row of bfloat16
constexpr int kTileSize = 512;  // bfloat16 numbers in one up-projection tile: 16 rows of 16 (rank pair, column) cells

inline int64_t padded(int64_t n) { return (n + 15) / 16 * 16; }  // to whole vectors of 16 floats

// 16 floats: one AVX-512 register (a GCC/Clang vector extension; other ISAs split it).
typedef float Vec __attribute__((vector_size(64)));
typedef float UnalignedVec __attribute__((vector_size(64), aligned(4)));
typedef uint16_t Bf16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef int32_t I32x16 __attribute__((vector_size(64)));
typedef uint8_t U8x2 __attribute__((vector_size(2), aligned(1)));
typedef uint8_t U8x4 __attribute__((vector_size(4), aligned(1)));
typedef uint8_t U8x8 __attribute__((vector_size(8), aligned(1)));
typedef uint8_t U8x16 __attribute__((vector_size(16), aligned(1)));

inline Vec load(const float* p) { return *reinterpret_cast<const UnalignedVec*>(p); }
inline Vec load(const uint16_t* p) {  // 16 bfloat16 -> float32: the bits are the top half of a float's
  const U32x16 bits = __builtin_convertvector(*reinterpret_cast<const Bf16x16*>(p), U32x16) << 16;
  return (Vec)bits;  // a bit cast between vector types of one size
}
inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float out;
  memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float hsum(Vec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);  // Vec and __m512 are the same GCC vector type
#else
  float total = 0.0f;
  for (int x = 0; x < 16; ++x) total += v[x];
  return total;
#endif
}

// The four sums of four vectors' lanes, into out[0..3]: one reduction tree for all four instead of four.
inline void hsum4(const Vec d[4], float* out) {
  // Pairs of vectors interleaved and added: every 4-lane group then holds partial sums of d0, d1, d2, d3 in turn.
  const Vec a = __builtin_shufflevector(d[0], d[1], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29) +
                __builtin_shufflevector(d[0], d[1], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
  const Vec b = __builtin_shufflevector(d[2], d[3], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29) +
                __builtin_shufflevector(d[2], d[3], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
  // a: (d0, d1, d0, d1) per 4-lane group; b: (d2, d3, d2, d3). Combine into (d0, d1, d2, d3) per group.
  Vec c = __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
          __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  c += __builtin_shufflevector(c, c, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  c += __builtin_shufflevector(c, c, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  for (int i = 0; i < 4; ++i) out[i] = c[i];
}

// A latent row as float32, into `out` (n values).
template <typename T>
inline void row_to_float(const T* row, int64_t n, float* out) {
  int64_t x = 0;
  for (; x + 16 <= n; x += 16) *reinterpret_cast<UnalignedVec*>(out + x) = load(row + x);
  for (; x < n; ++x) out[x] = to_float(row[x]);
}

// A float16 scale or zero point as float32 (exact). F16C converts float16 subnormals whatever the denormals-are-zero
// flag the kernel runs with; without it, integer arithmetic (the usual bit trick would go through float32 denormals).
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, magnitude = h & 0x7fff;
  if (magnitude < 0x0400) {  // zero or subnormal: a whole number of 2^-24, a normal float32
    const float x = static_cast<float>(magnitude) * 0x1p-24f;
    return sign ? -x : x;
  }
  // Exponent rebiased from 15 to 127; infinities and NaNs keep an all-ones exponent.
  const uint32_t bits = sign | ((magnitude << 13) + (magnitude >= 0x7c00 ? 0x70000000u : 0x38000000u));
  float out;
  memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

// Dequantized latents stored as float32, or as bfloat16 rounded to nearest, ties to even (as torch rounds).
inline void store(float* p, Vec v) { *reinterpret_cast<UnalignedVec*>(p) = v; }
inline void store(float* p, float v) { *p = v; }
inline Bf16x16 to_bf16(Vec v) {
  const U32x16 bits = (U32x16)v;
  return __builtin_convertvector((bits + 0x7fff + ((bits >> 16) & 1)) >> 16, Bf16x16);
}
inline void store(uint16_t* p, Vec v) { *reinterpret_cast<Bf16x16*>(p) = to_bf16(v); }
inline void store(uint16_t* p, float v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  *p = static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// The first n < 16 bytes at src into dst[16], zero-padded; the first n lanes of v stored at p. Masked vector moves
// where the CPU has them (memcpy would be two library calls per tail of every token).
inline void load_partial(uint8_t* dst, const uint8_t* src, int64_t n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  _mm_store_si128(reinterpret_cast<__m128i*>(dst), _mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1), src));
#else
  memset(dst, 0, 16);
  memcpy(dst, src, n);
#endif
}
inline void store_partial(float* p, Vec v, int64_t n) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)v);
#else
  for (int64_t x = 0; x < n; ++x) p[x] = v[x];
#endif
}
inline void store_partial(uint16_t* p, Vec v, int64_t n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  _mm256_mask_storeu_epi16(p, (__mmask16)((1u << n) - 1), (__m256i)to_bf16(v));
#else
  const Bf16x16 rounded = to_bf16(v);
  for (int64_t x = 0; x < n; ++x) p[x] = rounded[x];
#endif
}

// 16 bytes as int32 lanes (GCC widens a byte vector one lane at a time).
inline I32x16 widen(U8x16 bytes) {
#if defined(__AVX512F__)
  return (I32x16)_mm512_cvtepu8_epi32((__m128i)bytes);
#else
  return __builtin_convertvector(bytes, I32x16);
#endif
}

// 16 codes of a row from channel x as float32; x is a multiple of 16, so the codes start on a byte. A `Bits`-bit code
// of channel c is bits [c * Bits % 8, + Bits) of byte c * Bits / 8 (the first code in the lowest bits).
template <int Bits>
inline Vec codes16(const uint8_t* row, int64_t x) {
  if constexpr (Bits == 8) return __builtin_convertvector(widen(*reinterpret_cast<const U8x16*>(row + x)), Vec);
  if constexpr (Bits == 4) {  // byte i in lanes 2i, 2i + 1, shifted by 0 and 4
    const U8x8 packed = *reinterpret_cast<const U8x8*>(row + x / 2);
    const U8x16 spread = __builtin_shufflevector(packed, packed, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const I32x16 shift = {0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4};
    return __builtin_convertvector((widen(spread) >> shift) & 15, Vec);
  }
  if constexpr (Bits == 2) {  // byte i in lanes 4i .. 4i + 3
    const U8x4 packed = *reinterpret_cast<const U8x4*>(row + x / 4);
    const U8x16 spread = __builtin_shufflevector(packed, packed, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const I32x16 shift = {0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6};
    return __builtin_convertvector((widen(spread) >> shift) & 3, Vec);
  }
  const U8x2 packed = *reinterpret_cast<const U8x2*>(row + x / 8);  // 1 bit: byte i in lanes 8i .. 8i + 7
  const U8x16 spread = __builtin_shufflevector(packed, packed, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const I32x16 shift = {0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7};
  return __builtin_convertvector((widen(spread) >> shift) & 1, Vec);
}

constexpr int kMaxSegments = 8;

// A run of channels of integer latents at one width: codes [B, groups, n, ceil(width * bits / 8)] with float16 scales
// and zero points [B, groups, n, ceil(width / group)] that share one set of strides; zero null for centred codes (a
// zero point of -(2^bits - 1) / 2 * scale). Strides in elements: batch, group, token.
struct Segment {
  const uint8_t* data; const uint16_t* scale; const uint16_t* zero;
  int64_t bits, width;
  int64_t stride[3], scale_stride[3];
};

// One kind of latents (keys or values) as stored, [B, groups, n, rank]: numbers of the latent dtype at `data`
// (segments 0), or integer codes in `segments` runs of channels, in channel order, quantized in groups of `group`.
struct Latents {
  const void* data;
  int64_t stride[3];
  int64_t group, segments;
  Segment segment[kMaxSegments];
};

// Latent rows of dtype T (float32, or bfloat16 as uint16_t): token t's at base + (t - first) * stride.
template <typename T>
struct Rows {
  const T* base;
  int64_t stride, first;
  const T* row(int64_t t) const { return base + (t - first) * stride; }
};

// A batch row and group of stored latents.
template <typename T>
Rows<T> stored_rows(const Latents& l, int64_t b, int64_t g) {
  return {static_cast<const T*>(l.data) + b * l.stride[0] + g * l.stride[1], l.stride[2], 0};
}

// Dequantized numbers about to be stored as Out: rounded to the precision of T first when Out is float32 (bfloat16
// as uint16_t: to nearest, ties to even); `store` rounds them itself when Out is T.
template <typename T, typename Out>
inline Vec rounded_as(Vec v) {
  if constexpr (std::is_same_v<Out, float> && std::is_same_v<T, uint16_t>)
    return (Vec)(__builtin_convertvector(to_bf16(v), U32x16) << 16);
  return v;
}

// Tokens [begin, end) of one segment of integer latents (codes at `data`, scales and zero points from `scales`) as
// latents of dtype T, into out (a row every `stride` numbers), dequantized as the torch path reads them: code * scale
// + zero in float32 (the product is exact, so a fused multiply-add rounds the same), then rounded as T and stored as
// Out (T, or float32). One loop per width: no branch on the width per vector of channels.
template <int Bits, typename T, typename Out>
void dequantize_segment(const Segment& seg, const uint8_t* data, int64_t scales, int64_t group_size, int64_t begin,
                        int64_t end, Out* out, int64_t stride) {
  for (int64_t t = begin; t < end; ++t, out += stride) {
    const uint8_t* codes = data + t * seg.stride[2];
    const uint16_t* scale = seg.scale + scales + t * seg.scale_stride[2];
    const uint16_t* zero = seg.zero ? seg.zero + scales + t * seg.scale_stride[2] : nullptr;
    for (int64_t group = 0, x = 0; x < seg.width; ++group) {
      // A centred code's offset is exact in float32 (8 + 11 significant bits at most), as in the torch path.
      const float step = half_to_float(scale[group]);
      const float offset = zero ? half_to_float(zero[group]) : step * (-static_cast<float>((1 << Bits) - 1) / 2);
      const int64_t group_end = std::min(seg.width, x + group_size);
      for (; x + 16 <= group_end; x += 16) store(out + x, rounded_as<T, Out>(codes16<Bits>(codes, x) * step + offset));
      if (x < group_end) {  // fewer than 16 channels left, from a byte: still one vector
        const int64_t left = group_end - x;
        alignas(16) uint8_t tail_codes[16];
        load_partial(tail_codes, codes + x * Bits / 8, (left * Bits + 7) / 8);
        store_partial(out + x, rounded_as<T, Out>(codes16<Bits>(tail_codes, 0) * step + offset), left);
        x = group_end;
      }
    }
  }
}

// Integer latents of one span, batch row and group as latents of dtype T (`dequantize_segment`), kept for the next KV
// head of the group. Out = T: rows of `rank` numbers (keys, for the rebuild); Out = float: T's numbers as float32 in
// rows padded with zeros to whole vectors (values, read in place by every KV head of the group).
template <typename T, typename Out>
struct Dequantized {
  std::vector<Out> rows;              // [span][stride]
  int64_t held[3] = {-1, -1, -1};     // batch row, group, span

  // Not inlined: one copy serves every head size (inlined into each, it doubled the build time).
  __attribute__((noinline)) Rows<Out> read(const Latents& l, int64_t rank, int64_t span, int64_t n, int64_t b,
                                           int64_t g, int64_t s) {
    const int64_t begin = s * span, end = std::min(n, begin + span);
    const int64_t stride = std::is_same_v<Out, T> ? rank : padded(rank);
    if (held[0] == b && held[1] == g && held[2] == s) return {rows.data(), stride, begin};
    held[0] = b, held[1] = g, held[2] = s;
    if (static_cast<int64_t>(rows.size()) != span * stride) rows.assign(span * stride, Out{});  // zero padding
    for (int64_t i = 0, first = 0; i < l.segments; first += l.segment[i].width, ++i) {
      const Segment& seg = l.segment[i];
      const uint8_t* data = seg.data + b * seg.stride[0] + g * seg.stride[1];
      const int64_t scales = b * seg.scale_stride[0] + g * seg.scale_stride[1];
      Out* out = rows.data() + first;
      switch (seg.bits) {
        case 8: dequantize_segment<8, T>(seg, data, scales, l.group, begin, end, out, stride); break;
        case 4: dequantize_segment<4, T>(seg, data, scales, l.group, begin, end, out, stride); break;
        case 2: dequantize_segment<2, T>(seg, data, scales, l.group, begin, end, out, stride); break;
        default: dequantize_segment<1, T>(seg, data, scales, l.group, begin, end, out, stride); break;
      }
    }
    return {rows.data(), stride, begin};
  }
};

// The exact copies of tokens (window, sinks), scored in the same softmax as the latents; count 0 when there are none.
struct Exact {
  const void* keys;     // [B, kv heads, count, D] before RoPE, rotate-half layout, of the latents' dtype
  const void* values;   // [B, kv heads, count, D]
  const float* rope;    // [B, count, D/2, 2]: cos, sin of each copy's position
  const uint8_t* valid;  // [B, count] or null: which copies the query reads
  const float* value_center;  // [kv heads, D]: subtracted from exact values (the latents' bias holds it)
  float* out;                 // [B, kv heads, per_kv, D]: the output over exact values minus their center
  int64_t count;
};

struct Args {
  Latents keys, values;                   // [B, key groups, n, rk] / [B, value groups, n, rv]
  const float* up;                        // [key groups, rk, width] float32, each head's RoPE pairs interleaved
  const uint16_t* up_tiles;               // AMX only: [key groups, rank_pad / 32, width / 16, hi|lo, 16, 16, 2]
  const float* bias;                      // [key groups, width] (the key center) or null
  const float* rope;                      // [B, n_rope, D/2, 2]: cos, sin of each token's position
  const float* query;                     // [B, kv heads, per_kv, D] after RoPE, rotate-half layout, unscaled
  const uint8_t* valid;                   // [B, valid_stride] or null
  float* part_max; float* part_sum; float* part_acc;  // [B, kv heads, spans, per_kv (, rv)]
  float* out_max; float* out_sum; float* out;         // [B, kv heads, per_kv (, rv)]
  int64_t batch, n, kv_heads, per_kv, heads_per_key_group, heads_per_value_group, rk, rv, width, span, rank_pad;
  int64_t rope_stride, valid_stride;
  float scaling;
  Exact exact;
};

// Keys of kUnroll tokens (before RoPE) from their float32 latent rows, added to k (which starts at the center).
template <int D>
inline void rebuild(const float* const rows[kUnroll], const float* up, int64_t rk, int64_t width, Vec k[kUnroll][D / 16]) {
  constexpr int V = D / 16;
  for (int64_t r = 0; r < rk; ++r) {
    Vec w[V];
    for (int v = 0; v < V; ++v) w[v] = load(up + r * width + 16 * v);
    for (int i = 0; i < kUnroll; ++i) {
      const float c = rows[i][r];
      for (int v = 0; v < V; ++v) k[i][v] += c * w[v];
    }
  }
}

#if HF_SVDKV_TILES
struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// Every tile 16 rows of 64 bytes: 0-3 accumulate keys (16 tokens x 16 columns, float32), 4-5 hold latents (16 tokens
// x 32 ranks), 6-7 up-projection tiles (16 rank pairs x 16 columns x 2): see rebuild_tiles.
void load_tile_config() {
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  _tile_loadconfig(&config);
}

// Keys (before RoPE, without the center) of a block's tokens into keys [kBlock][D]: latents (kBlock rows of
// rank_pad bfloat16, `stride` numbers apart) times the up-projection tiles of the head's D / 16 column tiles from
// col_tile0. Two column tiles at a time for both halves of the block: tiles 0-3 accumulate (half, column), 4 and 5
// hold the halves' latents, 6 and 7 the up projection, each loaded tile read by two products (a tile load, not the
// product, is what a step waits for). hi parts first, then lo: an accumulator's two products are four apart.
template <int D>
void rebuild_tiles(const uint16_t* latents, int64_t stride, int64_t rank_pad, const uint16_t* up_tiles,
                   int64_t col_tile0, int64_t width_tiles, float* keys) {
  static_assert(kBlock == 32, "two halves of 16 tokens");
  constexpr int C = D / 16;
  for (int c0 = 0; c0 < C; c0 += 2) {
    const bool pair = c0 + 1 < C;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < rank_pad / kTileRank; ++k) {
      _tile_loadd(4, latents + k * kTileRank, stride * 2);
      _tile_loadd(5, latents + 16 * stride + k * kTileRank, stride * 2);
      const uint16_t* tiles = up_tiles + (k * width_tiles + col_tile0 + c0) * 2 * kTileSize;  // [column][hi|lo]
      for (int part = 0; part < 2; ++part) {  // hi, lo
        _tile_loadd(6, tiles + part * kTileSize, 64);
        if (pair) _tile_loadd(7, tiles + (2 + part) * kTileSize, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (pair) {
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
    }
    float* out = keys + c0 * 16;
    _tile_stored(0, out, D * 4);
    _tile_stored(1, out + 16 * D, D * 4);
    if (pair) {
      _tile_stored(2, out + 16, D * 4);
      _tile_stored(3, out + 16 * D + 16, D * 4);
    }
  }
}
#endif

// T: the key latents' dtype as read; TV: the value latents' (T, or float32 for dequantized integer latents).
template <int D, typename T, typename TV, bool Tiles>
void span_kernel(const Args& a, const Rows<T>& keys, const Rows<TV>& values, int64_t b, int64_t h, int64_t s,
                 float* scratch) {
  constexpr int V = D / 16;
  const int64_t per_kv = a.per_kv, rk = a.rk, rv = a.rv, rv_pad = padded(rv);
  const int64_t key_group = h / a.heads_per_key_group, column = (h % a.heads_per_key_group) * D;
  const float* up = a.up + key_group * rk * a.width + column;
  const float* bias = a.bias ? a.bias + key_group * a.width + column : nullptr;
  const float* rope = a.rope + b * a.rope_stride;
  const uint8_t* valid = a.valid ? a.valid + b * a.valid_stride : nullptr;

  // Queries scaled and laid out as the keys: RoPE pairs (x_i, x_{i + D/2}) interleaved.
  Vec query[kMaxPerKv][V];
  for (int64_t j = 0; j < per_kv; ++j) {
    const float* q = a.query + ((b * a.kv_heads + h) * per_kv + j) * D;
    for (int v = 0; v < V; ++v)
      for (int x = 0; x < 16; ++x) query[j][v][x] = a.scaling * q[(16 * v + x) / 2 + (x % 2) * (D / 2)];
  }
  Vec center[V];
  for (int v = 0; v < V; ++v) center[v] = bias ? load(bias + 16 * v) : Vec{};
  Vec sign;  // lanes 2i and 2i+1 hold one RoPE pair (x, y): rotated = (x c - y s, x s + y c)
  for (int x = 0; x < 16; ++x) sign[x] = x % 2 ? 1.0f : -1.0f;

  float running_max[kMaxPerKv], running_sum[kMaxPerKv];
  for (int64_t j = 0; j < per_kv; ++j) { running_max[j] = -3.0e38f; running_sum[j] = 0.0f; }
  // Value latents and outputs padded to whole vectors with zero channels: no scalar tail in the per-token loop.
  float* acc = scratch;                 // [per_kv][rv_pad]
  float* rows = acc + per_kv * rv_pad;  // [kBlock][rk]: the block's key latents as float32
  float* zero_row = rows + kBlock * rk;  // [rk]: stands for the tokens past the end of the span
  float* value_rows = zero_row + rk;     // [kBlock][rv_pad]: the block's value latents as float32
  float* tile_keys = value_rows + kBlock * rv_pad;  // Tiles: [kBlock][D] rebuilt keys
  uint16_t* tile_latents = reinterpret_cast<uint16_t*>(tile_keys + kBlock * D);  // Tiles: [kBlock][rank_pad], 0-padded
  if (Tiles) memset(tile_latents, 0, kBlock * a.rank_pad * sizeof(uint16_t));
  for (int64_t x = 0; x < per_kv * rv_pad; ++x) acc[x] = 0.0f;
  for (int64_t x = 0; x < kBlock * rv_pad; ++x) value_rows[x] = 0.0f;
  for (int64_t x = 0; x < rk; ++x) zero_row[x] = 0.0f;
  alignas(64) float scores[kMaxPerKv][kBlock];
  alignas(64) float probs[kMaxPerKv][kBlock];

  const int64_t begin = s * a.span, end = std::min(a.n, begin + a.span);
  for (int64_t t0 = begin; t0 < end; t0 += kBlock) {
    const int64_t count = std::min<int64_t>(kBlock, end - t0);
#if HF_SVDKV_TILES
    if (Tiles) {
      // Whole blocks of whole tile steps are read in place; a partial block or rank goes through a zero-padded copy.
      const uint16_t* block = reinterpret_cast<const uint16_t*>(keys.row(t0));
      int64_t stride = keys.stride;
      if (count < kBlock || rk != a.rank_pad) {
        for (int64_t t = 0; t < count; ++t) memcpy(tile_latents + t * a.rank_pad, keys.row(t0 + t), rk * sizeof(T));
        for (int64_t t = count; t < kBlock; ++t) memset(tile_latents + t * a.rank_pad, 0, rk * sizeof(T));
        block = tile_latents;
        stride = a.rank_pad;
      }
      const int64_t group_tiles = (a.rank_pad / kTileRank) * (a.width / 16) * 2 * kTileSize;
      rebuild_tiles<D>(block, stride, a.rank_pad, a.up_tiles + key_group * group_tiles, column / 16, a.width / 16, tile_keys);
    }
#endif
    if (!Tiles && sizeof(T) != sizeof(float))
      for (int64_t t = 0; t < count; ++t) row_to_float(keys.row(t0 + t), rk, rows + t * rk);
    for (int64_t u = 0; u < count; u += kUnroll) {
      Vec k[kUnroll][V];
      if (Tiles) {
        for (int i = 0; i < kUnroll; ++i)
          for (int v = 0; v < V; ++v) k[i][v] = center[v] + load(tile_keys + (u + i) * D + 16 * v);
      } else {
        const float* latent_rows[kUnroll];
        for (int i = 0; i < kUnroll; ++i)
          latent_rows[i] = u + i >= count          ? zero_row
                           : sizeof(T) == sizeof(float) ? reinterpret_cast<const float*>(keys.row(t0 + u + i))
                                                        : rows + (u + i) * rk;
        for (int i = 0; i < kUnroll; ++i)
          for (int v = 0; v < V; ++v) k[i][v] = center[v];
        rebuild<D>(latent_rows, up, rk, a.width, k);
      }
      Vec rotated[kUnroll][V];
      for (int i = 0; i < kUnroll; ++i) {
        if (u + i >= count) {  // past the block: no cos/sin to read; its scores are never used
          for (int v = 0; v < V; ++v) rotated[i][v] = Vec{};
          continue;
        }
        const float* cos_sin = rope + (t0 + u + i) * D;
        for (int v = 0; v < V; ++v) {
          const Vec pair = load(cos_sin + 16 * v);
          const Vec cos = __builtin_shufflevector(pair, pair, 0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14);
          const Vec sin = __builtin_shufflevector(pair, pair, 1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15);
          const Vec swapped = __builtin_shufflevector(k[i][v], k[i][v], 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
          rotated[i][v] = k[i][v] * cos + swapped * sin * sign;
        }
      }
      for (int64_t j = 0; j < per_kv; ++j) {
        Vec dots[kUnroll];
        for (int i = 0; i < kUnroll; ++i) {
          dots[i] = query[j][0] * rotated[i][0];
          for (int v = 1; v < V; ++v) dots[i] += query[j][v] * rotated[i][v];
        }
        hsum4(dots, scores[j] + u);
      }
    }

    for (int64_t j = 0; j < per_kv; ++j) {
      float* p = probs[j];
      float block_max = -3.0e38f;
      for (int64_t t = 0; t < count; ++t)
        if (!valid || valid[t0 + t]) block_max = std::max(block_max, scores[j][t]);
      if (block_max <= -3.0e38f) {  // every token of the block hidden
        for (int64_t t = 0; t < count; ++t) p[t] = 0.0f;
        continue;
      }
      const float new_max = std::max(running_max[j], block_max);
      const float rescale = expf(running_max[j] - new_max);
      running_sum[j] *= rescale;
      for (int64_t x = 0; x < rv_pad; ++x) acc[j * rv_pad + x] *= rescale;
      for (int64_t t = 0; t < count; ++t) p[t] = expf(scores[j][t] - new_max);
      if (valid)
        for (int64_t t = 0; t < count; ++t) p[t] = valid[t0 + t] ? p[t] : 0.0f;
      running_max[j] = new_max;
      float block_sum = 0.0f;
      for (int64_t t = 0; t < count; ++t) block_sum += p[t];
      running_sum[j] += block_sum;
    }
    // Value latents as float32 rows padded to whole vectors: read in place where they are (dequantized integer
    // latents), else converted once per block. Then each query head's output is accumulated in registers.
    const float* value_block = value_rows;
    int64_t value_stride = rv_pad;
    if constexpr (std::is_same_v<TV, float>) {
      if (values.stride == rv_pad) value_block = values.row(t0);
    }
    if (value_block == value_rows)
      for (int64_t t = 0; t < count; ++t) row_to_float(values.row(t0 + t), rv, value_rows + t * rv_pad);
    // Four vectors of channels at a time: four independent chains of multiply-adds over the block's tokens (one
    // chain waits out each multiply-add's latency).
    for (int64_t j = 0; j < per_kv; ++j) {
      float* out = acc + j * rv_pad;
      int64_t x = 0;
      for (; x + 64 <= rv_pad; x += 64) {
        Vec sum[4];
        for (int v = 0; v < 4; ++v) sum[v] = load(out + x + 16 * v);
        for (int64_t t = 0; t < count; ++t) {
          const float p = probs[j][t];
          const float* row = value_block + t * value_stride + x;
          for (int v = 0; v < 4; ++v) sum[v] += p * load(row + 16 * v);
        }
        for (int v = 0; v < 4; ++v) *reinterpret_cast<UnalignedVec*>(out + x + 16 * v) = sum[v];
      }
      for (; x < rv_pad; x += 16) {
        Vec sum = load(out + x);
        for (int64_t t = 0; t < count; ++t) sum += probs[j][t] * load(value_block + t * value_stride + x);
        *reinterpret_cast<UnalignedVec*>(out + x) = sum;
      }
    }
  }
  const int64_t spans = (a.n + a.span - 1) / a.span;
  const int64_t base = ((b * a.kv_heads + h) * spans + s) * per_kv;
  for (int64_t j = 0; j < per_kv; ++j) {
    a.part_max[base + j] = running_max[j];
    a.part_sum[base + j] = running_sum[j];
    memcpy(a.part_acc + (base + j) * rv, acc + j * rv_pad, rv * sizeof(float));
  }
}

// Query head j's attention over the exact copies of batch row b and KV head h: its max score and sum of exp(score -
// max) (0 when it reads none of them), and the unnormalised output over exact values minus their center into acc [D].
// A few hundred tokens at most: plain loops, the keys rotated in their rotate-half layout.
template <int D, typename T>
void exact_partial(const Args& a, int64_t b, int64_t h, int64_t j, float* scores, float* acc, float& max_out,
                   float& sum_out) {
  const int64_t n = a.exact.count, row = b * a.kv_heads + h;
  const T* keys = static_cast<const T*>(a.exact.keys) + row * n * D;
  const T* values = static_cast<const T*>(a.exact.values) + row * n * D;
  const float* cos_sin = a.exact.rope + b * n * D;
  const uint8_t* valid = a.exact.valid ? a.exact.valid + b * n : nullptr;
  const float* center = a.exact.value_center + h * D;
  float query[D];
  for (int x = 0; x < D; ++x) query[x] = a.scaling * a.query[(row * a.per_kv + j) * D + x];
  float best = -3.0e38f;
  for (int64_t t = 0; t < n; ++t) {
    if (valid && !valid[t]) continue;
    const T* k = keys + t * D;
    const float* rope = cos_sin + t * D;
    float score = 0.0f;
    for (int i = 0; i < D / 2; ++i) {
      const float x = to_float(k[i]), y = to_float(k[i + D / 2]), c = rope[2 * i], s = rope[2 * i + 1];
      score += query[i] * (x * c - y * s) + query[i + D / 2] * (x * s + y * c);
    }
    scores[t] = score;
    best = std::max(best, score);
  }
  for (int x = 0; x < D; ++x) acc[x] = 0.0f;
  float total = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    if (valid && !valid[t]) continue;
    const float p = expf(scores[t] - best);
    total += p;
    const T* v = values + t * D;
    for (int x = 0; x < D; ++x) acc[x] += p * (to_float(v[x]) - center[x]);
  }
  max_out = best;
  sum_out = total;
}

// One softmax over every span's partial (and the exact copies'), per query head of batch row b and KV head h.
template <int D, typename T>
void merge_spans(const Args& a, int64_t b, int64_t h, std::vector<float>& scratch) {
  const int64_t spans = (a.n + a.span - 1) / a.span, per_kv = a.per_kv, rv = a.rv;
  scratch.resize(a.exact.count + D);
  float* exact_scores = scratch.data();
  float* exact_acc = exact_scores + a.exact.count;
  for (int64_t j = 0; j < per_kv; ++j) {
    const int64_t head = (b * a.kv_heads + h) * per_kv + j;
    float exact_max = -3.0e38f, exact_sum = 0.0f;
    if (a.exact.count) exact_partial<D, T>(a, b, h, j, exact_scores, exact_acc, exact_max, exact_sum);
    float best = exact_sum > 0.0f ? exact_max : -3.0e38f;
    for (int64_t s = 0; s < spans; ++s) {
      const int64_t p = ((b * a.kv_heads + h) * spans + s) * per_kv + j;
      if (a.part_sum[p] > 0.0f) best = std::max(best, a.part_max[p]);
    }
    float total = 0.0f;
    float* out = a.out + head * rv;
    for (int64_t x = 0; x < rv; ++x) out[x] = 0.0f;
    for (int64_t s = 0; s < spans; ++s) {
      const int64_t p = ((b * a.kv_heads + h) * spans + s) * per_kv + j;
      if (a.part_sum[p] <= 0.0f) continue;
      const float weight = expf(a.part_max[p] - best);
      total += a.part_sum[p] * weight;
      const float* acc = a.part_acc + p * rv;
      for (int64_t x = 0; x < rv; ++x) out[x] += weight * acc[x];
    }
    float exact_weight = 0.0f;
    if (exact_sum > 0.0f) {
      exact_weight = expf(exact_max - best);
      total += exact_sum * exact_weight;
    }
    if (total > 0.0f) {
      for (int64_t x = 0; x < rv; ++x) out[x] /= total;
      exact_weight /= total;
    }
    if (a.exact.count)
      for (int x = 0; x < D; ++x) a.exact.out[head * D + x] = exact_weight * exact_acc[x];
    a.out_max[head] = best;
    a.out_sum[head] = total;
  }
}

// Tiny attention weights (exp of a very negative score) are denormal floats, and x86 takes a slow microcode path
// for every product with one: flush them to zero while the kernel runs (per thread; restored on exit).
struct DenormalsAreZero {
#if defined(__SSE__)
  const unsigned int saved = _mm_getcsr();
  DenormalsAreZero() { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
  ~DenormalsAreZero() { _mm_setcsr(saved); }
#endif
};

// T: the latents' dtype, or with Quantized the dtype integer latents are read as (the model's).
template <int D, typename T, bool Quantized, bool Tiles>
void run(const Args& a, int threads) {
  const int64_t spans = (a.n + a.span - 1) / a.span;
  const int64_t items = a.batch * a.kv_heads * spans;
  // Integer latents: a thread takes every KV head of a key group and of a value group of a span, in turn, so that
  // they dequantize the group's span once.
  const int64_t chunk = Quantized ? std::lcm(a.heads_per_key_group, a.heads_per_value_group) : 1;
#pragma omp parallel num_threads(threads)
  {
    const DenormalsAreZero denormals_are_zero;
#if HF_SVDKV_TILES
    if (Tiles) load_tile_config();  // per thread
#endif
    std::vector<float> scratch(a.per_kv * padded(a.rv) + (kBlock + 1) * a.rk + kBlock * padded(a.rv) +
                               (Tiles ? kBlock * D + kBlock * a.rank_pad / 2 : 0));
    Dequantized<T, T> keys;
    Dequantized<T, float> values;
#pragma omp for schedule(dynamic, chunk)
    for (int64_t item = 0; item < items; ++item) {
      // The KV heads of one span run one after another: they read the same cos/sin rows, still in cache.
      const int64_t h = item % a.kv_heads, s = (item / a.kv_heads) % spans, b = item / (a.kv_heads * spans);
      const int64_t key_group = h / a.heads_per_key_group, value_group = h / a.heads_per_value_group;
      if constexpr (Quantized)
        span_kernel<D, T, float, Tiles>(a, keys.read(a.keys, a.rk, a.span, a.n, b, key_group, s),
                                 values.read(a.values, a.rv, a.span, a.n, b, value_group, s), b, h, s, scratch.data());
      else
        span_kernel<D, T, T, Tiles>(a, stored_rows<T>(a.keys, b, key_group), stored_rows<T>(a.values, b, value_group), b,
                                 h, s, scratch.data());
    }
#if HF_SVDKV_TILES
    if (Tiles) _tile_release();
#endif
    std::vector<float> merge_scratch;
#pragma omp for
    for (int64_t bh = 0; bh < a.batch * a.kv_heads; ++bh)
      merge_spans<D, T>(a, bh / a.kv_heads, bh % a.kv_heads, merge_scratch);
  }
}

template <typename T, bool Quantized, bool Tiles>
int dispatch(const Args& a, int64_t head_dim, int threads) {
  switch (head_dim) {
    case 32: run<32, T, Quantized, Tiles>(a, threads); return 0;
    case 64: run<64, T, Quantized, Tiles>(a, threads); return 0;
    case 80: run<80, T, Quantized, Tiles>(a, threads); return 0;
    case 96: run<96, T, Quantized, Tiles>(a, threads); return 0;
    case 128: run<128, T, Quantized, Tiles>(a, threads); return 0;
    case 256: run<256, T, Quantized, Tiles>(a, threads); return 0;
    default: return 1;
  }
}

// dtype: 0 float32, 1 bfloat16 (AMX tiles where the up projection's were given).
template <bool Quantized>
int dispatch(const Args& a, int64_t head_dim, int dtype, int threads) {
  if (dtype != 1) return dispatch<float, Quantized, false>(a, head_dim, threads);
#if HF_SVDKV_TILES
  if (a.up_tiles) return dispatch<uint16_t, Quantized, true>(a, head_dim, threads);
#endif
  return dispatch<uint16_t, Quantized, false>(a, head_dim, threads);
}

}  // namespace

extern "C" {

// Whether bfloat16 latents can be rebuilt with AMX tiles: compiled for a CPU with AMX, and the OS lets this process
// use the tile registers (Linux asks for them once, with arch_prctl). 1 yes, 0 no.
int hf_svdkv_tiles_available() {
#if HF_SVDKV_TILES
  constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0 ? 1 : 0;
#else
  return 0;
#endif
}

// keys, values: both latents of `dtype` (segments 0) or both integer codes read as `dtype` (the model's): 0 float32,
// 1 bfloat16. up_tiles: null, or (read as bfloat16, after hf_svdkv_tiles_available() said 1) the up projection as
// AMX tiles over rank_pad ranks. exact: null, or the exact copies of tokens, merged into the same softmax (their keys
// and values of the same `dtype`). Returns 0 on success, 1 for a shape it does not handle.
int hf_svdkv_latent_decode(
    const Latents* keys, const Latents* values, const float* up, const uint16_t* up_tiles, const float* bias,
    const float* rope, const float* query, const uint8_t* valid, float* part_max, float* part_sum, float* part_acc,
    float* out_max, float* out_sum, float* out,
    int64_t batch, int64_t n, int64_t kv_heads, int64_t per_kv, int64_t heads_per_key_group,
    int64_t heads_per_value_group, int64_t rk, int64_t rv, int64_t width, int64_t head_dim, int64_t span,
    int64_t rank_pad, int64_t rope_stride, int64_t valid_stride, float scaling, const Exact* exact, int dtype,
    int threads) {
  if (per_kv > kMaxPerKv || rv > kMaxRank) return 1;
  Args a{*keys, *values, up, up_tiles, bias, rope, query, valid, part_max, part_sum, part_acc, out_max, out_sum, out,
         batch, n, kv_heads, per_kv, heads_per_key_group, heads_per_value_group, rk, rv, width, span, rank_pad,
         rope_stride, valid_stride, scaling, exact ? *exact : Exact{}};
  if (keys->segments > kMaxSegments || values->segments > kMaxSegments) return 1;
  return keys->segments ? dispatch<true>(a, head_dim, dtype, threads) : dispatch<false>(a, head_dim, dtype, threads);
}

}  // extern "C"
