// The two convolution kernels the Python module exposes (bindings.cpp validates arrays first).
#pragma once

#include <mutex>

#include "conv_common.h"

namespace onnxsparse {

// float32 conv: y = clamp(conv(x, w) + bias [+ residual], clamp_min, clamp_max), accumulated in float32.
class ConvF32Kernel {
  public:
    ConvF32Kernel(const ConvAttrs& attrs, const float* weight, const float* bias, float clamp_min, float clamp_max);
    // x [N, C, H, W]; residual (nullable) and y [N, O, Ho, Wo].
    void run(const float* x, int64_t batch, int64_t in_h, int64_t in_w, const float* residual, float* y) const;

    const ConvAttrs& attrs() const { return attrs_; }
    const Encoding& encoding() const { return encoding_; }

  private:
    void run_pixel(const float* x, int64_t batch, const float* residual, float* y) const;

    ConvAttrs attrs_;
    Encoding encoding_;
    std::vector<float> weights_, bias_;
    float clamp_min_, clamp_max_;
    mutable std::mutex cache_mutex_;
    mutable RunCache<float, float> cache_;
};

// The 8-bit residual add fused after a ConvQ8 (QLinearAdd's rule, arithmetic.py AddRescale).
struct ResidualAdd {
    int64_t factor_conv = 0, factor_residual = 0, shift = 0, residual_zero_point = 0, out_zero_point = 0;
};

// QLinearConv with the exact integer rules of docs/ARITHMETIC.md:
// acc = sum (x - x_zp) * w + bias (int32); y = sat(y_zp + rhe(acc * multiplier / 2**shift)).
class ConvQ8Kernel {
  public:
    ConvQ8Kernel(const ConvAttrs& attrs, const int8_t* weight, const int32_t* bias, int64_t x_zero_point,
                 bool x_signed, const int64_t* multiplier, const int64_t* shift, int64_t y_zero_point, bool y_signed);
    void set_residual_add(const ResidualAdd& add);
    bool has_residual_add() const { return has_add_; }
    // x, residual (nullable), y: uint8 or int8 as the signedness flags say.
    void run(const void* x, int64_t batch, int64_t in_h, int64_t in_w, const void* residual, void* y) const;

    const ConvAttrs& attrs() const { return attrs_; }
    const Encoding& encoding() const { return encoding_; }
    bool x_signed() const { return x_signed_; }
    bool y_signed() const { return y_signed_; }

  private:
    template <typename XT, typename YT>
    void run_typed(const XT* x, int64_t batch, int64_t in_h, int64_t in_w, const YT* residual, YT* y) const;
    // One output pixel per image (Gemm rows): vectorized over a block's rows.
    template <typename XT, typename YT>
    void run_pixel(const XT* x, int64_t batch, const YT* residual, YT* y) const;
    // The AVX2 unsigned-activation path (vpmaddubsw; kernels/README.md has the saturation proof).
    template <typename XT, typename YT>
    void run_u8(const XT* x, int64_t batch, int64_t in_h, int64_t in_w, const YT* residual, YT* y) const;
    void build_u8_encoding(const int8_t* weight);
    void add_quads(const Block& source, const int8_t* weight);

    ConvAttrs attrs_;
    Encoding encoding_;
    std::vector<int32_t> weight_pairs_, bias_;
    std::vector<int64_t> multiplier_, shift_;
    std::vector<double> real_multiplier_;  // multiplier * 2**-shift, exact
    int64_t x_zero_point_, y_zero_point_;
    bool x_signed_, y_signed_;
    bool has_add_ = false, float_add_ = false;
    ResidualAdd add_;

    // vpmaddubsw path: pairs of terms whose weight pairs satisfy |w0| + |w1| <= 128 on every row of
    // their block, in groups whose int16 sums cannot overflow; bias corrected for the unsigned
    // activations (bias - x_zp_u * sum w, exact in int64).
    bool u8_ok_ = false;
    int64_t u8_zero_point_ = 0;            // x_zp (uint8 input) or x_zp + 128 (int8 input)
    Encoding u8_encoding_;                 // sub-blocks of <= 4 rows of encoding_'s blocks, terms two per pair
    std::vector<int32_t> u8_weights_;      // per pair and row: bytes (w0, w1, w0, w1)
    std::vector<int32_t> u8_groups_;       // pairs per int16 group
    std::vector<int64_t> u8_group_begin_;  // per sub-block: first group (size sub-blocks + 1)
    std::vector<int64_t> u8_sub_begin_;    // per block of encoding_: first sub-block of u8_encoding_
    // quads: blocks whose 2-row sub-blocks all pair the same terms take four terms (two pairs) per
    // 32-bit lane (kernels/README.md, "Quads"): per block the number of quads (0: not a quad block)
    // and the first word of its weights, per sub-block, quad and row: bytes (w0, w1, w2, w3)
    std::vector<int64_t> u8_quads_, u8_quad_begin_;
    std::vector<int32_t> u8_quad_weights_;
    int64_t u8_max_quads_ = 0;
    std::vector<int64_t> u8_bias_;

    mutable std::mutex u8_cache_mutex_;
    mutable RunCache<uint8_t, int32_t> u8_cache_;
};

}  // namespace onnxsparse
