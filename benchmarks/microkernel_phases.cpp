// How this machine's slow phases slow the float micro-kernel (kernels/README.md, "Inside the model").
// Each round measures the clock (a chain of dependent adds, one per cycle) and then, one thread,
// best of 100 runs, two uses of a copy of kernels/conv_f32.cpp's 4x24 micro-kernel:
//   layer: as a 1x1 1024->256 14x14 conv at 80% 1x16 calls it (16 blocks, each with its own 205
//          of the 1024 input channels, 48-pixel tiles, term slices of 128, 4-row slices), so the
//          input runs stream from L2 on the first row slice of each chunk;
//   L1:    the same calls with every term reading one input run that stays in L1.
// Cycles per term are at the measured clock; 6 is the FMA peak (12 FMAs, two per cycle).
//
//     g++ -O2 benchmarks/microkernel_phases.cpp -o /tmp/phases && /tmp/phases [rounds, default 10]
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#include "cpu_clock.h"

namespace {

// chunk4_avx2<3> of kernels/conv_f32.cpp: 4 rows x 24 pixels, weights broadcast.
__attribute__((noinline, target("avx2,fma"))) void chunk4(const float* x, const int64_t* offsets, int64_t terms,
                                                          const float* weights, int64_t stride, float* out,
                                                          int64_t out_stride) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
    for (int64_t t = 0; t < terms; ++t) {
        const float* in = x + offsets[t];
        const __m256 x0 = _mm256_loadu_ps(in), x1 = _mm256_loadu_ps(in + 8), x2 = _mm256_loadu_ps(in + 16);
        const float* w = weights + t * stride;
        __m256 wr = _mm256_broadcast_ss(w);
        a00 = _mm256_fmadd_ps(wr, x0, a00), a01 = _mm256_fmadd_ps(wr, x1, a01), a02 = _mm256_fmadd_ps(wr, x2, a02);
        wr = _mm256_broadcast_ss(w + 1);
        a10 = _mm256_fmadd_ps(wr, x0, a10), a11 = _mm256_fmadd_ps(wr, x1, a11), a12 = _mm256_fmadd_ps(wr, x2, a12);
        wr = _mm256_broadcast_ss(w + 2);
        a20 = _mm256_fmadd_ps(wr, x0, a20), a21 = _mm256_fmadd_ps(wr, x1, a21), a22 = _mm256_fmadd_ps(wr, x2, a22);
        wr = _mm256_broadcast_ss(w + 3);
        a30 = _mm256_fmadd_ps(wr, x0, a30), a31 = _mm256_fmadd_ps(wr, x1, a31), a32 = _mm256_fmadd_ps(wr, x2, a32);
    }
    const __m256 rows[4][3] = {{a00, a01, a02}, {a10, a11, a12}, {a20, a21, a22}, {a30, a31, a32}};
    for (int r = 0; r < 4; ++r)
        for (int v = 0; v < 3; ++v) _mm256_storeu_ps(out + r * out_stride + 8 * v, rows[r][v]);
}

struct Layer {
    static constexpr int64_t kChannels = 1024, kTerms = 205, kBlocks = 16, kPlane = 196, kTile = 48, kChunk = 24;
    std::vector<float> x = std::vector<float>(kChannels * kPlane + 64, 0.5f);
    std::vector<float> out = std::vector<float>(16 * 128);
    std::vector<std::vector<float>> weights;
    std::vector<std::vector<int64_t>> offsets, same;

    Layer() {
        std::mt19937 rng(0);
        for (int64_t b = 0; b < kBlocks; ++b) {
            std::vector<int64_t> channels(kChannels);
            for (int64_t c = 0; c < kChannels; ++c) channels[c] = c;
            std::shuffle(channels.begin(), channels.end(), rng);
            channels.resize(kTerms);
            std::sort(channels.begin(), channels.end());
            std::vector<int64_t> block(kTerms);
            for (int64_t t = 0; t < kTerms; ++t) block[t] = channels[t] * kPlane;
            offsets.push_back(block);
            same.push_back(std::vector<int64_t>(kTerms, 0));
            weights.push_back(std::vector<float>(kTerms * 16, 0.01f));
        }
    }

    // seconds for the best of `runs` passes, and the term visits of one pass
    double time(bool l1_only, int runs, double* visits) {
        double best = 1e9;
        for (int run = 0; run < runs; ++run) {
            const auto start = std::chrono::steady_clock::now();
            for (int64_t q0 = 0; q0 + kTile <= 192; q0 += kTile)
                for (int64_t b = 0; b < kBlocks; ++b)
                    for (int64_t q = q0; q < q0 + kTile; q += kChunk)
                        for (int64_t first = 0; first < kTerms; first += 128)
                            for (int64_t row = 0; row < 16; row += 4)
                                chunk4(x.data() + q, (l1_only ? same : offsets)[b].data() + first,
                                       std::min<int64_t>(128, kTerms - first), weights[b].data() + first * 16 + row,
                                       16, out.data() + row * 128 + (q - q0), 128);
            best = std::min(best, seconds_since(start));
        }
        *visits = 192.0 / kChunk * kBlocks * kTerms * 4;
        return best;
    }
};

}  // namespace

int main(int argc, char** argv) {
    const int rounds = argc > 1 ? std::atoi(argv[1]) : 10;
    Layer layer;
    std::printf("round  clock GHz  layer cycles/term  L1 cycles/term  (FMA peak: 6)\n");
    for (int round = 0; round < rounds; ++round) {
        const double hz = clock_hz(100000000);
        double visits = 0;
        const double layer_s = layer.time(false, 100, &visits), l1_s = layer.time(true, 100, &visits);
        std::printf("%5d  %9.2f  %17.1f  %14.1f\n", round, hz / 1e9, layer_s * hz / visits, l1_s * hz / visits);
        std::fflush(stdout);
        std::this_thread::sleep_for(std::chrono::seconds(2));
    }
}
