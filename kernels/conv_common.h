// Shared pieces of the sparse convolution kernels: geometry, the sparse weight encoding, the
// run-time SIMD level and OpenMP thread count. No Python here (bindings.cpp holds that).
//
// The plan every kernel follows (kernels/README.md has the why):
//  * The input is "prepared" once per run: padded and split into stride phases, so that every
//    kernel position (kh, kw) becomes a constant offset into a flattened plane of width Wq and a
//    strided conv becomes a shifted 1x1 conv. Outputs are computed in that "wide" pixel space
//    (q = oh * Wq + ow, ow < Wq) and the columns ow >= Wo are dropped by the epilogue.
//  * The weight becomes a list of row blocks. A block is `rows` consecutive output channels of
//    one group sharing one list of terms (input channel, kernel position); its weights are
//    term-major with `stride` values per term (rows padded with zeros up to the stride).
//    1xN block sparsity gives blocks of N rows; a general zero pattern gives one-row blocks (CSR).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace onnxsparse {

enum class SimdLevel { scalar, avx2 };

bool cpu_has_avx2();
SimdLevel simd_level();
void set_simd_level(const std::string& level);  // "avx2" | "scalar" | "auto"; std::invalid_argument
std::string simd_level_name();
int num_threads();
void set_num_threads(int threads);

// Run fn(item, thread) for item in [0, items) on `threads` threads of the kernel pool (thread 0
// is the caller; thread < threads). The caller never waits for a worker that has not started: on a busy
// machine a descheduled worker costs nothing (an OpenMP barrier would wait a whole time slice).
// A second concurrent caller runs its items alone.
void parallel_for(int64_t items, int threads, const std::function<void(int64_t, int)>& fn);

// Thrown for user errors; the bindings turn it into ValueError.
struct ConvError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

struct ConvAttrs {
    int64_t out_channels = 0, channels_per_group = 0, kernel_h = 0, kernel_w = 0;
    int64_t stride_h = 1, stride_w = 1, pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
    int64_t dilation_h = 1, dilation_w = 1, groups = 1;

    void validate() const;
    int64_t kernel_positions() const { return kernel_h * kernel_w; }
    int64_t fan_in() const { return channels_per_group * kernel_positions(); }  // weights per output channel
    int64_t in_channels() const { return channels_per_group * groups; }
    int64_t out_per_group() const { return out_channels / groups; }
    // A 1x1 unpadded conv on a 1x1 input (a Gemm or MatMul row): one output pixel per image.
    bool one_pixel(int64_t in_h, int64_t in_w) const {
        return in_h == 1 && in_w == 1 && kernel_h == 1 && kernel_w == 1 && pad_top == 0 && pad_left == 0 &&
               pad_bottom == 0 && pad_right == 0;
    }
};

// Where one run's input lives and how wide output pixels map to it.
struct Geometry {
    int64_t batch = 0, channels = 0, in_h = 0, in_w = 0, out_h = 0, out_w = 0;
    int64_t plane_h = 0, plane_w = 0;      // Hq, Wq: one stride phase of the padded input
    int64_t phases = 1;                    // stride phases materialized (only those some tap uses)
    int64_t channel_stride = 0;            // elements between channels of the prepared input
    std::vector<int64_t> phase_of_tap;     // [kh * KW + kw] -> materialized phase index
    std::vector<int64_t> phase_row, phase_col;  // per materialized phase: its (row, col) phase
    std::vector<int64_t> tap_offset;       // [kh * KW + kw] -> offset within a channel's prepared planes
    int64_t wide_pixels = 0;               // Ho * Wq
    bool direct = false;                   // the input itself is the prepared form (no copy)
    int64_t prepared_size = 0;             // elements of the prepared buffer (slack included)
};

// Output spatial size; throws ConvError when the kernel does not fit the padded input.
void output_size(const ConvAttrs& attrs, int64_t in_h, int64_t in_w, int64_t* out_h, int64_t* out_w);

// `chunk`: pixels one micro-kernel call computes (reads may run that far past the last pixel);
// `allow_direct`: the input may serve as is when no padding/phase split/conversion is needed.
Geometry make_geometry(const ConvAttrs& attrs, int64_t batch, int64_t channels, int64_t in_h, int64_t in_w,
                       int64_t chunk, bool allow_direct);

// Copy x [N, C, H, W] into the prepared layout (padding and phases), converting each value
// with `convert` (`Identity`: copied as is, whole rows at a time); pads become `pad_value`.
// Parallel over (n, c).
struct Identity {
    template <typename T>
    T operator()(T v) const {
        return v;
    }
};
template <typename In, typename Out, typename Convert>
void prepare_input(const ConvAttrs& attrs, const Geometry& geo, const In* x, Out* prepared, Out pad_value,
                   Convert convert);

struct Block {
    int64_t group = 0, out0 = 0, rows = 0, stride = 0;
    int64_t term_begin = 0, term_end = 0;  // into Encoding::terms (for q8: 2 terms per pair)
    int64_t weight_begin = 0;              // into the kernel's weight array
};

// The sparse form of a weight, built from the dense [O, C/g, kh, kw] weight.
struct Encoding {
    std::string name;           // "dense", "block16", "block8", "block4" or "csr"
    int64_t nonzeros = 0;
    std::vector<Block> blocks;
    std::vector<int64_t> terms;  // term codes: channel_in_group * KK + kernel position
};

// `paired`: terms of a block are grouped two by two (odd count: the last term repeats with a
// zero weight), for the int16 pair multiply of the 8-bit kernels. `weights_out` gets, per term
// (or pair), `stride` weights (or stride weight pairs).
template <typename W, typename Packed>
Encoding encode_weight(const ConvAttrs& attrs, const W* weight, bool paired, std::vector<Packed>* weights_out);

// Offsets of every term for this geometry (relative to its group's first channel).
std::vector<int64_t> term_offsets(const ConvAttrs& attrs, const Geometry& geo, const Encoding& encoding);

// Work split: (batch, pixel tile, block) items, tiles about `target` wide pixels.
// Tiles start at multiples of `chunk` (only the last one ends in a partial chunk).
struct Tiling {
    int64_t tiles = 1, items = 0, max_tile = 0, chunks = 1, chunk = 1;
    int64_t tile_begin(int64_t tile, int64_t wide_pixels) const {
        return std::min(wide_pixels, tile * chunks / tiles * chunk);
    }
};
Tiling make_tiling(const Geometry& geo, int64_t blocks, int64_t target, int64_t chunk);

// Visit the runs of valid output pixels of wide range [q0, q1): fn(wide_index, out_index, length).
template <typename Fn>
inline void for_each_output_run(const Geometry& geo, int64_t q0, int64_t q1, Fn fn) {
    if (geo.plane_w == geo.out_w) {
        fn(q0, q0, q1 - q0);
        return;
    }
    for (int64_t row = q0 / geo.plane_w; row * geo.plane_w < q1; ++row) {
        int64_t begin = std::max(q0, row * geo.plane_w), end = std::min(q1, row * geo.plane_w + geo.out_w);
        if (end > begin) fn(begin, row * geo.out_w + (begin - row * geo.plane_w), end - begin);
    }
}

// Aligned, uninitialized buffer (prepared inputs, scratch).
template <typename T>
class Buffer {
  public:
    explicit Buffer(size_t count) : data_(static_cast<T*>(std::aligned_alloc(64, round_up(count)))) {
        if (!data_) throw std::bad_alloc();
    }
    ~Buffer() { std::free(data_); }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    T* get() const { return data_; }

  private:
    static size_t round_up(size_t count) { return (std::max<size_t>(count, 1) * sizeof(T) + 63) / 64 * 64; }
    T* data_;
};

// Buffers of one run kept for the next run of the same kernel: the prepared input, the term
// offsets for this input size and per-thread scratch. Reallocating them every run costs page
// faults (a fresh 500 KB buffer: ~0.3 ms here). A concurrent run of the same kernel uses its own.
template <typename Prepared, typename Scratch>
struct RunCache {
    int64_t batch = -1, in_h = -1, in_w = -1;
    std::vector<int64_t> offsets;
    std::unique_ptr<Buffer<Prepared>> prepared;
    size_t prepared_size = 0;
    std::vector<std::unique_ptr<Buffer<Scratch>>> scratches;
    size_t scratch_size = 0;

    // True when the offsets must be computed again (a new input size).
    bool resize_input(int64_t new_batch, int64_t new_h, int64_t new_w) {
        if (batch == new_batch && in_h == new_h && in_w == new_w) return false;
        batch = new_batch;
        in_h = new_h;
        in_w = new_w;
        return true;
    }
    Prepared* prepared_buffer(size_t size) {
        if (!prepared || prepared_size < size) {
            prepared = std::make_unique<Buffer<Prepared>>(size);
            prepared_size = size;
        }
        return prepared->get();
    }
    // Call before the parallel loop; then scratch(thread) from any thread.
    void reserve_scratch(int threads, size_t size) {
        if (static_cast<int>(scratches.size()) < threads || scratch_size < size) {
            scratches.clear();
            scratches.resize(threads);
            scratch_size = size;
        }
    }
    Scratch* scratch(int thread) {
        if (!scratches[thread]) scratches[thread] = std::make_unique<Buffer<Scratch>>(scratch_size);
        return scratches[thread]->get();
    }
};

}  // namespace onnxsparse

#include "conv_common_templates.h"
