// MaxPool (ONNX semantics, floor output size): float32, uint8 and int8, NCHW.
#pragma once

#include "conv_common.h"

namespace onnxsparse {

class MaxPoolKernel {
  public:
    // kernel, strides, dilations: (h, w); pads: (top, left, bottom, right). Each pad must be smaller
    // than the window's extent (onnxruntime wants it smaller than the kernel). A window whose
    // dilated taps all fall in the padding gives the type's lowest value, as in onnxruntime.
    MaxPoolKernel(const ConvAttrs& attrs);
    // x [N, C, H, W] -> y [N, C, Ho, Wo] (output_size of the attrs).
    template <typename T>
    void run(const T* x, int64_t batch, int64_t channels, int64_t in_h, int64_t in_w, T* y) const;

    const ConvAttrs& attrs() const { return attrs_; }

  private:
    ConvAttrs attrs_;  // out_channels, channels_per_group and groups are unused (1)
};

}  // namespace onnxsparse
