// float32 sparse convolution: vectorized over output pixels (8 per ymm), weights broadcast.
// Block kernel: 4 output channels x 24 pixels (12 accumulators); one-row (CSR) kernel: 1 x 24.
#include <immintrin.h>

#include <cmath>

#include "conv_kernels.h"

namespace onnxsparse {

namespace {

constexpr int64_t kChunk = 24;       // pixels per micro-kernel call
constexpr int64_t kTileTarget = 768;    // wide pixels per work item, at most (longer output runs)
constexpr int64_t kTileBudget = 65536;  // input floats of one tile (256 KB), over all channels
constexpr int64_t kTermSlice = 128;     // terms per pass over a chunk (their inputs: ~16 KB)

// Accumulate rows [row, row + R) of a block over W pixels into out[r * out_stride + i].
template <int R, int W>
void chunk_scalar(const float* x, const int64_t* offsets, int64_t terms, const float* weights, int64_t stride,
                  float* out, int64_t out_stride, bool accumulate) {
    float acc[R][W] = {};
    if (accumulate)
        for (int r = 0; r < R; ++r)
            for (int64_t i = 0; i < W; ++i) acc[r][i] = out[r * out_stride + i];
    for (int64_t t = 0; t < terms; ++t) {
        const float* in = x + offsets[t];
        for (int r = 0; r < R; ++r) {
            const float w = weights[t * stride + r];
            for (int64_t i = 0; i < W; ++i) acc[r][i] += w * in[i];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int64_t i = 0; i < W; ++i) out[r * out_stride + i] = acc[r][i];
}

void epilogue_scalar(const float* acc, float* y, const float* residual, float bias, float low, float high,
                     int64_t length) {
    for (int64_t i = 0; i < length; ++i) {
        float v = acc[i] + bias;
        if (residual) v += residual[i];
        v = v < low ? low : v;
        y[i] = v > high ? high : v;
    }
}

// One output pixel (a Gemm row): out[r] = sum over terms of x[channel] * w[t * S + r], r < S.
template <int S>
void pixel_scalar(const float* x, const int64_t* channels, int64_t terms, const float* weights, float* out) {
    float acc[S] = {};
    for (int64_t t = 0; t < terms; ++t) {
        const float v = x[channels[t]];
        for (int r = 0; r < S; ++r) acc[r] += v * weights[t * S + r];
    }
    for (int r = 0; r < S; ++r) out[r] = acc[r];
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// Accumulators are named variables: gcc spills arrays of __m256 to the stack on every iteration.
// V: vectors of 8 pixels per row (3 = a whole chunk; 1 and 2 finish a row of pixels that is not a
// multiple of 24 wide, such as the 49 or 63 wide pixels of a 7x7 layer, with less wasted work).
template <int V>
void chunk4_avx2(const float* x, const int64_t* offsets, int64_t terms, const float* weights, int64_t stride,
                 float* out, int64_t out_stride, bool accumulate) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
    if (accumulate) {
        auto load = [&](int r, int v) { return v < V ? _mm256_loadu_ps(out + r * out_stride + 8 * v) : a00; };
        a00 = load(0, 0), a01 = load(0, 1), a02 = load(0, 2), a10 = load(1, 0), a11 = load(1, 1), a12 = load(1, 2);
        a20 = load(2, 0), a21 = load(2, 1), a22 = load(2, 2), a30 = load(3, 0), a31 = load(3, 1), a32 = load(3, 2);
    }
    for (int64_t t = 0; t < terms; ++t) {
        const float* in = x + offsets[t];
        const __m256 x0 = _mm256_loadu_ps(in);
        const __m256 x1 = V > 1 ? _mm256_loadu_ps(in + 8) : x0, x2 = V > 2 ? _mm256_loadu_ps(in + 16) : x0;
        const float* w = weights + t * stride;
        __m256 wr = _mm256_broadcast_ss(w);
        a00 = _mm256_fmadd_ps(wr, x0, a00);
        if (V > 1) a01 = _mm256_fmadd_ps(wr, x1, a01);
        if (V > 2) a02 = _mm256_fmadd_ps(wr, x2, a02);
        wr = _mm256_broadcast_ss(w + 1);
        a10 = _mm256_fmadd_ps(wr, x0, a10);
        if (V > 1) a11 = _mm256_fmadd_ps(wr, x1, a11);
        if (V > 2) a12 = _mm256_fmadd_ps(wr, x2, a12);
        wr = _mm256_broadcast_ss(w + 2);
        a20 = _mm256_fmadd_ps(wr, x0, a20);
        if (V > 1) a21 = _mm256_fmadd_ps(wr, x1, a21);
        if (V > 2) a22 = _mm256_fmadd_ps(wr, x2, a22);
        wr = _mm256_broadcast_ss(w + 3);
        a30 = _mm256_fmadd_ps(wr, x0, a30);
        if (V > 1) a31 = _mm256_fmadd_ps(wr, x1, a31);
        if (V > 2) a32 = _mm256_fmadd_ps(wr, x2, a32);
    }
    const __m256 rows[4][3] = {{a00, a01, a02}, {a10, a11, a12}, {a20, a21, a22}, {a30, a31, a32}};
    for (int r = 0; r < 4; ++r)
        for (int v = 0; v < V; ++v) _mm256_storeu_ps(out + r * out_stride + 8 * v, rows[r][v]);
}

template <int V>
void chunk1_avx2(const float* x, const int64_t* offsets, int64_t terms, const float* weights, int64_t stride,
                 float* out, int64_t, bool accumulate) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0;
    if (accumulate) {
        a0 = _mm256_loadu_ps(out);
        if (V > 1) a1 = _mm256_loadu_ps(out + 8);
        if (V > 2) a2 = _mm256_loadu_ps(out + 16);
    }
    for (int64_t t = 0; t < terms; ++t) {
        const float* in = x + offsets[t];
        const __m256 wr = _mm256_broadcast_ss(weights + t * stride);
        a0 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(in), a0);
        if (V > 1) a1 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(in + 8), a1);
        if (V > 2) a2 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(in + 16), a2);
    }
    _mm256_storeu_ps(out, a0);
    if (V > 1) _mm256_storeu_ps(out + 8, a1);
    if (V > 2) _mm256_storeu_ps(out + 16, a2);
}

void epilogue_avx2(const float* acc, float* y, const float* residual, float bias, float low, float high,
                   int64_t length) {
    const __m256 vbias = _mm256_set1_ps(bias), vlow = _mm256_set1_ps(low), vhigh = _mm256_set1_ps(high);
    int64_t i = 0;
    for (; i + 8 <= length; i += 8) {
        __m256 v = _mm256_add_ps(_mm256_loadu_ps(acc + i), vbias);
        if (residual) v = _mm256_add_ps(v, _mm256_loadu_ps(residual + i));
        v = _mm256_min_ps(vhigh, _mm256_max_ps(vlow, v));  // NaN passes through
        _mm256_storeu_ps(y + i, v);
    }
    if (i == length) return;
    // the last 1-7 outputs of a row (7-, 14- and 28-wide outputs end with some): masked loads and
    // stores touch only the run's own elements
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(length - i)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 v = _mm256_add_ps(_mm256_maskload_ps(acc + i, mask), vbias);
    if (residual) v = _mm256_add_ps(v, _mm256_maskload_ps(residual + i, mask));
    _mm256_maskstore_ps(y + i, mask, _mm256_min_ps(vhigh, _mm256_max_ps(vlow, v)));
}

// Vectorized over the block's rows (8 per ymm), two terms at a time into separate accumulators.
template <int S>
void pixel_avx2(const float* x, const int64_t* channels, int64_t terms, const float* weights, float* out) {
    static_assert(S == 8 || S == 16, "rows per block");
    constexpr int V = S / 8;
    __m256 a[V], b[V];
    for (int v = 0; v < V; ++v) a[v] = b[v] = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 2 <= terms; t += 2) {
        const __m256 xa = _mm256_broadcast_ss(x + channels[t]), xb = _mm256_broadcast_ss(x + channels[t + 1]);
        const float* w = weights + t * S;
        for (int v = 0; v < V; ++v) {
            a[v] = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w + 8 * v), a[v]);
            b[v] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + S + 8 * v), b[v]);
        }
    }
    if (t < terms) {
        const __m256 xa = _mm256_broadcast_ss(x + channels[t]);
        for (int v = 0; v < V; ++v) a[v] = _mm256_fmadd_ps(xa, _mm256_loadu_ps(weights + t * S + 8 * v), a[v]);
    }
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(out + 8 * v, _mm256_add_ps(a[v], b[v]));
}

#pragma GCC pop_options

using ChunkFn = void (*)(const float*, const int64_t*, int64_t, const float*, int64_t, float*, int64_t, bool);
using EpilogueFn = void (*)(const float*, float*, const float*, float, float, float, int64_t);

}  // namespace

ConvF32Kernel::ConvF32Kernel(const ConvAttrs& attrs, const float* weight, const float* bias, float clamp_min,
                             float clamp_max)
    : attrs_(attrs), clamp_min_(clamp_min), clamp_max_(clamp_max) {
    attrs_.validate();
    if (std::isnan(clamp_min) || std::isnan(clamp_max) || clamp_min > clamp_max)
        throw ConvError("clamp_min must be <= clamp_max (and neither NaN)");
    encoding_ = encode_weight<float, float>(attrs_, weight, false, &weights_);
    if (bias)
        bias_.assign(bias, bias + attrs_.out_channels);
    else
        bias_.assign(attrs_.out_channels, 0.0f);
}

void ConvF32Kernel::run(const float* x, int64_t batch, int64_t in_h, int64_t in_w, const float* residual,
                        float* y) const {
    if (batch > 0 && attrs_.one_pixel(in_h, in_w)) return run_pixel(x, batch, residual, y);
    const Geometry geo = make_geometry(attrs_, batch, attrs_.in_channels(), in_h, in_w, kChunk, true);
    if (batch == 0) return;
    std::unique_lock<std::mutex> cache_lock(cache_mutex_, std::try_to_lock);
    RunCache<float, float> local;
    RunCache<float, float>& cache = cache_lock.owns_lock() ? cache_ : local;
    const float* prepared = x;
    if (!geo.direct) {
        float* buffer = cache.prepared_buffer(geo.prepared_size);
        prepare_input(attrs_, geo, x, buffer, 0.0f, Identity{});
        prepared = buffer;
    }
    if (cache.resize_input(batch, in_h, in_w)) cache.offsets = term_offsets(attrs_, geo, encoding_);
    const std::vector<int64_t>& offsets = cache.offsets;
    const int64_t blocks = static_cast<int64_t>(encoding_.blocks.size());
    // A tile's input (all channels) should stay in L2 while every block reads it.
    const int64_t target = std::max<int64_t>(kChunk, std::min<int64_t>(kTileTarget, kTileBudget / attrs_.in_channels()));
    const Tiling tiling = make_tiling(geo, blocks, target, kChunk);
    const bool avx2 = simd_level() == SimdLevel::avx2;
    // [vectors - 1]: kernels for 8, 16 and 24 pixels
    const ChunkFn chunk4[3] = {avx2 ? chunk4_avx2<1> : chunk_scalar<4, 8>, avx2 ? chunk4_avx2<2> : chunk_scalar<4, 16>,
                               avx2 ? chunk4_avx2<3> : chunk_scalar<4, 24>};
    const ChunkFn chunk1[3] = {avx2 ? chunk1_avx2<1> : chunk_scalar<1, 8>, avx2 ? chunk1_avx2<2> : chunk_scalar<1, 16>,
                               avx2 ? chunk1_avx2<3> : chunk_scalar<1, 24>};
    const EpilogueFn epilogue = avx2 ? epilogue_avx2 : epilogue_scalar;
    const int64_t row_length = tiling.max_tile + 2 * kChunk;
    const int64_t out_plane = geo.out_h * geo.out_w, channels = attrs_.in_channels();

    const int threads = num_threads();
    cache.reserve_scratch(threads, 16 * row_length);
    parallel_for(tiling.items, threads, [&](int64_t item, int thread) {
        float* scratch = cache.scratch(thread);
        const int64_t n = item / (tiling.tiles * blocks), tile = item / blocks % tiling.tiles;
        const Block& block = encoding_.blocks[item % blocks];
        const int64_t q0 = tiling.tile_begin(tile, geo.wide_pixels);
        const int64_t q1 = tiling.tile_begin(tile + 1, geo.wide_pixels);
        const float* x_group =
            prepared + (n * channels + block.group * attrs_.channels_per_group) * geo.channel_stride;
        const int64_t* block_offsets = offsets.data() + block.term_begin;
        const int64_t terms = block.term_end - block.term_begin;
        const float* block_weights = weights_.data() + block.weight_begin;
        // Pixels outer, rows inner: the chunk's input (one short run per term) stays in L1 while
        // every 4-row slice of the block reads it; the block's weights stay in L1 as well.
        const int64_t row_step = block.stride == 1 ? 1 : 4;
        for (int64_t q = q0; q < q1; q += kChunk) {
            const int64_t vectors = std::min<int64_t>(3, (q1 - q + 7) / 8), width = 8 * vectors;
            // Reading past the last pixel is only safe in a prepared (slack-padded) input.
            const int64_t start = geo.direct ? std::min(q, geo.wide_pixels - width) : q;
            // Terms in slices whose inputs (one short run each) stay in L1 while every row slice reads them.
            for (int64_t first = 0; first == 0 || first < terms; first += kTermSlice) {  // once if no terms
                const int64_t count = std::min(kTermSlice, terms - first);
                const float* slice_weights = block_weights + first * block.stride;
                for (int64_t row = 0; row < block.rows; row += row_step) {
                    float* out = scratch + row * row_length + (start - q0 + kChunk);
                    if (block.stride == 1)
                        chunk1[vectors - 1](x_group + start, block_offsets + first, count, slice_weights, 1, out,
                                            row_length, first > 0);
                    else
                        chunk4[vectors - 1](x_group + start, block_offsets + first, count, slice_weights + row,
                                            block.stride, out, row_length, first > 0);
                }
            }
        }
        for (int64_t row = 0; row < block.rows; ++row) {
            const int64_t o = block.out0 + row;
            float* y_plane = y + (n * attrs_.out_channels + o) * out_plane;
            const float* residual_plane = residual ? residual + (n * attrs_.out_channels + o) * out_plane : nullptr;
            const float* acc = scratch + row * row_length + kChunk;
            for_each_output_run(geo, q0, q1, [&](int64_t wide, int64_t out, int64_t length) {
                epilogue(acc + (wide - q0), y_plane + out, residual_plane ? residual_plane + out : nullptr, bias_[o],
                         clamp_min_, clamp_max_, length);
            });
        }
    });
}

// One output pixel per image (a Gemm or MatMul row, a 1x1 conv on a 1x1 input): the pixel-
// vectorized kernels would compute 8 pixels for 1, so the block's rows are vectorized instead.
// The input is read in place (a term's code is its input channel).
void ConvF32Kernel::run_pixel(const float* x, int64_t batch, const float* residual, float* y) const {
    const bool avx2 = simd_level() == SimdLevel::avx2;
    const int64_t blocks = static_cast<int64_t>(encoding_.blocks.size()), channels = attrs_.in_channels();
    parallel_for(batch * blocks, num_threads(), [&](int64_t item, int) {
        const int64_t n = item / blocks;
        const Block& block = encoding_.blocks[item % blocks];
        const float* x_group = x + n * channels + block.group * attrs_.channels_per_group;
        const int64_t* terms = encoding_.terms.data() + block.term_begin;
        const int64_t count = block.term_end - block.term_begin;
        const float* weights = weights_.data() + block.weight_begin;
        float acc[16];
        switch (block.stride) {
            case 16: (avx2 ? pixel_avx2<16> : pixel_scalar<16>)(x_group, terms, count, weights, acc); break;
            case 8: (avx2 ? pixel_avx2<8> : pixel_scalar<8>)(x_group, terms, count, weights, acc); break;
            case 4: pixel_scalar<4>(x_group, terms, count, weights, acc); break;
            default: pixel_scalar<1>(x_group, terms, count, weights, acc); break;  // 1: CSR rows
        }
        for (int64_t row = 0; row < block.rows; ++row) {
            const int64_t o = n * attrs_.out_channels + block.out0 + row;
            float v = acc[row] + bias_[block.out0 + row];
            if (residual) v += residual[o];
            v = v < clamp_min_ ? clamp_min_ : v;
            y[o] = v > clamp_max_ ? clamp_max_ : v;
        }
    });
}

}  // namespace onnxsparse
