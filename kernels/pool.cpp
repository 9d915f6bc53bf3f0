#include "pool.h"

#include <immintrin.h>

#include <limits>
#include <type_traits>
#include <vector>

namespace onnxsparse {

namespace {

// The maximum rule of vmaxps / vpmax*: a unless b is larger (for floats: b when either is NaN),
// so the scalar and AVX2 paths agree bit for bit.
template <typename T>
inline T larger(T a, T b) {
    return a > b ? a : b;
}

// dst[i] = the maximum of src[k][i] over the `count` (>= 1) rows src[k]
template <typename T>
void max_of_rows_scalar(T* __restrict dst, const T* const* src, int64_t count, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        T m = src[0][i];
        for (int64_t k = 1; k < count; ++k) m = larger(m, src[k][i]);
        dst[i] = m;
    }
}

// dst[i] = the maximum of src[i + k * step] for k < taps (>= 1)
template <typename T>
void max_of_window_scalar(T* __restrict dst, const T* __restrict src, int64_t taps, int64_t step, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        T m = src[i];
        for (int64_t k = 1; k < taps; ++k) m = larger(m, src[i + k * step]);
        dst[i] = m;
    }
}

template <typename T>
void every_nth_scalar(T* __restrict dst, const T* __restrict src, int64_t n, int64_t stride) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
}

#pragma GCC push_options
#pragma GCC target("avx2")

inline __m256i vmax(__m256i a, __m256i b, uint8_t) { return _mm256_max_epu8(a, b); }
inline __m256i vmax(__m256i a, __m256i b, int8_t) { return _mm256_max_epi8(a, b); }
inline __m256 vmax(__m256 a, __m256 b, float) { return _mm256_max_ps(a, b); }

template <typename T>
inline auto vload(const T* p) {
    if constexpr (std::is_same_v<T, float>)
        return _mm256_loadu_ps(p);
    else
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline void vstore(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
template <typename T>
inline void vstore(T* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

// Each output vector is loaded and stored once (no pass re-reads what the one before stored); the
// last vector overlaps the one before (recomputed from the sources) instead of a scalar tail.
template <typename T>
void max_of_rows_avx2(T* __restrict dst, const T* const* src, int64_t count, int64_t n) {
    constexpr int64_t lanes = 32 / sizeof(T);
    if (n < lanes) return max_of_rows_scalar(dst, src, count, n);
    for (int64_t i = 0;; i += lanes) {
        i = std::min(i, n - lanes);
        auto m = vload(src[0] + i);
        for (int64_t k = 1; k < count; ++k) m = vmax(m, vload(src[k] + i), T());
        vstore(dst + i, m);
        if (i + lanes == n) return;
    }
}

template <typename T>
void max_of_window_avx2(T* __restrict dst, const T* __restrict src, int64_t taps, int64_t step, int64_t n) {
    constexpr int64_t lanes = 32 / sizeof(T);
    if (n < lanes) return max_of_window_scalar(dst, src, taps, step, n);
    for (int64_t i = 0;; i += lanes) {
        i = std::min(i, n - lanes);
        auto m = vload(src + i);
        for (int64_t k = 1; k < taps; ++k) m = vmax(m, vload(src + i + k * step), T());
        vstore(dst + i, m);
        if (i + lanes == n) return;
    }
}

// dst[i] = src[i * stride]; stride 2 (the common pool) vectorized. Reads up to 64 bytes past
// src[(n - 1) * stride] (the caller's buffer has that slack).
template <typename T>
void every_nth_avx2(T* __restrict dst, const T* __restrict src, int64_t n, int64_t stride) {
    constexpr int64_t lanes = 32 / sizeof(T);
    if (stride != 2 || n < lanes) return every_nth_scalar(dst, src, n, stride);
    const __m256i low_bytes = _mm256_set1_epi16(0x00FF);
    for (int64_t i = 0;; i += lanes) {
        i = std::min(i, n - lanes);  // the last vector overlaps the one before
        if constexpr (std::is_same_v<T, float>) {
            const __m256 even = _mm256_shuffle_ps(_mm256_loadu_ps(src + 2 * i), _mm256_loadu_ps(src + 2 * i + 8),
                                                  _MM_SHUFFLE(2, 0, 2, 0));
            _mm256_storeu_ps(dst + i, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), 0xD8)));
        } else {
            const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i));
            const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i + 32));
            const __m256i packed = _mm256_packus_epi16(_mm256_and_si256(a, low_bytes), _mm256_and_si256(b, low_bytes));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_permute4x64_epi64(packed, 0xD8));
        }
        if (i + lanes == n) return;
    }
}

#pragma GCC pop_options

}  // namespace

MaxPoolKernel::MaxPoolKernel(const ConvAttrs& attrs) : attrs_(attrs) {
    attrs_.validate();
    const int64_t extent_h = (attrs_.kernel_h - 1) * attrs_.dilation_h + 1;
    const int64_t extent_w = (attrs_.kernel_w - 1) * attrs_.dilation_w + 1;
    if (attrs_.pad_top >= extent_h || attrs_.pad_bottom >= extent_h || attrs_.pad_left >= extent_w ||
        attrs_.pad_right >= extent_w)
        throw ConvError("every pad must be smaller than the pooling window");
}

// Per output row: the maximum over its window's input rows at every column (`columns`, padded
// left and right with the type's lowest value, which never wins over an input pixel), then the
// window maximum along the row at every column where a window starts, then every stride-th.
template <typename T>
void MaxPoolKernel::run(const T* x, int64_t batch, int64_t channels, int64_t in_h, int64_t in_w, T* y) const {
    int64_t out_h = 0, out_w = 0;
    output_size(attrs_, in_h, in_w, &out_h, &out_w);
    const bool avx2 = simd_level() == SimdLevel::avx2;
    void (*const max_of_rows)(T*, const T* const*, int64_t, int64_t) =
        avx2 ? max_of_rows_avx2<T> : max_of_rows_scalar<T>;
    void (*const max_of_window)(T*, const T*, int64_t, int64_t, int64_t) =
        avx2 ? max_of_window_avx2<T> : max_of_window_scalar<T>;
    void (*const every_nth)(T*, const T*, int64_t, int64_t) = avx2 ? every_nth_avx2<T> : every_nth_scalar<T>;
    const ConvAttrs a = attrs_;
    const int64_t padded_w = a.pad_left + in_w + a.pad_right;
    const int64_t span = (out_w - 1) * a.stride_w + 1;  // columns where an output window starts
    const T lowest = std::numeric_limits<T>::lowest();
    constexpr int64_t slack = 64;  // every_nth_avx2 reads past the last kept column
    parallel_for(batch * channels, num_threads(), [&](int64_t plane, int) {
        const T* src = x + plane * in_h * in_w;
        T* dst = y + plane * out_h * out_w;
        std::vector<T> column_buffer(static_cast<size_t>(padded_w), lowest);
        std::vector<T> window_buffer(static_cast<size_t>(span + slack), lowest);
        std::vector<const T*> rows(static_cast<size_t>(a.kernel_h));
        T* columns = column_buffer.data();
        T* windows = window_buffer.data();
        for (int64_t oh = 0; oh < out_h; ++oh) {
            T* out = dst + oh * out_w;
            int64_t count = 0;
            for (int64_t k = 0; k < a.kernel_h; ++k) {
                const int64_t r = oh * a.stride_h - a.pad_top + k * a.dilation_h;
                if (r >= 0 && r < in_h) rows[count++] = src + r * in_w;
            }
            // dilated taps may all fall in the padding (kernel 2, dilation 3, one input row): as
            // onnxruntime, the maximum over no pixel is the type's lowest value
            if (count == 0) {
                std::fill(out, out + out_w, lowest);
                continue;
            }
            max_of_rows(columns + a.pad_left, rows.data(), count, in_w);
            if (a.stride_w == 1) {
                max_of_window(out, columns, a.kernel_w, a.dilation_w, out_w);
            } else {
                max_of_window(windows, columns, a.kernel_w, a.dilation_w, span);
                every_nth(out, windows, out_w, a.stride_w);
            }
        }
    });
}

template void MaxPoolKernel::run<float>(const float*, int64_t, int64_t, int64_t, int64_t, float*) const;
template void MaxPoolKernel::run<uint8_t>(const uint8_t*, int64_t, int64_t, int64_t, int64_t, uint8_t*) const;
template void MaxPoolKernel::run<int8_t>(const int8_t*, int64_t, int64_t, int64_t, int64_t, int8_t*) const;

}  // namespace onnxsparse
