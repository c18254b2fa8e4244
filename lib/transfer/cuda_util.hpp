// Small helpers shared by the CUDA engine and the engine-side export:
// error messages that name the call and the device, device UUIDs, and the
// allocation that contains a device pointer. Compiled by g++ (CUDA builds).
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace kvlink::transfer::cuda {

using Uuid = std::array<std::byte, 16>;

// "cudaIpcOpenMemHandle on device 1 failed: cudaErrorInvalidValue (invalid argument)".
std::string error(const char* call, int device, cudaError_t e);
// Without a device (e.g. cudaGetDeviceCount).
std::string error(const char* call, cudaError_t e);

// "GPU-8f1c2b3a-..." as nvidia-smi -L prints it.
std::string uuid_string(const Uuid& uuid);

// The UUID of device `ordinal`; "" or why not.
std::string device_uuid(int ordinal, Uuid& out);

// The allocation containing device pointer `p` (cuMemGetAddressRange,
// reached through the runtime so nothing links libcuda); "" or why not.
std::string allocation_range(const void* p, std::uint64_t& base, std::uint64_t& size);

}  // namespace kvlink::transfer::cuda
