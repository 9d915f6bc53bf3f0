// 8-bit sparse convolution with the exact integer rules of docs/ARITHMETIC.md.
//
// Two integer paths, equal bit for bit (kernels/README.md has the design and the proofs):
//  * AVX2, the vpmaddubsw path (run_u8): activations stay bytes, made unsigned (x, or x + 128 for
//    int8) and padded with the unsigned zero point z_u, so acc = sum x_u * w - z_u * sum w, the
//    second sum folded into the bias. Terms of 2-row sub-blocks are paired, and consecutive pairs
//    grouped, while on every row the positive weights sum to <= 128 and the negative ones to
//    >= -128: since x_u >= 0, every partial sum then lies in [-255 * 128, 255 * 128] = [-32640,
//    32640], so vpmaddubsw cannot saturate and a group's int16 sum cannot wrap; each group is then
//    widened to int32.
//  * The centered int16 path (scalar; AVX2 when some row has 255 * sum |w| >= 2**31): activations
//    centered (x - x_zp) into int16, pairs interleaved (vpunpck[lh]wd) and multiplied by a
//    broadcast int16 weight pair with vpmaddwd into int32. Block kernel 4 x 16, CSR 1 x 16.
//
// Requantization R(acc) = rhe(acc * multiplier / 2**shift). The scalar path computes it in
// int64 exactly as arithmetic.py. The AVX2 path without a fused add works in float32 with an
// exact fallback near rounding ties (epilogue_float_avx2). With a fused add it computes
// t = acc * (multiplier * 2**-shift) in float64: acc and M are exact doubles and the product has relative error <= 2**-53, so for
// |t| < 2**10 the error is < 2**-43 while t is a multiple of 2**-shift; with shift <= 42 the
// error can never move t across (or onto) a rounding boundary k + 1/2, so rounding half-even
// gives exactly R(acc). |t| >= 2**10 saturates any 8-bit output either way. Channels with a
// larger shift use the int64 path. The fused residual add is exact in float64 (all integers
// stay below 2**53 and scaling by 2**-shift is exact). On the vpmaddubsw path the int32 sum
// acc_u + (bias - z_u * sum w) wraps modulo 2**32 in the float32 epilogue; it equals the true
// accumulator, which fits int32 (the reference refuses models where it does not).
#include <immintrin.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "conv_kernels.h"

namespace onnxsparse {

namespace {

constexpr int64_t kChunk = 16;
constexpr int64_t kTileTarget = 896;    // wide pixels per work item, at most
constexpr int64_t kTileBytes = 262144;  // input bytes of one tile (vpmaddubsw path), over all channels
constexpr int64_t kMaxFloatShift = 42;
// The AVX2 epilogues may read this many accumulators past the end of a run. The scratch rows of
// both run functions hold max_tile + 2 chunks, the accumulators starting one chunk in, so at least
// one chunk (16 or 32) follows any run.
constexpr int64_t kTailSlack = 8;
static_assert(kChunk >= kTailSlack, "scratch rows must have room for the epilogue's tail reads");

int64_t shift_round_half_even(int64_t value, int64_t shift) {
    if (shift == 0) return value;
    const int64_t floor = value >> shift;  // arithmetic shift (gcc, C++20 defined)
    const int64_t rest = value & ((int64_t(1) << shift) - 1);
    const int64_t half = int64_t(1) << (shift - 1);
    return floor + (rest > half || (rest == half && (floor & 1)));
}

int64_t clamp(int64_t v, int64_t low, int64_t high) { return v < low ? low : v > high ? high : v; }
int64_t type_low(bool is_signed) { return is_signed ? -128 : 0; }
int64_t type_high(bool is_signed) { return is_signed ? 127 : 255; }

// Per output channel constants of the epilogue.
struct Requant {
    int64_t bias, multiplier, shift, y_zero_point, low, high;
    double real_multiplier;
    const ResidualAdd* add;  // nullable
    bool float_add;          // the fused add may take the float32 path (epilogue_add_float_avx2)
};

template <typename YT>
void epilogue_scalar(const int32_t* acc, YT* y, const YT* residual, const Requant& q, int64_t length) {
    for (int64_t i = 0; i < length; ++i) {
        const int64_t value = static_cast<int64_t>(acc[i]) + q.bias;
        int64_t out = clamp(q.y_zero_point + shift_round_half_even(value * q.multiplier, q.shift), q.low, q.high);
        if (q.add) {
            const int64_t total = (out - q.y_zero_point) * q.add->factor_conv +
                                  (static_cast<int64_t>(residual[i]) - q.add->residual_zero_point) * q.add->factor_residual;
            out = clamp(q.add->out_zero_point + shift_round_half_even(total, q.add->shift), q.low, q.high);
        }
        y[i] = static_cast<YT>(out);
    }
}

// One output pixel (a Gemm row): acc[r] = sum over term pairs (a, b) of (x_a - x_zp) * w_a[r] +
// (x_b - x_zp) * w_b[r], r < stride; a term's code is its input channel.
template <typename XT>
void pixel_scalar(const XT* x, int64_t zero_point, const int64_t* terms, int64_t pairs, const int32_t* weights,
                  int64_t stride, int32_t* acc) {
    for (int64_t r = 0; r < stride; ++r) acc[r] = 0;
    for (int64_t p = 0; p < pairs; ++p) {
        const int32_t a = static_cast<int32_t>(x[terms[2 * p]] - zero_point);
        const int32_t b = static_cast<int32_t>(x[terms[2 * p + 1]] - zero_point);
        for (int64_t r = 0; r < stride; ++r) {
            const int32_t w = weights[p * stride + r];
            acc[r] += a * static_cast<int16_t>(w & 0xFFFF) + b * static_cast<int16_t>(static_cast<uint32_t>(w) >> 16);
        }
    }
}

template <int R>
void chunk_scalar(const int16_t* x, const int64_t* offsets, int64_t pairs, const int32_t* weights, int64_t stride,
                  int32_t* out, int64_t out_stride) {
    int32_t acc[R][kChunk] = {};
    for (int64_t p = 0; p < pairs; ++p) {
        const int16_t* first = x + offsets[2 * p];
        const int16_t* second = x + offsets[2 * p + 1];
        for (int r = 0; r < R; ++r) {
            const uint32_t pair = static_cast<uint32_t>(weights[p * stride + r]);
            const int32_t w0 = static_cast<int16_t>(pair & 0xFFFF), w1 = static_cast<int16_t>(pair >> 16);
            for (int64_t i = 0; i < kChunk; ++i) acc[r][i] += first[i] * w0 + second[i] * w1;
        }
    }
    for (int r = 0; r < R; ++r)
        for (int64_t i = 0; i < kChunk; ++i) out[r * out_stride + i] = acc[r][i];
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// Accumulators are named variables: gcc spills arrays of __m256i to the stack on every iteration.
#define ONNXSPARSE_MADD(acc, x, w) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(x, w))

inline void store_pixels16(int32_t* out, __m256i low, __m256i high) {
    // low holds pixels 0-3 and 8-11, high 4-7 and 12-15
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(low, high, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), _mm256_permute2x128_si256(low, high, 0x31));
}

void chunk4_avx2(const int16_t* x, const int64_t* offsets, int64_t pairs, const int32_t* weights, int64_t stride,
                 int32_t* out, int64_t out_stride) {
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    for (int64_t p = 0; p < pairs; ++p) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offsets[2 * p]));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offsets[2 * p + 1]));
        // (first, second) int16 pairs of pixels 0-3 and 8-11 | 4-7 and 12-15
        const __m256i low = _mm256_unpacklo_epi16(a, b), high = _mm256_unpackhi_epi16(a, b);
        const int32_t* w = weights + p * stride;
        __m256i wr = _mm256_set1_epi32(w[0]);
        ONNXSPARSE_MADD(a00, low, wr);
        ONNXSPARSE_MADD(a01, high, wr);
        wr = _mm256_set1_epi32(w[1]);
        ONNXSPARSE_MADD(a10, low, wr);
        ONNXSPARSE_MADD(a11, high, wr);
        wr = _mm256_set1_epi32(w[2]);
        ONNXSPARSE_MADD(a20, low, wr);
        ONNXSPARSE_MADD(a21, high, wr);
        wr = _mm256_set1_epi32(w[3]);
        ONNXSPARSE_MADD(a30, low, wr);
        ONNXSPARSE_MADD(a31, high, wr);
    }
    store_pixels16(out, a00, a01);
    store_pixels16(out + out_stride, a10, a11);
    store_pixels16(out + 2 * out_stride, a20, a21);
    store_pixels16(out + 3 * out_stride, a30, a31);
}

void chunk1_avx2(const int16_t* x, const int64_t* offsets, int64_t pairs, const int32_t* weights, int64_t stride,
                 int32_t* out, int64_t) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0;
    for (int64_t p = 0; p < pairs; ++p) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offsets[2 * p]));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offsets[2 * p + 1]));
        const __m256i wr = _mm256_set1_epi32(weights[p * stride]);
        ONNXSPARSE_MADD(a0, _mm256_unpacklo_epi16(a, b), wr);
        ONNXSPARSE_MADD(a1, _mm256_unpackhi_epi16(a, b), wr);
    }
    store_pixels16(out, a0, a1);
}

#undef ONNXSPARSE_MADD

// ---- vpmaddubsw path (uint8 activations; see kernels/README.md for the bound) ----
// One call computes 32 pixels of 2 rows (or 1 row): the two byte streams of a pair are
// interleaved (vpunpcklbw holds pixels 0-7 | 16-23, vpunpckhbw 8-15 | 24-31), vpmaddubsw against
// the broadcast (w0, w1) bytes gives exact int16 pair sums, which add up in int16 over one group;
// after each group the int16 sums are widened to int32 (even pixels: vpmaddwd with (1, 0); odd
// pixels: arithmetic shift right by 16).
constexpr int64_t kChunkU8 = 32;
static_assert(kChunkU8 >= kTailSlack, "scratch rows must have room for the epilogue's tail reads");

#define ONNXSPARSE_PAIR_STEP(s, wp) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(v, _mm256_set1_epi32(*(wp))))
#define ONNXSPARSE_WIDEN(e, o, s) \
    e = _mm256_add_epi32(e, _mm256_madd_epi16(s, one)); \
    o = _mm256_add_epi32(o, _mm256_srai_epi32(s, 16))

template <int Half>
inline void store_u8_half(int32_t* out, __m256i even, __m256i odd) {
    const __m256i lo = _mm256_unpacklo_epi32(even, odd), hi = _mm256_unpackhi_epi32(even, odd);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * Half), _mm256_permute2x128_si256(lo, hi, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * Half + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
}

template <int Half>
inline __m256i pair_bytes(const uint8_t* x, const int64_t* offsets) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offsets[0]));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offsets[1]));
    return Half ? _mm256_unpackhi_epi8(a, b) : _mm256_unpacklo_epi8(a, b);
}

// 2 rows x 32 pixels (both halves at once): per pair 2 input loads, 2 unpacks, 2 weight broadcasts
// and 4 vpmaddubsw.
__attribute__((noinline)) void rows2_u8(const uint8_t* x, const int64_t* offsets, const int32_t* groups,
                                        int64_t group_count, const int32_t* weights, int32_t* out,
                                        int64_t out_stride) {
    const __m256i one = _mm256_set1_epi32(1);
    __m256i e00 = _mm256_setzero_si256(), o00 = e00, e01 = e00, o01 = e00, e10 = e00, o10 = e00, e11 = e00, o11 = e00;
    for (const int32_t* group_end = groups + group_count; groups != group_end; ++groups) {
        __m256i s00 = _mm256_setzero_si256(), s01 = s00, s10 = s00, s11 = s00;
        for (const int64_t* end = offsets + 2 * *groups; offsets != end; offsets += 2, weights += 2) {
            const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offsets[0]));
            const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offsets[1]));
            const __m256i lo = _mm256_unpacklo_epi8(a, b), hi = _mm256_unpackhi_epi8(a, b);
            const __m256i w0 = _mm256_set1_epi32(weights[0]);
            s00 = _mm256_add_epi16(s00, _mm256_maddubs_epi16(lo, w0));
            s01 = _mm256_add_epi16(s01, _mm256_maddubs_epi16(hi, w0));
            const __m256i w1 = _mm256_set1_epi32(weights[1]);
            s10 = _mm256_add_epi16(s10, _mm256_maddubs_epi16(lo, w1));
            s11 = _mm256_add_epi16(s11, _mm256_maddubs_epi16(hi, w1));
        }
        ONNXSPARSE_WIDEN(e00, o00, s00);
        ONNXSPARSE_WIDEN(e01, o01, s01);
        ONNXSPARSE_WIDEN(e10, o10, s10);
        ONNXSPARSE_WIDEN(e11, o11, s11);
    }
    store_u8_half<0>(out, e00, o00);
    store_u8_half<1>(out, e01, o01);
    store_u8_half<0>(out + out_stride, e10, o10);
    store_u8_half<1>(out + out_stride, e11, o11);
}

// Sub-blocks of 2 rows: `stride` is always 2.
void chunk2_u8_avx2(const uint8_t* x, const int64_t* offsets, const int32_t* groups, int64_t group_count,
                    const int32_t* weights, int64_t, int32_t* out, int64_t out_stride) {
    rows2_u8(x, offsets, groups, group_count, weights, out, out_stride);
}

void chunk1_u8_avx2(const uint8_t* x, const int64_t* offsets, const int32_t* groups, int64_t group_count,
                    const int32_t* weights, int64_t, int32_t* out, int64_t) {
    const __m256i one = _mm256_set1_epi32(1);
    __m256i e0 = _mm256_setzero_si256(), o0 = e0, e1 = e0, o1 = e0;
    for (int64_t g = 0; g < group_count; ++g) {
        __m256i s0 = _mm256_setzero_si256(), s1 = s0;
        for (const int64_t* end = offsets + 2 * groups[g]; offsets != end; offsets += 2, ++weights) {
            const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offsets[0]));
            const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offsets[1]));
            const __m256i w = _mm256_set1_epi32(*weights);
            s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(a, b), w));
            s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(a, b), w));
        }
        ONNXSPARSE_WIDEN(e0, o0, s0);
        ONNXSPARSE_WIDEN(e1, o1, s1);
    }
    store_u8_half<0>(out, e0, o0);
    store_u8_half<1>(out, e1, o1);
}

#undef ONNXSPARSE_PAIR_STEP
#undef ONNXSPARSE_WIDEN

// ---- quads: a block's four-term groups packed once per 32-pixel chunk, read by all its sub-blocks ----
// Packing interleaves the bytes of quad q's four input runs per pixel: vector k of a quad holds the
// pixels 4k..4k+3 and 16+4k..16+4k+3, four bytes (x0, x1, x2, x3) each. An odd pair count ends
// with a zero pair (its weights are 0). Writes 4 vectors per quad to `packed`.
void pack_quads(const uint8_t* x, const int64_t* offsets, int64_t pairs, __m256i* packed) {
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t pair = 0; pair < pairs; pair += 2, offsets += 4, packed += 4) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offsets[0]));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offsets[1]));
        const bool full = pair + 1 < pairs;
        const __m256i c = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offsets[2])) : zero;
        const __m256i d = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offsets[3])) : zero;
        const __m256i ab_lo = _mm256_unpacklo_epi8(a, b), ab_hi = _mm256_unpackhi_epi8(a, b);
        const __m256i cd_lo = _mm256_unpacklo_epi8(c, d), cd_hi = _mm256_unpackhi_epi8(c, d);
        _mm256_store_si256(packed, _mm256_unpacklo_epi16(ab_lo, cd_lo));
        _mm256_store_si256(packed + 1, _mm256_unpackhi_epi16(ab_lo, cd_lo));
        _mm256_store_si256(packed + 2, _mm256_unpacklo_epi16(ab_hi, cd_hi));
        _mm256_store_si256(packed + 3, _mm256_unpackhi_epi16(ab_hi, cd_hi));
    }
}

// 2 rows x 32 pixels from packed quads: per quad and row a broadcast weight word, four vpmaddubsw
// (exact int16 pair sums: every pair passed the bound) and four vpmaddwd by 1 (the two pair sums
// of a pixel into int32).
__attribute__((noinline)) void quads2_u8(const __m256i* packed, int64_t quads, const int32_t* weights, int32_t* out,
                                         int64_t out_stride) {
    const __m256i one = _mm256_set1_epi16(1);
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    for (const __m256i* end = packed + 4 * quads; packed != end; packed += 4, weights += 2) {
        const __m256i v0 = _mm256_load_si256(packed), v1 = _mm256_load_si256(packed + 1);
        const __m256i v2 = _mm256_load_si256(packed + 2), v3 = _mm256_load_si256(packed + 3);
        const __m256i w0 = _mm256_set1_epi32(weights[0]), w1 = _mm256_set1_epi32(weights[1]);
        a00 = _mm256_add_epi32(a00, _mm256_madd_epi16(_mm256_maddubs_epi16(v0, w0), one));
        a01 = _mm256_add_epi32(a01, _mm256_madd_epi16(_mm256_maddubs_epi16(v1, w0), one));
        a02 = _mm256_add_epi32(a02, _mm256_madd_epi16(_mm256_maddubs_epi16(v2, w0), one));
        a03 = _mm256_add_epi32(a03, _mm256_madd_epi16(_mm256_maddubs_epi16(v3, w0), one));
        a10 = _mm256_add_epi32(a10, _mm256_madd_epi16(_mm256_maddubs_epi16(v0, w1), one));
        a11 = _mm256_add_epi32(a11, _mm256_madd_epi16(_mm256_maddubs_epi16(v1, w1), one));
        a12 = _mm256_add_epi32(a12, _mm256_madd_epi16(_mm256_maddubs_epi16(v2, w1), one));
        a13 = _mm256_add_epi32(a13, _mm256_madd_epi16(_mm256_maddubs_epi16(v3, w1), one));
    }
    // back to pixel order: vector k holds pixels 4k..4k+3 (low lane) and 16+4k.. (high lane)
    auto store = [](int32_t* row, __m256i v0, __m256i v1, __m256i v2, __m256i v3) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row), _mm256_permute2x128_si256(v0, v1, 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + 8), _mm256_permute2x128_si256(v2, v3, 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + 16), _mm256_permute2x128_si256(v0, v1, 0x31));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + 24), _mm256_permute2x128_si256(v2, v3, 0x31));
    };
    store(out, a00, a01, a02, a03);
    store(out + out_stride, a10, a11, a12, a13);
}

template <typename YT>
__m128i widen4(const YT* values) {
    int32_t packed;
    std::memcpy(&packed, values, 4);
    const __m128i bytes = _mm_cvtsi32_si128(packed);
    return std::is_signed<YT>::value ? _mm_cvtepi8_epi32(bytes) : _mm_cvtepu8_epi32(bytes);
}

// Eight outputs whose float32 bytes are exact except on the lanes in `near` (a bit per lane, close
// to a rounding tie): those lanes take the int64 path, the others keep their bytes. The residual
// is read before y8 (which may be it) is written.
template <typename YT>
void exact_lanes(int near, __m128i bytes, const int32_t* acc8, const YT* res8, YT* y8, const Requant& q) {
    alignas(16) YT lanes[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(lanes), bytes);
    for (int k = 0; k < 8; ++k)
        if (near >> k & 1) epilogue_scalar(acc8 + k, lanes + k, res8 ? res8 + k : nullptr, q, 1);
    std::memcpy(y8, lanes, 8 * sizeof(YT));
}

// Without a fused add: t = (acc + bias) * M in float32. Three roundings (acc + bias to float, M to
// float, the product) give a relative error below 3.1 * 2**-24; where it matters, the exact value
// lies within the output range (|.| <= 256), so |error| < 2**-14.3. Where t lies more than 2**-13
// from every k + 1/2, rounding t gives exactly R(acc); the rare vectors with a lane closer than
// that (about 1 lane in 4000) take the exact int64 path.
template <typename YT>
void epilogue_float_avx2(const int32_t* acc, YT* y, const Requant& q, int64_t length) {
    const __m256i bias = _mm256_set1_epi32(static_cast<int32_t>(q.bias));
    const __m256i y_zp = _mm256_set1_epi32(static_cast<int32_t>(q.y_zero_point));
    const __m256 mult = _mm256_set1_ps(static_cast<float>(q.real_multiplier));
    const __m256 low = _mm256_set1_ps(static_cast<float>(q.low - q.y_zero_point));
    const __m256 high = _mm256_set1_ps(static_cast<float>(q.high - q.y_zero_point));
    const __m256 safe = _mm256_set1_ps(0.5f - 1.0f / 8192.0f), sign = _mm256_set1_ps(-0.0f);
    auto eight = [&](const int32_t* acc8, YT* y8) {
        const __m256i a = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc8)), bias);
        __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(a), mult);
        t = _mm256_min_ps(_mm256_max_ps(t, low), high);
        const __m256 rounded = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256 distance = _mm256_andnot_ps(sign, _mm256_sub_ps(t, rounded));
        const int near = _mm256_movemask_ps(_mm256_cmp_ps(distance, safe, _CMP_GT_OQ));
        const __m256i out = _mm256_add_epi32(_mm256_cvtps_epi32(rounded), y_zp);
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(out), _mm256_extracti128_si256(out, 1));
        const __m128i bytes = std::is_signed<YT>::value ? _mm_packs_epi16(words, words) : _mm_packus_epi16(words, words);
        if (near) return exact_lanes(near, bytes, acc8, static_cast<const YT*>(nullptr), y8, q);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(y8), bytes);
    };
    // 32 outputs at a time: one tie test for all four vectors, one 32-byte store
    auto scaled = [&](const int32_t* acc8, __m256* far) {
        const __m256i a = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc8)), bias);
        const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), mult), low), high);
        const __m256 rounded = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        *far = _mm256_or_ps(*far, _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(t, rounded)), safe, _CMP_GT_OQ));
        return _mm256_add_epi32(_mm256_cvtps_epi32(rounded), y_zp);
    };
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t i = 0;
    for (; i + 32 <= length; i += 32) {
        __m256 near = _mm256_setzero_ps();
        const __m256i o0 = scaled(acc + i, &near), o1 = scaled(acc + i + 8, &near);
        const __m256i o2 = scaled(acc + i + 16, &near), o3 = scaled(acc + i + 24, &near);
        if (_mm256_movemask_ps(near)) {
            for (int k = 0; k < 32; k += 8) eight(acc + i + k, y + i + k);
            continue;
        }
        const __m256i w01 = _mm256_packs_epi32(o0, o1), w23 = _mm256_packs_epi32(o2, o3);
        const __m256i bytes = std::is_signed<YT>::value ? _mm256_packs_epi16(w01, w23) : _mm256_packus_epi16(w01, w23);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm256_permutevar8x32_epi32(bytes, order));
    }
    for (; i + 8 <= length; i += 8) eight(acc + i, y + i);
    if (i == length) return;
    // The last 1-7 outputs (every row of a 7-, 14- or 28-wide output ends with some). A run of 8 or
    // more recomputes its last 8 (the same values again); a shorter run reads 8 accumulators, which
    // the callers' scratch rows allow (kTailSlack), and writes only its own outputs.
    if (length >= 8) return eight(acc + length - 8, y + length - 8);
    YT y8[8];
    eight(acc + i, y8);
    for (int64_t k = i; k < length; ++k) y[k] = y8[k - i];
}

// With a fused add, in float32 (used when the add's scales keep the error small, see
// ConvQ8Kernel::set_residual_add): r = R(acc) clamped as above (exact, same tie test), then
// t = r * A + (residual - z_r) * B with A = factor_conv * 2**-shift and B = factor_residual *
// 2**-shift rounded to float32. r and the centered residual are integers of magnitude <= 255, and
// A, B, the two products and the sum are each rounded once (relative 2**-24), so |error| <=
// 3 * 2**-24 * 255 * (A + B): below 2**-13.4 when A + B < 2 (the usual case: the sum's scale is
// the larger), below 2**-11.7 when A + B < 6. Lanes closer than 2**-13 (A + B < 2) or 2**-11 to a
// rounding boundary again take the exact int64 path.
template <typename YT>
void epilogue_add_float_avx2(const int32_t* acc, YT* y, const YT* residual, const Requant& q, int64_t length) {
    const __m256i bias = _mm256_set1_epi32(static_cast<int32_t>(q.bias));
    const __m256 mult = _mm256_set1_ps(static_cast<float>(q.real_multiplier));
    const __m256 low = _mm256_set1_ps(static_cast<float>(q.low - q.y_zero_point));
    const __m256 high = _mm256_set1_ps(static_cast<float>(q.high - q.y_zero_point));
    const __m256 add_low = _mm256_set1_ps(static_cast<float>(q.low - q.add->out_zero_point));
    const __m256 add_high = _mm256_set1_ps(static_cast<float>(q.high - q.add->out_zero_point));
    const float scale = std::ldexp(1.0f, -static_cast<int>(q.add->shift));
    const float a = static_cast<float>(q.add->factor_conv) * scale;  // A and B of the error bound
    const float b = static_cast<float>(q.add->factor_residual) * scale;
    const __m256 factor_conv = _mm256_set1_ps(a), factor_residual = _mm256_set1_ps(b);
    const __m256i residual_zp = _mm256_set1_epi32(static_cast<int32_t>(q.add->residual_zero_point));
    const __m256i out_zp = _mm256_set1_epi32(static_cast<int32_t>(q.add->out_zero_point));
    const __m256 safe = _mm256_set1_ps(0.5f - 1.0f / 8192.0f), sign = _mm256_set1_ps(-0.0f);
    const __m256 safe_add = _mm256_set1_ps(a + b < 2.0f ? 0.5f - 1.0f / 8192.0f : 0.5f - 1.0f / 2048.0f);
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    auto eight = [&](const int32_t* acc8, const YT* res8, YT* y8) {
        const __m256i a = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc8)), bias);
        const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), mult), low), high);
        const __m256 r = _mm256_round_ps(t, kRound);
        __m256 near = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(t, r)), safe, _CMP_GT_OQ);
        const __m128i res_bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(res8));
        const __m256i res32 = std::is_signed<YT>::value ? _mm256_cvtepi8_epi32(res_bytes) : _mm256_cvtepu8_epi32(res_bytes);
        const __m256 centered = _mm256_cvtepi32_ps(_mm256_sub_epi32(res32, residual_zp));
        __m256 t2 = _mm256_fmadd_ps(r, factor_conv, _mm256_mul_ps(centered, factor_residual));
        t2 = _mm256_min_ps(_mm256_max_ps(t2, add_low), add_high);
        const __m256 r2 = _mm256_round_ps(t2, kRound);
        near = _mm256_or_ps(near, _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(t2, r2)), safe_add, _CMP_GT_OQ));
        const __m256i out = _mm256_add_epi32(_mm256_cvtps_epi32(r2), out_zp);
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(out), _mm256_extracti128_si256(out, 1));
        const __m128i bytes = std::is_signed<YT>::value ? _mm_packs_epi16(words, words) : _mm_packus_epi16(words, words);
        if (const int lanes = _mm256_movemask_ps(near)) return exact_lanes(lanes, bytes, acc8, res8, y8, q);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(y8), bytes);
    };
    // The last 1-7 outputs as in epilogue_float_avx2, but y may be the residual itself: a run of 8
    // or more computes its last 8 before the loops overwrite any residual and stores them after it.
    const int64_t full = length & ~int64_t(7);
    YT last[8];
    if (full != length && length >= 8) eight(acc + length - 8, residual + length - 8, last);
    // 32 outputs at a time: the largest distances to k + 1/2 of both roundings kept over all four
    // vectors and tested once, one 32-byte store. The second clamp is the packing's saturation:
    // the clamp bounds are the output type's own (Requant) and |t2| <= 255 * (A + B) < 1530 fits
    // the int32 and int16 steps before it.
    auto scaled = [&](const int32_t* acc8, const YT* res8, __m256* far, __m256* far_add) {
        const __m256i a = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc8)), bias);
        const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), mult), low), high);
        const __m256 r = _mm256_round_ps(t, kRound);
        *far = _mm256_max_ps(*far, _mm256_andnot_ps(sign, _mm256_sub_ps(t, r)));
        const __m128i res_bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(res8));
        const __m256i res32 = std::is_signed<YT>::value ? _mm256_cvtepi8_epi32(res_bytes) : _mm256_cvtepu8_epi32(res_bytes);
        const __m256 centered = _mm256_cvtepi32_ps(_mm256_sub_epi32(res32, residual_zp));
        const __m256 t2 = _mm256_fmadd_ps(r, factor_conv, _mm256_mul_ps(centered, factor_residual));
        const __m256 r2 = _mm256_round_ps(t2, kRound);
        *far_add = _mm256_max_ps(*far_add, _mm256_andnot_ps(sign, _mm256_sub_ps(t2, r2)));
        return _mm256_add_epi32(_mm256_cvtps_epi32(r2), out_zp);
    };
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t i = 0;
    if (q.low == type_low(std::is_signed<YT>::value) && q.high == type_high(std::is_signed<YT>::value))
        for (; i + 32 <= length; i += 32) {
            __m256 far = _mm256_setzero_ps(), far_add = far;
            const __m256i o0 = scaled(acc + i, residual + i, &far, &far_add);
            const __m256i o1 = scaled(acc + i + 8, residual + i + 8, &far, &far_add);
            const __m256i o2 = scaled(acc + i + 16, residual + i + 16, &far, &far_add);
            const __m256i o3 = scaled(acc + i + 24, residual + i + 24, &far, &far_add);
            const __m256 near = _mm256_or_ps(_mm256_cmp_ps(far, safe, _CMP_GT_OQ),
                                             _mm256_cmp_ps(far_add, safe_add, _CMP_GT_OQ));
            if (_mm256_movemask_ps(near)) {
                for (int k = 0; k < 32; k += 8) eight(acc + i + k, residual + i + k, y + i + k);
                continue;
            }
            const __m256i w01 = _mm256_packs_epi32(o0, o1), w23 = _mm256_packs_epi32(o2, o3);
            const __m256i bytes = std::is_signed<YT>::value ? _mm256_packs_epi16(w01, w23) : _mm256_packus_epi16(w01, w23);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm256_permutevar8x32_epi32(bytes, order));
        }
    for (; i < full; i += 8) eight(acc + i, residual + i, y + i);
    if (full == length) return;
    if (length >= 8) {
        std::memcpy(y + length - 8, last, sizeof(last));
        return;
    }
    YT res8[8] = {};
    for (int64_t k = 0; k < length; ++k) res8[k] = residual[k];
    eight(acc, res8, last);
    for (int64_t k = 0; k < length; ++k) y[k] = last[k];
}

template <typename YT>
void epilogue_avx2(const int32_t* acc, YT* y, const YT* residual, const Requant& q, int64_t length) {
    if (!q.add) return epilogue_float_avx2(acc, y, q, length);
    if (q.float_add) return epilogue_add_float_avx2(acc, y, residual, q, length);
    if (q.shift > kMaxFloatShift) return epilogue_scalar(acc, y, residual, q, length);
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256d bias = _mm256_set1_pd(static_cast<double>(q.bias)), mult = _mm256_set1_pd(q.real_multiplier);
    const __m256d limit = _mm256_set1_pd(4096.0), neg_limit = _mm256_set1_pd(-4096.0);
    const __m256d y_zp = _mm256_set1_pd(static_cast<double>(q.y_zero_point));
    const __m256d low = _mm256_set1_pd(static_cast<double>(q.low)), high = _mm256_set1_pd(static_cast<double>(q.high));
    __m256d factor_conv = y_zp, factor_residual = y_zp, residual_zp = y_zp, out_zp = y_zp, scale = y_zp;
    if (q.add) {
        factor_conv = _mm256_set1_pd(static_cast<double>(q.add->factor_conv));
        factor_residual = _mm256_set1_pd(static_cast<double>(q.add->factor_residual));
        residual_zp = _mm256_set1_pd(static_cast<double>(q.add->residual_zero_point));
        out_zp = _mm256_set1_pd(static_cast<double>(q.add->out_zero_point));
        scale = _mm256_set1_pd(std::ldexp(1.0, -static_cast<int>(q.add->shift)));
    }
    auto four = [&](__m128i acc4, const YT* res) -> __m128i {
        __m256d t = _mm256_mul_pd(_mm256_add_pd(_mm256_cvtepi32_pd(acc4), bias), mult);
        t = _mm256_round_pd(_mm256_min_pd(_mm256_max_pd(t, neg_limit), limit), kRound);
        t = _mm256_min_pd(_mm256_max_pd(_mm256_add_pd(t, y_zp), low), high);
        if (q.add) {
            const __m256d r = _mm256_sub_pd(_mm256_cvtepi32_pd(widen4(res)), residual_zp);
            const __m256d conv = _mm256_mul_pd(_mm256_sub_pd(t, y_zp), factor_conv);
            t = _mm256_round_pd(_mm256_mul_pd(_mm256_add_pd(conv, _mm256_mul_pd(r, factor_residual)), scale), kRound);
            t = _mm256_min_pd(_mm256_max_pd(_mm256_add_pd(t, out_zp), low), high);
        }
        return _mm256_cvtpd_epi32(t);
    };
    auto eight = [&](const int32_t* acc8, const YT* res8, YT* y8) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc8));
        const __m128i first = four(_mm256_castsi256_si128(a), res8);
        const __m128i second = four(_mm256_extracti128_si256(a, 1), res8 + 4);
        const __m128i words = _mm_packs_epi32(first, second);
        const __m128i bytes = std::is_signed<YT>::value ? _mm_packs_epi16(words, words) : _mm_packus_epi16(words, words);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(y8), bytes);
    };
    int64_t i = 0;
    for (; i + 8 <= length; i += 8) eight(acc + i, residual + i, y + i);
    if (i < length) {  // the tail through 8-lane temporaries
        int32_t acc8[8] = {};
        YT res8[8] = {}, y8[8];
        std::memcpy(acc8, acc + i, (length - i) * sizeof(int32_t));
        std::memcpy(res8, residual + i, (length - i) * sizeof(YT));
        eight(acc8, res8, y8);
        std::memcpy(y + i, y8, (length - i) * sizeof(YT));
    }
}

// pixel_scalar for blocks of 8 or 16 rows: the pair (x_a, x_b) broadcast as int16s, one vpmaddwd
// per 8 rows gives x_a * w_a + x_b * w_b exactly.
template <typename XT>
void pixel_avx2(const XT* x, int64_t zero_point, const int64_t* terms, int64_t pairs, const int32_t* weights,
                int64_t stride, int32_t* acc) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0;
    for (int64_t p = 0; p < pairs; ++p) {
        const uint32_t xa = static_cast<uint16_t>(static_cast<int16_t>(x[terms[2 * p]] - zero_point));
        const uint32_t xb = static_cast<uint16_t>(static_cast<int16_t>(x[terms[2 * p + 1]] - zero_point));
        const __m256i pair = _mm256_set1_epi32(static_cast<int32_t>(xa | (xb << 16)));
        const int32_t* w = weights + p * stride;
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), pair));
        if (stride == 16)
            a1 = _mm256_add_epi32(a1,
                                  _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8)), pair));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc), a0);
    if (stride == 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 8), a1);
}

#pragma GCC pop_options

using ChunkFn = void (*)(const int16_t*, const int64_t*, int64_t, const int32_t*, int64_t, int32_t*, int64_t);
using ChunkU8Fn = void (*)(const uint8_t*, const int64_t*, const int32_t*, int64_t, const int32_t*, int64_t, int32_t*,
                           int64_t);

// What a pair's, or a group's, int16 lane can reach on one row. Activations are unsigned bytes
// (0..255), so the lane (any partial sum of x_u * w over the taps) lies in [-255 * N, 255 * P],
// P the sum of the positive weights and N the sum of |negative weights|: it stays in int16 (no
// vpmaddubsw saturation, no vpaddw wrap) when P <= 128 and N <= 128 (255 * 128 = 32640 <= 32767).
// Positive and negative weights are budgeted apart: with both signs in a group it holds more pairs
// than one budget of sum |w| <= 128 allowed (3.9 against 2.4 on the 7-bit ResNet-50 at 80%).
constexpr int64_t kMaxLaneWeight = 128;
struct Load {
    int64_t positive = 0, negative = 0;
    Load plus(int64_t w) const {
        return w > 0 ? Load{positive + w, negative} : Load{positive, negative - w};
    }
    bool fits() const { return positive <= kMaxLaneWeight && negative <= kMaxLaneWeight; }
};

void check_zero_point(const char* what, int64_t value, bool is_signed) {
    if (value < type_low(is_signed) || value > type_high(is_signed))
        throw ConvError(std::string(what) + " " + std::to_string(value) + " is outside the " +
                        (is_signed ? "int8" : "uint8") + " range");
}

}  // namespace

ConvQ8Kernel::ConvQ8Kernel(const ConvAttrs& attrs, const int8_t* weight, const int32_t* bias, int64_t x_zero_point,
                           bool x_signed, const int64_t* multiplier, const int64_t* shift, int64_t y_zero_point,
                           bool y_signed)
    : attrs_(attrs), x_zero_point_(x_zero_point), y_zero_point_(y_zero_point), x_signed_(x_signed), y_signed_(y_signed) {
    attrs_.validate();
    check_zero_point("x_zero_point", x_zero_point, x_signed);
    check_zero_point("y_zero_point", y_zero_point, y_signed);
    const int64_t out_channels = attrs_.out_channels;
    for (int64_t o = 0; o < out_channels; ++o) {
        const int64_t m = multiplier[o], s = shift[o];
        if (!(m == 0 || (m >= (int64_t(1) << 30) && m < (int64_t(1) << 31))))
            throw ConvError("multiplier[" + std::to_string(o) + "] = " + std::to_string(m) +
                            " must be 0 or in [2**30, 2**31)");
        if (s < 0 || s > 62)
            throw ConvError("shift[" + std::to_string(o) + "] = " + std::to_string(s) + " must be in [0, 62]");
    }
    multiplier_.assign(multiplier, multiplier + out_channels);
    shift_.assign(shift, shift + out_channels);
    for (int64_t o = 0; o < out_channels; ++o)
        real_multiplier_.push_back(std::ldexp(static_cast<double>(multiplier[o]), -static_cast<int>(shift[o])));
    if (bias)
        bias_.assign(bias, bias + out_channels);
    else
        bias_.assign(out_channels, 0);
    encoding_ = encode_weight<int8_t, int32_t>(attrs_, weight, true, &weight_pairs_);
    build_u8_encoding(weight);
}

void ConvQ8Kernel::build_u8_encoding(const int8_t* weight) {
    const int64_t fan_in = attrs_.fan_in();
    u8_zero_point_ = x_zero_point_ + (x_signed_ ? 128 : 0);
    // sum (x_u * w) over a row must fit int32: 255 * sum |w| < 2**31
    u8_bias_.assign(attrs_.out_channels, 0);
    for (int64_t o = 0; o < attrs_.out_channels; ++o) {
        int64_t sum = 0, sum_abs = 0;
        for (int64_t i = 0; i < fan_in; ++i) {
            sum += weight[o * fan_in + i];
            sum_abs += std::abs(static_cast<int64_t>(weight[o * fan_in + i]));
        }
        if (255 * sum_abs >= (int64_t(1) << 31)) return;
        u8_bias_[o] = bias_[o] - u8_zero_point_ * sum;
    }
    u8_encoding_.name = encoding_.name;
    u8_encoding_.nonzeros = encoding_.nonzeros;
    u8_group_begin_.assign(1, 0);
    u8_sub_begin_.assign(1, 0);
    u8_quads_.clear();
    u8_quad_begin_.clear();
    u8_quad_weights_.clear();
    u8_max_quads_ = 0;
    std::vector<int64_t> terms, lengths;
    std::vector<Load> load;
    struct Pair {
        int64_t first, second;
        bool has_second;
    };
    std::vector<Pair> pairs;
    // Each block is split into sub-blocks of the 2 rows (1 for CSR) one micro-kernel call computes,
    // each with its own terms, pairing and groups.
    for (const Block& source : encoding_.blocks) {
        const int64_t sub_rows = source.stride == 1 ? 1 : 2;
        for (int64_t r0 = 0; r0 < source.rows; r0 += sub_rows) {
            const int64_t rows = std::min(sub_rows, source.rows - r0);
            auto value = [&](int64_t row, int64_t term) -> int64_t {  // a term indexes the row's fan-in
                return row < rows ? weight[(source.out0 + r0 + row) * fan_in + term] : 0;
            };
            terms.clear();
            auto add_term = [&](int64_t term) {
                for (int64_t row = 0; row < rows; ++row)
                    if (value(row, term) != 0) return terms.push_back(term);
            };
            for (int64_t t = source.term_begin; t < source.term_end; t += 2) {
                add_term(encoding_.terms[t]);
                if (encoding_.terms[t + 1] != encoding_.terms[t]) add_term(encoding_.terms[t + 1]);
            }
            // neighbours pair up unless on some row the pair exceeds a bound: then the first goes alone
            pairs.clear();
            for (size_t i = 0; i < terms.size();) {
                bool safe = i + 1 < terms.size();
                for (int64_t row = 0; safe && row < rows; ++row) {
                    const Load pair_load = Load{}.plus(value(row, terms[i])).plus(value(row, terms[i + 1]));
                    safe = pair_load.fits();
                }
                pairs.push_back({terms[i], safe ? terms[i + 1] : terms[i], safe});
                i += safe ? 2 : 1;
            }
            auto add = [&](Load load, int64_t row, const Pair& pair) {
                load = load.plus(value(row, pair.first));
                return pair.has_second ? load.plus(value(row, pair.second)) : load;
            };
            // groups: consecutive pairs whose loads stay within the bounds on every row, at most `cap`
            // pairs; the cap (the median of the uncapped lengths) makes many groups equally long
            // so that the micro-kernel's group loop is predictable
            auto make_groups = [&](int64_t cap, std::vector<int64_t>* out) {
                out->clear();
                load.assign(rows, Load{});
                int64_t count = 0;
                for (const Pair& pair : pairs) {
                    bool fits = count < cap;
                    for (int64_t row = 0; row < rows && fits; ++row) fits = add(load[row], row, pair).fits();
                    if (!fits) {
                        out->push_back(count);
                        count = 0;
                        std::fill(load.begin(), load.end(), Load{});
                    }
                    ++count;
                    for (int64_t row = 0; row < rows; ++row) load[row] = add(load[row], row, pair);
                }
                if (count) out->push_back(count);
            };
            make_groups(std::numeric_limits<int64_t>::max(), &lengths);
            if (!lengths.empty()) {
                std::vector<int64_t> sorted = lengths;
                std::sort(sorted.begin(), sorted.end());
                make_groups(std::max<int64_t>(1, sorted[sorted.size() / 2]), &lengths);
            }
            Block block = source;
            block.out0 = source.out0 + r0;
            block.rows = rows;
            block.stride = sub_rows;
            block.term_begin = static_cast<int64_t>(u8_encoding_.terms.size());
            block.weight_begin = static_cast<int64_t>(u8_weights_.size());
            for (const Pair& pair : pairs) {
                u8_encoding_.terms.push_back(pair.first);
                u8_encoding_.terms.push_back(pair.second);
            }
            block.term_end = static_cast<int64_t>(u8_encoding_.terms.size());
            // sub-blocks of one block usually pair the same terms: share one copy of the term list
            // (and so of the run's offsets, which are streamed from memory like the weights)
            if (r0 > 0) {
                const Block& previous = u8_encoding_.blocks.back();
                const auto terms_begin = u8_encoding_.terms.begin();
                if (previous.term_end - previous.term_begin == block.term_end - block.term_begin &&
                    std::equal(terms_begin + previous.term_begin, terms_begin + previous.term_end,
                               terms_begin + block.term_begin)) {
                    u8_encoding_.terms.resize(block.term_begin);
                    block.term_begin = previous.term_begin;
                    block.term_end = previous.term_end;
                }
            }
            for (const Pair& pair : pairs) {
                for (int64_t row = 0; row < sub_rows; ++row) {
                    const int64_t w0 = value(row, pair.first), w1 = pair.has_second ? value(row, pair.second) : 0;
                    const uint32_t bytes =
                        static_cast<uint8_t>(w0) | (static_cast<uint32_t>(static_cast<uint8_t>(w1)) << 8);
                    u8_weights_.push_back(static_cast<int32_t>(bytes | (bytes << 16)));
                }
            }
            for (int64_t length : lengths) u8_groups_.push_back(static_cast<int32_t>(length));
            u8_encoding_.blocks.push_back(block);
            u8_group_begin_.push_back(static_cast<int64_t>(u8_groups_.size()));
        }
        u8_sub_begin_.push_back(static_cast<int64_t>(u8_encoding_.blocks.size()));
        add_quads(source, weight);
    }
    u8_ok_ = true;
}

// A block whose 2-row sub-blocks share one pair list (always so with 7-bit weights) also gets
// quad weights: pairs 2q and 2q + 1 form quad q (an odd count ends with a zero pair), one word per
// quad and row with the bytes (w0, w1, w2, w3) of its four terms.
void ConvQ8Kernel::add_quads(const Block& source, const int8_t* weight) {
    const int64_t first = u8_sub_begin_[u8_sub_begin_.size() - 2], last = u8_sub_begin_.back();
    const Block& head = u8_encoding_.blocks[first];
    bool shared = source.stride != 1;
    for (int64_t sub = first; shared && sub < last; ++sub)
        shared = u8_encoding_.blocks[sub].stride == 2 && u8_encoding_.blocks[sub].term_begin == head.term_begin;
    const int64_t pairs = (head.term_end - head.term_begin) / 2, quads = shared ? (pairs + 1) / 2 : 0;
    u8_quads_.push_back(quads);
    u8_quad_begin_.push_back(static_cast<int64_t>(u8_quad_weights_.size()));
    if (!quads) return;
    u8_max_quads_ = std::max(u8_max_quads_, quads);
    const int64_t fan_in = attrs_.fan_in();
    for (int64_t sub = first; sub < last; ++sub) {
        const Block& part = u8_encoding_.blocks[sub];
        auto value = [&](int64_t row, int64_t pair, int64_t side) -> uint32_t {
            if (row >= part.rows || pair >= pairs) return 0;
            const int64_t* terms = u8_encoding_.terms.data() + part.term_begin + 2 * pair;
            // a pair with no second term repeats its first: its second weight is 0
            if (side == 1 && terms[1] == terms[0]) return 0;
            return static_cast<uint8_t>(weight[(part.out0 + row) * fan_in + terms[side]]);
        };
        for (int64_t quad = 0; quad < quads; ++quad)
            for (int64_t row = 0; row < 2; ++row)
                u8_quad_weights_.push_back(static_cast<int32_t>(
                    value(row, 2 * quad, 0) | value(row, 2 * quad, 1) << 8 | value(row, 2 * quad + 1, 0) << 16 |
                    value(row, 2 * quad + 1, 1) << 24));
    }
    // the pair weights and int16 groups of these sub-blocks are not read: drop them
    u8_weights_.resize(head.weight_begin);
    u8_groups_.resize(u8_group_begin_[first]);
    for (int64_t sub = first; sub < last; ++sub) {
        u8_encoding_.blocks[sub].weight_begin = head.weight_begin;
        u8_group_begin_[sub + 1] = u8_group_begin_[first];
    }
}

void ConvQ8Kernel::set_residual_add(const ResidualAdd& add) {
    const int64_t limit = int64_t(1) << 31;
    if (add.factor_conv < 0 || add.factor_conv >= limit || add.factor_residual < 0 || add.factor_residual >= limit)
        throw ConvError("residual add factors must be in [0, 2**31)");
    if (add.shift < 0 || add.shift > 62) throw ConvError("residual add shift must be in [0, 62]");
    check_zero_point("residual_zero_point", add.residual_zero_point, y_signed_);
    check_zero_point("out_zero_point", add.out_zero_point, y_signed_);
    add_ = add;
    has_add_ = true;
    // the float32 fused add's error bound (epilogue_add_float_avx2) needs A + B < 6
    float_add_ = std::ldexp(static_cast<double>(add.factor_conv) + static_cast<double>(add.factor_residual),
                            -static_cast<int>(add.shift)) < 6.0;
}

void ConvQ8Kernel::run(const void* x, int64_t batch, int64_t in_h, int64_t in_w, const void* residual, void* y) const {
    if (x_signed_ && y_signed_)
        run_typed(static_cast<const int8_t*>(x), batch, in_h, in_w, static_cast<const int8_t*>(residual),
                  static_cast<int8_t*>(y));
    else if (x_signed_)
        run_typed(static_cast<const int8_t*>(x), batch, in_h, in_w, static_cast<const uint8_t*>(residual),
                  static_cast<uint8_t*>(y));
    else if (y_signed_)
        run_typed(static_cast<const uint8_t*>(x), batch, in_h, in_w, static_cast<const int8_t*>(residual),
                  static_cast<int8_t*>(y));
    else
        run_typed(static_cast<const uint8_t*>(x), batch, in_h, in_w, static_cast<const uint8_t*>(residual),
                  static_cast<uint8_t*>(y));
}

template <typename XT, typename YT>
void ConvQ8Kernel::run_u8(const XT* x, int64_t batch, int64_t in_h, int64_t in_w, const YT* residual, YT* y) const {
    const bool may_be_direct = !std::is_signed<XT>::value;
    const Geometry geo = make_geometry(attrs_, batch, attrs_.in_channels(), in_h, in_w, kChunkU8, may_be_direct);
    if (batch == 0) return;
    std::unique_lock<std::mutex> cache_lock(u8_cache_mutex_, std::try_to_lock);
    RunCache<uint8_t, int32_t> local;
    RunCache<uint8_t, int32_t>& cache = cache_lock.owns_lock() ? u8_cache_ : local;
    const uint8_t* input = reinterpret_cast<const uint8_t*>(x);
    if (!geo.direct) {
        uint8_t* prepared = cache.prepared_buffer(geo.prepared_size);
        if (std::is_signed<XT>::value)
            prepare_input(attrs_, geo, x, prepared, static_cast<uint8_t>(u8_zero_point_),
                          [](XT v) { return static_cast<uint8_t>(static_cast<int>(v) + 128); });
        else
            prepare_input(attrs_, geo, reinterpret_cast<const uint8_t*>(x), prepared,
                          static_cast<uint8_t>(u8_zero_point_), Identity{});
        input = prepared;
    }
    if (cache.resize_input(batch, in_h, in_w)) cache.offsets = term_offsets(attrs_, geo, u8_encoding_);
    const std::vector<int64_t>& offsets = cache.offsets;
    const int64_t blocks = static_cast<int64_t>(encoding_.blocks.size());
    // A tile's input (all channels) should stay in L2 while every block reads it.
    const int64_t target = std::max<int64_t>(kChunkU8, std::min<int64_t>(kTileTarget, kTileBytes / attrs_.in_channels()));
    const Tiling tiling = make_tiling(geo, blocks, target, kChunkU8);
    const int64_t row_length = tiling.max_tile + 2 * kChunkU8;
    const int64_t out_plane = geo.out_h * geo.out_w, channels = attrs_.in_channels();
    const ResidualAdd* add = has_add_ ? &add_ : nullptr;

    const int threads = num_threads();
    const int64_t scratch_rows = 16 * row_length, packed_ints = 32 * u8_max_quads_;  // a quad: 128 bytes
    cache.reserve_scratch(threads, scratch_rows + 16 + packed_ints);
    parallel_for(tiling.items, threads, [&](int64_t item, int thread) {
        int32_t* scratch = cache.scratch(thread);
        __m256i* packed = reinterpret_cast<__m256i*>(scratch + (scratch_rows + 15) / 16 * 16);  // 64-byte aligned
        const int64_t n = item / (tiling.tiles * blocks), tile = item / blocks % tiling.tiles;
        const Block& block = encoding_.blocks[item % blocks];
        const int64_t sub_begin = u8_sub_begin_[item % blocks], sub_end = u8_sub_begin_[item % blocks + 1];
        const int64_t quads = u8_quads_[item % blocks];
        const int64_t q0 = tiling.tile_begin(tile, geo.wide_pixels);
        const int64_t q1 = tiling.tile_begin(tile + 1, geo.wide_pixels);
        const uint8_t* x_group = input + (n * channels + block.group * attrs_.channels_per_group) * geo.channel_stride;
        for (int64_t q = q0; q < q1; q += kChunkU8) {
            const int64_t start = geo.direct ? std::min(q, geo.wide_pixels - kChunkU8) : q;
            int32_t* out = scratch + (start - q0 + kChunkU8);
            if (quads) {
                const Block& head = u8_encoding_.blocks[sub_begin];
                pack_quads(x_group + start, offsets.data() + head.term_begin, (head.term_end - head.term_begin) / 2,
                           packed);
                const int32_t* weights = u8_quad_weights_.data() + u8_quad_begin_[item % blocks];
                for (int64_t sub = sub_begin; sub < sub_end; ++sub, weights += 2 * quads)
                    quads2_u8(packed, quads, weights, out + (u8_encoding_.blocks[sub].out0 - block.out0) * row_length,
                              row_length);
                continue;
            }
            for (int64_t sub = sub_begin; sub < sub_end; ++sub) {
                const Block& part = u8_encoding_.blocks[sub];
                const int32_t* groups = u8_groups_.data() + u8_group_begin_[sub];
                const int64_t group_count = u8_group_begin_[sub + 1] - u8_group_begin_[sub];
                const ChunkU8Fn chunk = part.stride == 1 ? chunk1_u8_avx2 : chunk2_u8_avx2;
                chunk(x_group + start, offsets.data() + part.term_begin, groups, group_count,
                      u8_weights_.data() + part.weight_begin, part.stride,
                      out + (part.out0 - block.out0) * row_length, row_length);
            }
        }
        for (int64_t row = 0; row < block.rows; ++row) {
            const int64_t o = block.out0 + row;
            const Requant requant{u8_bias_[o], multiplier_[o], shift_[o], y_zero_point_, type_low(y_signed_),
                                  type_high(y_signed_), real_multiplier_[o], add, add && float_add_};
            YT* y_plane = y + (n * attrs_.out_channels + o) * out_plane;
            const YT* residual_plane = residual ? residual + (n * attrs_.out_channels + o) * out_plane : nullptr;
            const int32_t* acc = scratch + row * row_length + kChunkU8;
            for_each_output_run(geo, q0, q1, [&](int64_t wide, int64_t out, int64_t length) {
                epilogue_avx2<YT>(acc + (wide - q0), y_plane + out, residual_plane ? residual_plane + out : nullptr,
                                  requant, length);
            });
        }
    });
}

// One output pixel per image (a Gemm or MatMul row, a 1x1 conv on a 1x1 input): the pixel-
// vectorized kernels would compute 32 pixels for 1, so the block's rows are vectorized instead.
template <typename XT, typename YT>
void ConvQ8Kernel::run_pixel(const XT* x, int64_t batch, const YT* residual, YT* y) const {
    const bool avx2 = simd_level() == SimdLevel::avx2;
    const int64_t blocks = static_cast<int64_t>(encoding_.blocks.size()), channels = attrs_.in_channels();
    const ResidualAdd* add = has_add_ ? &add_ : nullptr;
    parallel_for(batch * blocks, num_threads(), [&](int64_t item, int) {
        const int64_t n = item / blocks;
        const Block& block = encoding_.blocks[item % blocks];
        const XT* x_group = x + n * channels + block.group * attrs_.channels_per_group;
        const int64_t* terms = encoding_.terms.data() + block.term_begin;
        const int64_t pairs = (block.term_end - block.term_begin) / 2;
        const int32_t* weights = weight_pairs_.data() + block.weight_begin;
        int32_t acc[16];
        if (avx2 && (block.stride == 8 || block.stride == 16))
            pixel_avx2(x_group, x_zero_point_, terms, pairs, weights, block.stride, acc);
        else
            pixel_scalar(x_group, x_zero_point_, terms, pairs, weights, block.stride, acc);
        for (int64_t row = 0; row < block.rows; ++row) {
            const int64_t o = block.out0 + row, at = n * attrs_.out_channels + o;
            const Requant requant{bias_[o], multiplier_[o], shift_[o], y_zero_point_, type_low(y_signed_),
                                  type_high(y_signed_), real_multiplier_[o], add, false};
            epilogue_scalar<YT>(acc + row, y + at, residual ? residual + at : nullptr, requant, 1);
        }
    });
}

template <typename XT, typename YT>
void ConvQ8Kernel::run_typed(const XT* x, int64_t batch, int64_t in_h, int64_t in_w, const YT* residual, YT* y) const {
    if (batch > 0 && attrs_.one_pixel(in_h, in_w)) return run_pixel(x, batch, residual, y);
    if (u8_ok_ && simd_level() == SimdLevel::avx2) return run_u8(x, batch, in_h, in_w, residual, y);
    const Geometry geo = make_geometry(attrs_, batch, attrs_.in_channels(), in_h, in_w, kChunk, false);
    if (batch == 0) return;
    Buffer<int16_t> prepared(geo.prepared_size);
    const int16_t zero_point = static_cast<int16_t>(x_zero_point_);
    prepare_input(attrs_, geo, x, prepared.get(), int16_t(0),
                  [zero_point](XT v) { return static_cast<int16_t>(static_cast<int16_t>(v) - zero_point); });
    const std::vector<int64_t> offsets = term_offsets(attrs_, geo, encoding_);
    const int64_t blocks = static_cast<int64_t>(encoding_.blocks.size());
    const Tiling tiling = make_tiling(geo, blocks, kTileTarget, kChunk);
    const bool avx2 = simd_level() == SimdLevel::avx2;
    const ChunkFn chunk4 = avx2 ? chunk4_avx2 : chunk_scalar<4>;
    const ChunkFn chunk1 = avx2 ? chunk1_avx2 : chunk_scalar<1>;
    auto epilogue = avx2 ? epilogue_avx2<YT> : epilogue_scalar<YT>;
    const int64_t row_length = tiling.max_tile + 2 * kChunk;
    const int64_t out_plane = geo.out_h * geo.out_w, channels = attrs_.in_channels();
    const ResidualAdd* add = has_add_ ? &add_ : nullptr;

    const int threads = num_threads();
    std::vector<std::unique_ptr<Buffer<int32_t>>> scratches(threads);
    parallel_for(tiling.items, threads, [&](int64_t item, int thread) {
        if (!scratches[thread]) scratches[thread] = std::make_unique<Buffer<int32_t>>(16 * row_length);
        Buffer<int32_t>& scratch = *scratches[thread];
        const int64_t n = item / (tiling.tiles * blocks), tile = item / blocks % tiling.tiles;
        const Block& block = encoding_.blocks[item % blocks];
        const int64_t q0 = tiling.tile_begin(tile, geo.wide_pixels);
        const int64_t q1 = tiling.tile_begin(tile + 1, geo.wide_pixels);
        const int16_t* x_group =
            prepared.get() + (n * channels + block.group * attrs_.channels_per_group) * geo.channel_stride;
        const int64_t* block_offsets = offsets.data() + block.term_begin;
        const int64_t pairs = (block.term_end - block.term_begin) / 2;
        const int32_t* block_weights = weight_pairs_.data() + block.weight_begin;
        for (int64_t q = q0; q < q1; q += kChunk) {
            int32_t* out = scratch.get() + (q - q0 + kChunk);
            if (block.stride == 1) {
                chunk1(x_group + q, block_offsets, pairs, block_weights, 1, out, row_length);
            } else {
                for (int64_t row = 0; row < block.rows; row += 4)
                    chunk4(x_group + q, block_offsets, pairs, block_weights + row, block.stride,
                           out + row * row_length, row_length);
            }
        }
        for (int64_t row = 0; row < block.rows; ++row) {
            const int64_t o = block.out0 + row;
            const Requant requant{bias_[o], multiplier_[o], shift_[o], y_zero_point_, type_low(y_signed_),
                                  type_high(y_signed_), real_multiplier_[o], add, add && float_add_};
            YT* y_plane = y + (n * attrs_.out_channels + o) * out_plane;
            const YT* residual_plane = residual ? residual + (n * attrs_.out_channels + o) * out_plane : nullptr;
            const int32_t* acc = scratch.get() + row * row_length + kChunk;
            for_each_output_run(geo, q0, q1, [&](int64_t wide, int64_t out, int64_t length) {
                epilogue(acc + (wide - q0), y_plane + out, residual_plane ? residual_plane + out : nullptr, requant,
                         length);
            });
        }
    });
}

}  // namespace onnxsparse
