// The CUDA transfer engine (SPEC 5, GPU): workers register per-layer CUDA
// IPC memory handles of their paged KV tensors (transfer/cuda_export.hpp
// builds them); attach() opens them on the device with the registered
// UUID. L1 is pinned and mapped once (use_l1). Each STORE / RETRIEVE job:
// its stream waits on the engine's IPC event (no host synchronisation),
// then ONE kernel launch or ONE cudaMemcpyBatchAsync moves every block of
// every layer of the job, then a stream callback posts the completion to
// the io_context. Stores (device to host) and retrieves (host to device,
// higher priority) have their own streams, several per direction, so jobs
// overlap each other and the engine's compute. The io thread never waits
// on the GPU. The request's fence: a job is not queued after it, and one
// whose copy completed after it fails with timed_out (a queued GPU copy
// cannot be stopped, only reported).
//
// Built only with CUDA (KVLINK_HAVE_CUDA); no CUDA header here.
#pragma once

#include <asio/any_io_executor.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "kvlink/error.hpp"

#include "kvlink/transfer/transfer_engine.hpp"

namespace kvlink::transfer {

enum class CudaCopyMethod : std::uint8_t {
  batch,   // cudaMemcpyBatchAsync: the copy engines, no SMs used
  kernel,  // a gather/scatter kernel over mapped pinned L1 (16-byte accesses)
};
const char* copy_method_name(CudaCopyMethod m);
// "batch" or "kernel" (bad_request otherwise).
Result<CudaCopyMethod> parse_copy_method(std::string_view text);

struct CudaEngineConfig {
  CudaCopyMethod method = CudaCopyMethod::batch;
  // Streams per direction and device; jobs go round robin over them. (On
  // three H200 machines, 1 to 8 streams made no consistent difference.)
  unsigned streams_per_direction = 2;
  // Kernel method: thread blocks per launch (0: one per SM) and threads per
  // block.
  unsigned kernel_blocks = 0;
  unsigned kernel_threads = 512;
  // Neighbouring copies contiguous on both sides merge up to this size
  // (0: the method's default: 4 MiB for batch, 256 KiB for kernel).
  std::uint64_t merge_limit = 0;
  // Batch method: hint the driver to leave the SMs to the engine's kernels
  // (cudaMemcpyFlagPreferOverlapWithCompute).
  bool batch_overlap_hint = true;
  // Batch method, retrieve: let the driver read L1 out of stream order (it
  // is locked and unchanging while the job runs); stores always read the
  // engine's memory in stream order, after its event.
  bool batch_retrieve_any_order = false;
  // Batch method: tell the driver which side is the host and which the
  // device (srcLocHint, dstLocHint), for L1 registered from outside CUDA.
  bool batch_location_hints = false;
};

// Counts usable CUDA devices: the count (>= 1), or why there are none
// ("CUDA driver version is insufficient" is what a host without an NVIDIA
// driver answers; not_found when the driver sees no device).
Result<int> cuda_device_count();

class CudaTransferEngine final : public TransferEngine {
 public:
  // Fails ("no CUDA device: ...") when no CUDA device is usable.
  static Result<std::unique_ptr<CudaTransferEngine>> create(asio::any_io_executor completions,
                                                            CudaEngineConfig config);
  // Waits for the copies in flight, then releases streams, buffers and the
  // L1 pinning. Their completions are posted (run if the io_context runs).
  ~CudaTransferEngine() override;
  CudaTransferEngine(const CudaTransferEngine&) = delete;
  CudaTransferEngine& operator=(const CudaTransferEngine&) = delete;

  // Opens a cuda_ipc layout's handles on its device; refuses other
  // backends, unknown devices, closed or invalid handles and layouts that
  // do not fit the allocations.
  Error attach(Registration& reg, UniqueFd fd) override;
  void submit(TransferJob job, TransferDone done) override;
  // Pins [base, base + bytes) (mapped, portable) the first time.
  Error use_l1(const Registration& reg, std::byte* base, std::uint64_t bytes) override;
  std::uint64_t capabilities() const override { return wire::capability::cuda_transfer; }
  // Why the device of `reg` cannot copy any more (its context hit a sticky
  // error), or "".
  Error fault(const Registration& reg) const override;

  const CudaEngineConfig& config() const;
  int devices() const;

  struct Impl;

 private:
  explicit CudaTransferEngine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvlink::transfer
