#include "conv_common.h"

#include <immintrin.h>
#include <omp.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace onnxsparse {

namespace {

SimdLevel initial_level() {
    const char* forced = std::getenv("ONNXSPARSE_SIMD");
    if (forced && std::string(forced) == "scalar") return SimdLevel::scalar;
    return cpu_has_avx2() ? SimdLevel::avx2 : SimdLevel::scalar;
}

SimdLevel current_level = initial_level();
int current_threads = 0;  // 0: OpenMP's default

}  // namespace

bool cpu_has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

SimdLevel simd_level() { return current_level; }

std::string simd_level_name() { return current_level == SimdLevel::avx2 ? "avx2" : "scalar"; }

void set_simd_level(const std::string& level) {
    if (level == "scalar") {
        current_level = SimdLevel::scalar;
    } else if (level == "avx2") {
        if (!cpu_has_avx2()) throw ConvError("this CPU has no AVX2+FMA; use 'scalar' or 'auto'");
        current_level = SimdLevel::avx2;
    } else if (level == "auto") {
        current_level = cpu_has_avx2() ? SimdLevel::avx2 : SimdLevel::scalar;
    } else {
        throw ConvError("SIMD level must be 'avx2', 'scalar' or 'auto', got '" + level + "'");
    }
}

int num_threads() { return current_threads > 0 ? current_threads : omp_get_max_threads(); }

void set_num_threads(int threads) {
    if (threads < 1) throw ConvError("the number of threads must be >= 1, got " + std::to_string(threads));
    current_threads = threads;
}

namespace {

// Workers sleep on a condition variable between jobs (after a short spin). A job's items are
// split into one contiguous range per participant (the caller and each worker); a participant
// runs its own range, then takes what is left of the others'. Items are ordered (image, pixel
// tile, row block), so a thread computes the same pixels in consecutive layers and finds their
// input in its own cache; a late or descheduled worker's range is still taken by the others.
// The caller closes the job when the items run out and then waits only for workers that joined.
class ThreadPool {
  public:
    void run(int64_t items, const std::function<void(int64_t, int)>& fn, int threads) {
        std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
        if (!busy.owns_lock() || threads <= 1 || items <= 1) {
            for (int64_t item = 0; item < items; ++item) fn(item, 0);
            return;
        }
        resize(threads - 1);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            job_ = &fn;
            parts_ = threads;
            for (int part = 0; part < threads; ++part) {
                ranges_[part].next.store(items * part / threads);
                ranges_[part].end = items * (part + 1) / threads;
            }
            generation_.fetch_add(1);
        }
        wake_.notify_all();
        drain(fn, 0, threads);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            job_ = nullptr;
        }
        for (int spin = 0; active_.load() != 0; ++spin) {
            if (spin < 4096)
                _mm_pause();
            else
                std::this_thread::yield();
        }
    }

  private:
    struct Worker {
        std::atomic<bool> stop{false};
    };
    struct alignas(64) Range {
        std::atomic<int64_t> next{0};
        int64_t end = 0;
    };

    // Participant `part`: its own range first, then the others' remainders.
    void drain(const std::function<void(int64_t, int)>& fn, int part, int parts) {
        for (int k = 0; k < parts; ++k) {
            Range& range = ranges_[(part + k) % parts];
            for (int64_t item; (item = range.next.fetch_add(1)) < range.end;) fn(item, part);
        }
    }

    void resize(int workers) {
        if (static_cast<int>(workers_.size()) == workers) return;
        for (auto& worker : workers_) worker->stop.store(true);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            generation_.fetch_add(1);
        }
        wake_.notify_all();
        workers_.clear();  // the stopped threads are detached and exit on their own
        ranges_.reset(new Range[workers + 1]);
        for (int index = 1; index <= workers; ++index) {
            auto worker = std::make_shared<Worker>();
            workers_.push_back(worker);
            std::thread([this, worker, index] { loop(*worker, index); }).detach();
        }
    }

    void loop(Worker& worker, int index) {
        uint64_t seen = generation_.load();
        for (;;) {
            for (int spin = 0; spin < 20000 && generation_.load() == seen; ++spin) _mm_pause();
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [&] { return generation_.load() != seen; });
            seen = generation_.load();
            if (worker.stop.load()) return;
            if (!job_) continue;
            const std::function<void(int64_t, int)>* job = job_;
            const int parts = parts_;
            active_.fetch_add(1);
            lock.unlock();
            if (index < parts) drain(*job, index, parts);
            active_.fetch_sub(1);
        }
    }

    std::mutex busy_, mutex_;
    std::condition_variable wake_;
    std::atomic<uint64_t> generation_{0};
    const std::function<void(int64_t, int)>* job_ = nullptr;
    int parts_ = 0;
    std::unique_ptr<Range[]> ranges_;
    std::atomic<int> active_{0};
    std::vector<std::shared_ptr<Worker>> workers_;
};

ThreadPool& pool() {
    static ThreadPool* instance = new ThreadPool();  // never destroyed: workers may outlive exit
    return *instance;
}

}  // namespace

void parallel_for(int64_t items, int threads, const std::function<void(int64_t, int)>& fn) {
    pool().run(items, fn, threads);
}

void ConvAttrs::validate() const {
    if (groups < 1) throw ConvError("groups must be >= 1");
    if (out_channels < 1 || channels_per_group < 1 || kernel_h < 1 || kernel_w < 1)
        throw ConvError("the weight must have a nonzero size in every dimension");
    if (out_channels % groups)
        throw ConvError("groups (" + std::to_string(groups) + ") must divide the output channels (" +
                        std::to_string(out_channels) + ")");
    if (stride_h < 1 || stride_w < 1) throw ConvError("strides must be >= 1");
    if (dilation_h < 1 || dilation_w < 1) throw ConvError("dilations must be >= 1");
    if (pad_top < 0 || pad_left < 0 || pad_bottom < 0 || pad_right < 0) throw ConvError("pads must be >= 0");
    constexpr int64_t limit = int64_t(1) << 20;
    for (int64_t v : {stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left, pad_bottom, pad_right, kernel_h,
                      kernel_w})
        if (v > limit) throw ConvError("strides, dilations, pads and kernel sizes must be below 2**20");
}

void output_size(const ConvAttrs& attrs, int64_t in_h, int64_t in_w, int64_t* out_h, int64_t* out_w) {
    const int64_t extent_h = (attrs.kernel_h - 1) * attrs.dilation_h + 1;
    const int64_t extent_w = (attrs.kernel_w - 1) * attrs.dilation_w + 1;
    const int64_t padded_h = in_h + attrs.pad_top + attrs.pad_bottom, padded_w = in_w + attrs.pad_left + attrs.pad_right;
    if (in_h < 1 || in_w < 1 || extent_h > padded_h || extent_w > padded_w)
        throw ConvError("the kernel (extent " + std::to_string(extent_h) + "x" + std::to_string(extent_w) +
                        " with dilations) is larger than the padded input (" + std::to_string(padded_h) + "x" +
                        std::to_string(padded_w) + ")");
    *out_h = (padded_h - extent_h) / attrs.stride_h + 1;
    *out_w = (padded_w - extent_w) / attrs.stride_w + 1;
}

Geometry make_geometry(const ConvAttrs& attrs, int64_t batch, int64_t channels, int64_t in_h, int64_t in_w,
                       int64_t chunk, bool allow_direct) {
    Geometry geo;
    geo.batch = batch;
    geo.channels = channels;
    geo.in_h = in_h;
    geo.in_w = in_w;
    output_size(attrs, in_h, in_w, &geo.out_h, &geo.out_w);
    const int64_t kk = attrs.kernel_positions();
    const bool unpadded = attrs.pad_top == 0 && attrs.pad_left == 0 && attrs.pad_bottom == 0 && attrs.pad_right == 0;
    geo.direct = allow_direct && unpadded && attrs.stride_h == 1 && attrs.stride_w == 1 && attrs.kernel_w == 1 &&
                 geo.out_h * in_w >= chunk;
    if (geo.direct) {
        geo.plane_h = in_h;
        geo.plane_w = in_w;
    } else {
        geo.plane_h = (in_h + attrs.pad_top + attrs.pad_bottom + attrs.stride_h - 1) / attrs.stride_h;
        geo.plane_w = (in_w + attrs.pad_left + attrs.pad_right + attrs.stride_w - 1) / attrs.stride_w;
    }
    geo.phase_of_tap.assign(kk, -1);
    geo.tap_offset.assign(kk, 0);
    geo.phases = 0;
    for (int64_t kh = 0; kh < attrs.kernel_h; ++kh)
        for (int64_t kw = 0; kw < attrs.kernel_w; ++kw) {
            const int64_t row = kh * attrs.dilation_h, col = kw * attrs.dilation_w;
            const int64_t row_phase = row % attrs.stride_h, col_phase = col % attrs.stride_w;
            int64_t phase = -1;
            for (int64_t p = 0; p < geo.phases; ++p)
                if (geo.phase_row[p] == row_phase && geo.phase_col[p] == col_phase) phase = p;
            if (phase < 0) {
                phase = geo.phases++;
                geo.phase_row.push_back(row_phase);
                geo.phase_col.push_back(col_phase);
            }
            geo.phase_of_tap[kh * attrs.kernel_w + kw] = phase;
            geo.tap_offset[kh * attrs.kernel_w + kw] =
                phase * geo.plane_h * geo.plane_w + (row / attrs.stride_h) * geo.plane_w + col / attrs.stride_w;
        }
    geo.channel_stride = geo.phases * geo.plane_h * geo.plane_w;
    geo.wide_pixels = geo.out_h * geo.plane_w;
    const int64_t planes = batch * channels;
    if (geo.direct) {
        geo.prepared_size = planes * geo.channel_stride;
    } else {
        const int64_t max_tap = *std::max_element(geo.tap_offset.begin(), geo.tap_offset.end());
        const int64_t last_read = max_tap + (geo.wide_pixels + chunk - 1) / chunk * chunk + chunk;
        geo.prepared_size = planes * geo.channel_stride + std::max<int64_t>(0, last_read - geo.channel_stride) + 64;
    }
    constexpr int64_t max_elements = int64_t(1) << 40;
    if (geo.prepared_size > max_elements) throw ConvError("the input is too large");
    return geo;
}

std::vector<int64_t> term_offsets(const ConvAttrs& attrs, const Geometry& geo, const Encoding& encoding) {
    const int64_t kk = attrs.kernel_positions();
    std::vector<int64_t> offsets(encoding.terms.size());
    for (size_t t = 0; t < offsets.size(); ++t) {
        const int64_t code = encoding.terms[t];
        offsets[t] = (code / kk) * geo.channel_stride + geo.tap_offset[code % kk];
    }
    return offsets;
}

Tiling make_tiling(const Geometry& geo, int64_t blocks, int64_t target, int64_t chunk) {
    Tiling tiling;
    tiling.chunk = chunk;
    tiling.chunks = std::max<int64_t>(1, (geo.wide_pixels + chunk - 1) / chunk);
    const int64_t per_tile = std::max<int64_t>(1, target / chunk);
    tiling.tiles = (tiling.chunks + per_tile - 1) / per_tile;
    tiling.items = geo.batch * tiling.tiles * blocks;
    tiling.max_tile = (tiling.chunks + tiling.tiles - 1) / tiling.tiles * chunk;
    return tiling;
}

}  // namespace onnxsparse
