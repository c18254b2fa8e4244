// Small helpers shared by the CUDA engine and the engine-side export:
// error messages that name the call and the device, device UUIDs, and the
// allocation that contains a device pointer. Compiled by g++ (CUDA builds).
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "kvlink/error.hpp"

namespace kvlink::transfer::cuda {

using Uuid = std::array<std::byte, 16>;

// "cudaIpcOpenMemHandle on device 1 failed: cudaErrorInvalidValue (invalid argument)".
std::string error(const char* call, int device, cudaError_t e);
// Without a device (e.g. cudaGetDeviceCount).
std::string error(const char* call, cudaError_t e);
// The same text as a server_error: a CUDA call failed.
Error failure(const char* call, int device, cudaError_t e);
Error failure(const char* call, cudaError_t e);

// "GPU-8f1c2b3a-..." as nvidia-smi -L prints it.
std::string uuid_string(const Uuid& uuid);

// The UUID of device `ordinal`.
Result<Uuid> device_uuid(int ordinal);

// An allocation: its base address and size in bytes.
struct AllocationRange {
  std::uint64_t base = 0;
  std::uint64_t size = 0;
};

// The allocation containing device pointer `p` (cuMemGetAddressRange,
// reached through the runtime so nothing links libcuda); bad_request when
// `p` is not device memory of the current device.
Result<AllocationRange> allocation_range(const void* p);

}  // namespace kvlink::transfer::cuda
