// Timing helpers shared by the C++ harnesses in benchmarks/ (each built on its own with g++).
#pragma once

#include <chrono>

inline double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The core clock, from a chain of dependent adds (one per cycle), 4 * `iterations` of them.
inline double clock_hz(long iterations) {
    long x = 0;
    const auto start = std::chrono::steady_clock::now();
    for (long i = 0; i < iterations; ++i) asm volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    return 4.0 * iterations / seconds_since(start);
}
