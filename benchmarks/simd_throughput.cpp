// How many multiply instructions per cycle this CPU issues: vpmaddubsw, vpmaddwd, vfmadd231ps,
// alone and mixed, each over 12 independent accumulators (so that latency does not limit them).
// The 8-bit kernels' design rests on these figures (kernels/README.md, "The 8-bit path").
//
//     g++ -O2 benchmarks/simd_throughput.cpp -o /tmp/simd_throughput && /tmp/simd_throughput
//
// The clock is measured first with a chain of dependent adds (one per cycle).
#include <immintrin.h>

#include <chrono>
#include <cstdio>

#include "cpu_clock.h"

#define OPS12(A, B)                                                                                              \
    A " %12, %0, %0\n\t" B " %12, %1, %1\n\t" A " %12, %2, %2\n\t" B " %12, %3, %3\n\t" A " %12, %4, %4\n\t" B \
      " %12, %5, %5\n\t" A " %12, %6, %6\n\t" B " %12, %7, %7\n\t" A " %12, %8, %8\n\t" B " %12, %9, %9\n\t" A   \
      " %12, %10, %10\n\t" B " %12, %11, %11"

#define MEASURE(name, A, B)                                                                                        \
    {                                                                                                              \
        __m256i r0 = one, r1 = one, r2 = one, r3 = one, r4 = one, r5 = one, r6 = one, r7 = one, r8 = one, r9 = one, \
                r10 = one, r11 = one;                                                                              \
        const auto start = std::chrono::steady_clock::now();                                                      \
        for (long i = 0; i < kIterations; ++i)                                                                     \
            asm volatile(OPS12(A, B)                                                                               \
                         : "+x"(r0), "+x"(r1), "+x"(r2), "+x"(r3), "+x"(r4), "+x"(r5), "+x"(r6), "+x"(r7), "+x"(r8), \
                           "+x"(r9), "+x"(r10), "+x"(r11)                                                          \
                         : "x"(one));                                                                              \
        const double per_cycle = 12.0 * kIterations / seconds_since(start) / hz;                                   \
        std::printf("%-28s %.2f per cycle\n", name, per_cycle);                                                    \
        sink = _mm256_add_epi32(sink, _mm256_add_epi32(r0, r11));                                                  \
    }

__attribute__((target("avx2,fma"))) int main() {
    constexpr long kIterations = 50000000;
    const double hz = clock_hz(500000000);
    std::printf("clock: %.2f GHz\n", hz / 1e9);
    const __m256i one = _mm256_set1_epi8(1);
    __m256i sink = _mm256_setzero_si256();
    MEASURE("vpmaddubsw", "vpmaddubsw", "vpmaddubsw")
    MEASURE("vpmaddwd", "vpmaddwd", "vpmaddwd")
    MEASURE("vpmaddubsw + vpmaddwd", "vpmaddubsw", "vpmaddwd")
    MEASURE("vfmadd231ps", "vfmadd231ps", "vfmadd231ps")
    MEASURE("vfmadd231ps + vpmaddubsw", "vfmadd231ps", "vpmaddubsw")
    MEASURE("vpmaddubsw + vpaddw", "vpmaddubsw", "vpaddw")
    return _mm256_extract_epi32(sink, 0) == 12345;
}
