// Kernels the GPU tests and benchmarks run on the engine side: a pattern
// writer (the same bytes on host and device), a spin that delays a stream,
// and a compute loop for overlap measurements. Launchers return the launch
// error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#define KVLINK_HD __host__ __device__
#else
#define KVLINK_HD
#endif

namespace kvlink::gpu_test {

// Byte i of a buffer filled with `seed` (a cheap integer hash).
KVLINK_HD inline std::uint8_t pattern_byte(std::uint32_t seed, std::uint64_t i) {
  std::uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ (std::uint64_t{seed} << 32 | seed);
  x ^= x >> 29;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 32;
  return static_cast<std::uint8_t>(x);
}

// p[i] = pattern_byte(seed, first + i) for i in [0, n).
cudaError_t launch_fill_pattern(void* p, std::size_t n, std::uint32_t seed, std::uint64_t first, cudaStream_t s);
// Occupies one thread for `ns` nanoseconds (the GPU's global timer).
cudaError_t launch_spin(std::uint64_t ns, cudaStream_t s);
// `iters` dependent FMAs per element of `data` (n floats), on every SM.
cudaError_t launch_compute(float* data, std::size_t n, int iters, cudaStream_t s);

}  // namespace kvlink::gpu_test
