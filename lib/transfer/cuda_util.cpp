#include "cuda_util.hpp"

#include <cuda.h>  // driver API types only; the function comes from the runtime

#include <cstring>
#include <fmt/format.h>

namespace kvlink::transfer::cuda {

std::string error(const char* call, int device, cudaError_t e) {
  return fmt::format("{} on CUDA device {} failed: {} ({})", call, device, cudaGetErrorName(e), cudaGetErrorString(e));
}

std::string error(const char* call, cudaError_t e) {
  return fmt::format("{} failed: {} ({})", call, cudaGetErrorName(e), cudaGetErrorString(e));
}

Error failure(const char* call, int device, cudaError_t e) { return Error(errc::server_error, error(call, device, e)); }

Error failure(const char* call, cudaError_t e) { return Error(errc::server_error, error(call, e)); }

std::string uuid_string(const Uuid& u) {
  auto b = [&](std::size_t i) { return static_cast<unsigned>(u[i]); };
  return fmt::format("GPU-{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
                     b(0), b(1), b(2), b(3), b(4), b(5), b(6), b(7), b(8), b(9), b(10), b(11), b(12), b(13), b(14),
                     b(15));
}

Result<Uuid> device_uuid(int ordinal) {
  cudaDeviceProp prop{};
  if (auto e = cudaGetDeviceProperties(&prop, ordinal); e != cudaSuccess)
    return failure("cudaGetDeviceProperties", ordinal, e);
  static_assert(sizeof(prop.uuid) == sizeof(Uuid));
  Uuid out{};
  std::memcpy(out.data(), &prop.uuid, out.size());
  return out;
}

Result<AllocationRange> allocation_range(const void* p) {
  using GetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  // Looked up once; the 12.0 ABI of cuMemGetAddressRange (the _v2 one).
  static GetAddressRange fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &f, 12000, cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<GetAddressRange>(f);
  }();
  if (!fn)
    return Error(errc::server_error,
                 "cuMemGetAddressRange is not available from the CUDA driver (cudaGetDriverEntryPointByVersion "
                 "failed); the driver is older than CUDA 12.0");
  CUdeviceptr b = 0;
  size_t n = 0;
  if (CUresult r = fn(&b, &n, reinterpret_cast<CUdeviceptr>(p)); r != CUDA_SUCCESS)
    return Error(errc::bad_request,
                 fmt::format("cuMemGetAddressRange of {} failed with CUresult {}: not a pointer into device memory of "
                             "the current device",
                             p, static_cast<int>(r)));
  return AllocationRange{b, n};
}

}  // namespace kvlink::transfer::cuda
