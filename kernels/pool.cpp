#include "pool.h"

#include <limits>

namespace onnxsparse {

MaxPoolKernel::MaxPoolKernel(const ConvAttrs& attrs) : attrs_(attrs) {
    attrs_.validate();
    const int64_t extent_h = (attrs_.kernel_h - 1) * attrs_.dilation_h + 1;
    const int64_t extent_w = (attrs_.kernel_w - 1) * attrs_.dilation_w + 1;
    if (attrs_.pad_top >= extent_h || attrs_.pad_bottom >= extent_h || attrs_.pad_left >= extent_w ||
        attrs_.pad_right >= extent_w)
        throw ConvError("every pad must be smaller than the pooling window");
}

// Per plane: every input row is copied into a row padded with the type's lowest value (padding
// never wins over an input pixel), its window maxima are taken at the output
// columns (`rows`, [in_h, Wo]), then every output row is the maximum of its window's rows there.
template <typename T>
void MaxPoolKernel::run(const T* x, int64_t batch, int64_t channels, int64_t in_h, int64_t in_w, T* y) const {
    int64_t out_h = 0, out_w = 0;
    output_size(attrs_, in_h, in_w, &out_h, &out_w);
    // Locals and restrict pointers: stores through a byte pointer may alias anything, and the
    // compiler would reload every bound from memory instead of vectorizing.
    const int64_t kernel_h = attrs_.kernel_h, kernel_w = attrs_.kernel_w, stride_h = attrs_.stride_h;
    const int64_t stride_w = attrs_.stride_w, dilation_h = attrs_.dilation_h, dilation_w = attrs_.dilation_w;
    const int64_t pad_top = attrs_.pad_top, pad_left = attrs_.pad_left;
    const int64_t padded_w = pad_left + in_w + attrs_.pad_right;
    const int64_t span = (out_w - 1) * stride_w + 1;  // columns where an output window starts
    const T lowest = std::numeric_limits<T>::lowest();
    parallel_for(batch * channels, num_threads(), [=](int64_t plane, int) {  // by value: see above
        const T* __restrict src = x + plane * in_h * in_w;
        T* __restrict dst = y + plane * out_h * out_w;
        std::vector<T> row_buffer(static_cast<size_t>(in_h * out_w));
        std::vector<T> padded_buffer(static_cast<size_t>(padded_w), lowest);
        std::vector<T> maxima_buffer(static_cast<size_t>(span));
        T* __restrict rows = row_buffer.data();
        T* __restrict padded = padded_buffer.data();
        T* __restrict maxima = maxima_buffer.data();
        for (int64_t r = 0; r < in_h; ++r) {
            std::memcpy(padded + pad_left, src + r * in_w, static_cast<size_t>(in_w) * sizeof(T));
            // the window maximum at every column (contiguous: vectorizes), then every stride-th
            std::memcpy(maxima, padded, static_cast<size_t>(span) * sizeof(T));
            for (int64_t k = 1; k < kernel_w; ++k) {
                const T* __restrict shifted = padded + k * dilation_w;
                for (int64_t j = 0; j < span; ++j) maxima[j] = std::max(maxima[j], shifted[j]);
            }
            T* __restrict row = rows + r * out_w;
            for (int64_t ow = 0; ow < out_w; ++ow) row[ow] = maxima[ow * stride_w];
        }
        for (int64_t oh = 0; oh < out_h; ++oh) {
            T* __restrict out = dst + oh * out_w;
            bool first = true;
            for (int64_t k = 0; k < kernel_h; ++k) {
                const int64_t r = oh * stride_h - pad_top + k * dilation_h;
                if (r < 0 || r >= in_h) continue;
                const T* __restrict row = rows + r * out_w;
                if (first)
                    std::memcpy(out, row, static_cast<size_t>(out_w) * sizeof(T));
                else
                    for (int64_t ow = 0; ow < out_w; ++ow) out[ow] = std::max(out[ow], row[ow]);
                first = false;
            }
            // dilated taps may all fall in the padding (kernel 2, dilation 3, one input row): as
            // onnxruntime, the maximum over no pixel is the type's lowest value
            if (first) std::fill(out, out + out_w, lowest);
        }
    });
}

template void MaxPoolKernel::run<float>(const float*, int64_t, int64_t, int64_t, int64_t, float*) const;
template void MaxPoolKernel::run<uint8_t>(const uint8_t*, int64_t, int64_t, int64_t, int64_t, uint8_t*) const;
template void MaxPoolKernel::run<int8_t>(const int8_t*, int64_t, int64_t, int64_t, int64_t, int8_t*) const;

}  // namespace onnxsparse
