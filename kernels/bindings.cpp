// onnxsparse._native: the Python face of the kernels. Every array is checked here (dtype,
// rank, shape, C-contiguity) before a kernel sees a pointer; errors are ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <type_traits>

#include "conv_kernels.h"
#include "pool.h"

namespace py = pybind11;
using namespace onnxsparse;

namespace {

std::string shape_text(const py::array& array) {
    std::string text = "[";
    for (py::ssize_t i = 0; i < array.ndim(); ++i) text += (i ? ", " : "") + std::to_string(array.shape(i));
    return text + "]";
}

template <typename T>
py::array checked_array(const py::object& value, const char* name, int ndim) {
    if (!py::isinstance<py::array>(value)) throw ConvError(std::string(name) + " must be a numpy array");
    py::array array = py::reinterpret_borrow<py::array>(value);
    const py::dtype expected = py::dtype::of<T>();
    if (!array.dtype().equal(expected))
        throw ConvError(std::string(name) + " must be " + py::str(expected).cast<std::string>() + ", got " +
                        py::str(array.dtype()).cast<std::string>());
    if (array.ndim() != ndim)
        throw ConvError(std::string(name) + " must be " + std::to_string(ndim) + "-D, got shape " + shape_text(array));
    if (!(array.flags() & py::array::c_style)) throw ConvError(std::string(name) + " must be C-contiguous");
    return array;
}

// fn(T{}) for the activation types the pooling steps take (float32, uint8, int8), else ValueError.
template <typename F>
py::array by_element_type(const py::object& x, F fn) {
    if (!py::isinstance<py::array>(x)) throw ConvError("x must be a numpy array");
    const py::dtype dtype = py::reinterpret_borrow<py::array>(x).dtype();
    if (dtype.equal(py::dtype::of<float>())) return fn(float{});
    if (dtype.equal(py::dtype::of<uint8_t>())) return fn(uint8_t{});
    if (dtype.equal(py::dtype::of<int8_t>())) return fn(int8_t{});
    throw ConvError("x must be float32, uint8 or int8, got " + py::str(dtype).cast<std::string>());
}

void check_shape(const py::array& array, const char* name, const std::vector<int64_t>& expected) {
    bool same = array.ndim() == static_cast<py::ssize_t>(expected.size());
    for (size_t i = 0; same && i < expected.size(); ++i) same = array.shape(i) == expected[i];
    if (!same) {
        std::string want = "[";
        for (size_t i = 0; i < expected.size(); ++i) want += (i ? ", " : "") + std::to_string(expected[i]);
        throw ConvError(std::string(name) + " must have shape " + want + "], got " + shape_text(array));
    }
}

bool overlaps(const py::array& a, const py::array& b) {
    const char* a0 = static_cast<const char*>(a.data());
    const char* b0 = static_cast<const char*>(b.data());
    return a.nbytes() > 0 && b.nbytes() > 0 && a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// The output: a new array, or `out` when the caller gives one (a buffer it recycles). `out` must
// match in dtype and shape, be C-contiguous and writeable, and not overlap x. It may be the
// residual itself (the epilogues read each residual element before writing the same output
// element, and nothing else), but not overlap it otherwise.
template <typename T>
py::array output_array(const py::object& out, const std::vector<int64_t>& shape, const py::array& x,
                       const py::array* residual) {
    if (out.is_none()) return py::array_t<T>(shape);
    py::array y = checked_array<T>(out, "out", static_cast<int>(shape.size()));
    check_shape(y, "out", shape);
    if (!y.writeable()) throw ConvError("out must be writeable");
    if (overlaps(y, x)) throw ConvError("out must not overlap x");
    if (residual && overlaps(y, *residual) && y.data() != residual->data())
        throw ConvError("out may be the residual itself but must not partly overlap it");
    return y;
}

std::vector<int64_t> checked_ints(const std::vector<int64_t>& values, size_t count, const char* name) {
    if (values.size() != count)
        throw ConvError(std::string(name) + " must have " + std::to_string(count) + " values, got " +
                        std::to_string(values.size()));
    return values;
}

// attrs' kernel size and channels set by the caller; strides, pads and dilations checked here.
ConvAttrs with_window(ConvAttrs attrs, const std::vector<int64_t>& strides, const std::vector<int64_t>& pads,
                      const std::vector<int64_t>& dilations) {
    const auto s = checked_ints(strides, 2, "strides"), p = checked_ints(pads, 4, "pads (top, left, bottom, right)"),
               d = checked_ints(dilations, 2, "dilations");
    attrs.stride_h = s[0];
    attrs.stride_w = s[1];
    attrs.pad_top = p[0];
    attrs.pad_left = p[1];
    attrs.pad_bottom = p[2];
    attrs.pad_right = p[3];
    attrs.dilation_h = d[0];
    attrs.dilation_w = d[1];
    attrs.validate();
    return attrs;
}

ConvAttrs make_attrs(const py::array& weight, const std::vector<int64_t>& strides, const std::vector<int64_t>& pads,
                     const std::vector<int64_t>& dilations, int64_t groups) {
    ConvAttrs attrs;
    attrs.out_channels = weight.shape(0);
    attrs.channels_per_group = weight.shape(1);
    attrs.kernel_h = weight.shape(2);
    attrs.kernel_w = weight.shape(3);
    attrs.groups = groups;
    return with_window(attrs, strides, pads, dilations);
}

// Checks x against the conv and returns the output shape [N, O, Ho, Wo].
std::vector<int64_t> output_shape_of(const ConvAttrs& attrs, const std::vector<int64_t>& input_shape) {
    if (input_shape.size() != 4) throw ConvError("the input must be 4-D [N, C, H, W]");
    if (input_shape[0] < 0) throw ConvError("the batch size must be >= 0");
    if (input_shape[1] != attrs.in_channels())
        throw ConvError("the input has " + std::to_string(input_shape[1]) + " channels, the weight expects " +
                        std::to_string(attrs.in_channels()) + " (" + std::to_string(attrs.channels_per_group) +
                        " per group x " + std::to_string(attrs.groups) + " groups)");
    int64_t out_h = 0, out_w = 0;
    output_size(attrs, input_shape[2], input_shape[3], &out_h, &out_w);
    return {input_shape[0], attrs.out_channels, out_h, out_w};
}

std::vector<int64_t> shape_of(const py::array& array) {
    return std::vector<int64_t>(array.shape(), array.shape() + array.ndim());
}

py::tuple as_tuple(const std::vector<int64_t>& values) {
    py::tuple tuple(values.size());
    for (size_t i = 0; i < values.size(); ++i) tuple[i] = values[i];
    return tuple;
}

void check_weight_groups(const py::array& weight, int64_t groups) {
    if (groups < 1) throw ConvError("groups must be >= 1, got " + std::to_string(groups));
    if (weight.shape(0) % groups)
        throw ConvError("groups (" + std::to_string(groups) + ") must divide the output channels (" +
                        std::to_string(weight.shape(0)) + ")");
}

class PyConvF32 {
  public:
    PyConvF32(const py::object& weight, const py::object& bias, const std::vector<int64_t>& strides,
              const std::vector<int64_t>& pads, const std::vector<int64_t>& dilations, int64_t groups,
              double clamp_min, double clamp_max) {
        const py::array w = checked_array<float>(weight, "weight", 4);
        check_weight_groups(w, groups);
        const ConvAttrs attrs = make_attrs(w, strides, pads, dilations, groups);
        const float* bias_data = nullptr;
        py::array b;
        if (!bias.is_none()) {
            b = checked_array<float>(bias, "bias", 1);
            check_shape(b, "bias", {attrs.out_channels});
            bias_data = static_cast<const float*>(b.data());
        }
        kernel_ = std::make_unique<ConvF32Kernel>(attrs, static_cast<const float*>(w.data()), bias_data,
                                                  static_cast<float>(clamp_min), static_cast<float>(clamp_max));
    }

    py::array run(const py::object& x_value, const py::object& residual_value, const py::object& out) const {
        const py::array x = checked_array<float>(x_value, "x", 4);
        const std::vector<int64_t> out_shape = output_shape_of(kernel_->attrs(), shape_of(x));
        const float* residual = nullptr;
        py::array r;
        if (!residual_value.is_none()) {
            r = checked_array<float>(residual_value, "residual", 4);
            check_shape(r, "residual", out_shape);
            residual = static_cast<const float*>(r.data());
        }
        py::array y = output_array<float>(out, out_shape, x, residual ? &r : nullptr);
        float* y_data = static_cast<float*>(y.mutable_data());
        const float* x_data = static_cast<const float*>(x.data());
        {
            py::gil_scoped_release release;
            kernel_->run(x_data, x.shape(0), x.shape(2), x.shape(3), residual, y_data);
        }
        return y;
    }

    int64_t nonzeros() const { return kernel_->encoding().nonzeros; }
    std::string encoding() const { return kernel_->encoding().name; }
    py::tuple output_shape(const std::vector<int64_t>& input_shape) const {
        return as_tuple(output_shape_of(kernel_->attrs(), input_shape));
    }

  private:
    std::unique_ptr<ConvF32Kernel> kernel_;
};

class PyConvQ8 {
  public:
    PyConvQ8(const py::object& weight, const py::object& bias, int64_t x_zero_point, bool x_signed,
             const py::object& multiplier, const py::object& shift, int64_t y_zero_point, bool y_signed,
             const std::vector<int64_t>& strides, const std::vector<int64_t>& pads,
             const std::vector<int64_t>& dilations, int64_t groups) {
        const py::array w = checked_array<int8_t>(weight, "weight", 4);
        check_weight_groups(w, groups);
        const ConvAttrs attrs = make_attrs(w, strides, pads, dilations, groups);
        const int32_t* bias_data = nullptr;
        py::array b;
        if (!bias.is_none()) {
            b = checked_array<int32_t>(bias, "bias", 1);
            check_shape(b, "bias", {attrs.out_channels});
            bias_data = static_cast<const int32_t*>(b.data());
        }
        const py::array m = checked_array<int64_t>(multiplier, "multiplier", 1);
        check_shape(m, "multiplier", {attrs.out_channels});
        const py::array s = checked_array<int64_t>(shift, "shift", 1);
        check_shape(s, "shift", {attrs.out_channels});
        kernel_ = std::make_unique<ConvQ8Kernel>(attrs, static_cast<const int8_t*>(w.data()), bias_data, x_zero_point,
                                                 x_signed, static_cast<const int64_t*>(m.data()),
                                                 static_cast<const int64_t*>(s.data()), y_zero_point, y_signed);
    }

    void set_residual_add(int64_t factor_conv, int64_t factor_residual, int64_t shift, int64_t residual_zero_point,
                          int64_t out_zero_point) {
        kernel_->set_residual_add({factor_conv, factor_residual, shift, residual_zero_point, out_zero_point});
    }

    py::array run(const py::object& x_value, const py::object& residual_value, const py::object& out) const {
        const bool x_signed = kernel_->x_signed(), y_signed = kernel_->y_signed();
        const py::array x = x_signed ? checked_array<int8_t>(x_value, "x", 4) : checked_array<uint8_t>(x_value, "x", 4);
        const std::vector<int64_t> out_shape = output_shape_of(kernel_->attrs(), shape_of(x));
        const void* residual = nullptr;
        py::array r;
        if (residual_value.is_none() == kernel_->has_residual_add())
            throw ConvError(kernel_->has_residual_add()
                                ? "this ConvQ8 has a fused residual add: pass residual"
                                : "residual given but no residual add is set (call set_residual_add first)");
        if (!residual_value.is_none()) {
            r = y_signed ? checked_array<int8_t>(residual_value, "residual", 4)
                         : checked_array<uint8_t>(residual_value, "residual", 4);
            check_shape(r, "residual", out_shape);
            residual = r.data();
        }
        const py::array* residual_array = residual ? &r : nullptr;
        py::array y = y_signed ? output_array<int8_t>(out, out_shape, x, residual_array)
                               : output_array<uint8_t>(out, out_shape, x, residual_array);
        void* y_data = y.mutable_data();
        const void* x_data = x.data();
        {
            py::gil_scoped_release release;
            kernel_->run(x_data, x.shape(0), x.shape(2), x.shape(3), residual, y_data);
        }
        return y;
    }

    int64_t nonzeros() const { return kernel_->encoding().nonzeros; }
    std::string encoding() const { return kernel_->encoding().name; }
    py::tuple output_shape(const std::vector<int64_t>& input_shape) const {
        return as_tuple(output_shape_of(kernel_->attrs(), input_shape));
    }

  private:
    std::unique_ptr<ConvQ8Kernel> kernel_;
};

class PyMaxPool {
  public:
    PyMaxPool(const std::vector<int64_t>& kernel_shape, const std::vector<int64_t>& strides,
              const std::vector<int64_t>& pads, const std::vector<int64_t>& dilations) {
        const auto k = checked_ints(kernel_shape, 2, "kernel_shape");
        ConvAttrs window;
        window.out_channels = window.channels_per_group = window.groups = 1;
        window.kernel_h = k[0];
        window.kernel_w = k[1];
        const ConvAttrs attrs = with_window(window, strides, pads, dilations);
        kernel_ = std::make_unique<MaxPoolKernel>(attrs);
    }

    py::array run(const py::object& x_value, const py::object& residual, const py::object& out) const {
        if (!residual.is_none()) throw ConvError("MaxPool takes no residual");
        return by_element_type(x_value, [&](auto type) { return run_typed<decltype(type)>(x_value, out); });
    }

    py::tuple output_shape(const std::vector<int64_t>& input_shape) const { return as_tuple(shape_for(input_shape)); }

  private:
    std::vector<int64_t> shape_for(const std::vector<int64_t>& input_shape) const {
        if (input_shape.size() != 4) throw ConvError("the input must be 4-D [N, C, H, W]");
        if (input_shape[0] < 0 || input_shape[1] < 0) throw ConvError("the batch and channel sizes must be >= 0");
        int64_t out_h = 0, out_w = 0;
        output_size(kernel_->attrs(), input_shape[2], input_shape[3], &out_h, &out_w);
        return {input_shape[0], input_shape[1], out_h, out_w};
    }

    template <typename T>
    py::array run_typed(const py::object& x_value, const py::object& out) const {
        const py::array x = checked_array<T>(x_value, "x", 4);
        py::array y = output_array<T>(out, shape_for(shape_of(x)), x, nullptr);
        T* y_data = static_cast<T*>(y.mutable_data());
        const T* x_data = static_cast<const T*>(x.data());
        {
            py::gil_scoped_release release;
            kernel_->run<T>(x_data, x.shape(0), x.shape(1), x.shape(2), x.shape(3), y_data);
        }
        return y;
    }

    std::unique_ptr<MaxPoolKernel> kernel_;
};

// Sums over each [H, W] plane of a C-contiguous [N, C, H, W] array: float32 (eight running sums
// per plane, then added) or the exact integer sums of uint8 / int8 planes, as [N, C] float32 or
// int64. A global average pool in front of a Gemm (runtime/steps.py, GlobalAverage) divides or
// requantizes them; numpy's reductions over short rows took 70-90 us for ResNet-50's 2048x7x7.
// Lane: the type of the eight running sums (int32 for bytes while a plane's sum cannot overflow it).
template <typename T, typename Lane, typename Sum>
py::array plane_sums_of(const py::array& x) {
    const int64_t planes = x.shape(0) * x.shape(1), size = x.shape(2) * x.shape(3);
    py::array_t<Sum> out(std::vector<int64_t>{x.shape(0), x.shape(1)});
    const T* data = static_cast<const T*>(x.data());
    Sum* sums = out.mutable_data();
    for (int64_t p = 0; p < planes; ++p) {
        const T* plane = data + p * size;
        Lane lanes[8] = {};
        int64_t i = 0;
        for (; i + 8 <= size; i += 8)
            for (int k = 0; k < 8; ++k) lanes[k] += static_cast<Lane>(plane[i + k]);
        for (int k = 0; i < size; ++i, ++k) lanes[k] += static_cast<Lane>(plane[i]);
        sums[p] = static_cast<Sum>(((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                                  ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])));
    }
    return out;
}

template <typename T>
py::array byte_plane_sums(const py::array& x) {
    const bool small = x.shape(2) * x.shape(3) < (int64_t(1) << 23);  // 255 * 2**23 < 2**31
    return small ? plane_sums_of<T, int32_t, int64_t>(x) : plane_sums_of<T, int64_t, int64_t>(x);
}

py::array plane_sums(const py::object& value) {
    return by_element_type(value, [&](auto type) {
        using T = decltype(type);
        const py::array x = checked_array<T>(value, "x", 4);
        if constexpr (std::is_same<T, float>::value)
            return plane_sums_of<float, float, float>(x);
        else
            return byte_plane_sums<T>(x);
    });
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native sparse convolution kernels (OpenMP, AVX2 with a portable scalar fallback).";
    m.def("simd_level", &simd_level_name, "The SIMD path in use: 'avx2' or 'scalar'.");
    m.def("set_simd_level", &set_simd_level, py::arg("level"),
          "Choose 'avx2', 'scalar' or 'auto'; ValueError for avx2 on a CPU without AVX2+FMA.");
    m.def("set_num_threads", &set_num_threads, py::arg("n"), "OpenMP threads used by run().");
    m.def("get_num_threads", &num_threads);
    m.def("plane_sums", &plane_sums, py::arg("x"),
          "Sums over each [H, W] plane of a [N, C, H, W] array: float32 for float32, exact int64 for 8-bit.");

    const double inf = std::numeric_limits<double>::infinity();
    py::class_<PyConvF32>(m, "ConvF32", "float32 Conv (+ bias, residual, clamp) over a sparse weight.")
        .def(py::init<const py::object&, const py::object&, const std::vector<int64_t>&, const std::vector<int64_t>&,
                      const std::vector<int64_t>&, int64_t, double, double>(),
             py::arg("weight"), py::arg("bias"), py::arg("strides"), py::arg("pads"), py::arg("dilations"),
             py::arg("groups"), py::arg("clamp_min") = -inf, py::arg("clamp_max") = inf)
        .def("run", &PyConvF32::run, py::arg("x"), py::arg("residual") = py::none(), py::arg("out") = py::none())
        .def_property_readonly("nonzeros", &PyConvF32::nonzeros)
        .def_property_readonly("encoding", &PyConvF32::encoding)
        .def("output_shape", &PyConvF32::output_shape, py::arg("input_shape"));

    py::class_<PyConvQ8>(m, "ConvQ8", "QLinearConv (+ fused QLinearAdd) with exact integer requantization.")
        .def(py::init<const py::object&, const py::object&, int64_t, bool, const py::object&, const py::object&,
                      int64_t, bool, const std::vector<int64_t>&, const std::vector<int64_t>&,
                      const std::vector<int64_t>&, int64_t>(),
             py::arg("weight"), py::arg("bias"), py::arg("x_zero_point"), py::arg("x_signed"), py::arg("multiplier"),
             py::arg("shift"), py::arg("y_zero_point"), py::arg("y_signed"), py::arg("strides"), py::arg("pads"),
             py::arg("dilations"), py::arg("groups"))
        .def("set_residual_add", &PyConvQ8::set_residual_add, py::arg("factor_conv"), py::arg("factor_residual"),
             py::arg("shift"), py::arg("residual_zero_point"), py::arg("out_zero_point"))
        .def("run", &PyConvQ8::run, py::arg("x"), py::arg("residual") = py::none(), py::arg("out") = py::none())
        .def_property_readonly("nonzeros", &PyConvQ8::nonzeros)
        .def_property_readonly("encoding", &PyConvQ8::encoding)
        .def("output_shape", &PyConvQ8::output_shape, py::arg("input_shape"));

    py::class_<PyMaxPool>(m, "MaxPool", "ONNX MaxPool (floor output size) on float32, uint8 or int8 NCHW input.")
        .def(py::init<const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
                      const std::vector<int64_t>&>(),
             py::arg("kernel_shape"), py::arg("strides"), py::arg("pads"), py::arg("dilations"))
        .def("run", &PyMaxPool::run, py::arg("x"), py::arg("residual") = py::none(), py::arg("out") = py::none())
        .def("output_shape", &PyMaxPool::output_shape, py::arg("input_shape"));
}
