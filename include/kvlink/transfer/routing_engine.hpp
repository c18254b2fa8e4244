// What kvlink-server runs: each registration goes to the engine for its
// backend, cpu_memfd to the CPU engine and cuda_ipc to the CUDA engine, so
// one server serves both; a host without a CUDA device (or a build without
// CUDA) refuses cuda_ipc registrations with the reason. make_transfer_engine
// builds it from --transfer-engine auto|cpu|cuda.
#pragma once

#include <asio/any_io_executor.hpp>
#include <memory>
#include <string>

#include "kvlink/transfer/cuda_engine.hpp"
#include "kvlink/transfer/transfer_engine.hpp"

namespace kvlink::transfer {

class RoutingTransferEngine final : public TransferEngine {
 public:
  // `cuda` may be null: cuda_ipc registrations are then refused, naming
  // `no_cuda` (why there is no CUDA engine).
  RoutingTransferEngine(std::unique_ptr<TransferEngine> cpu, std::unique_ptr<TransferEngine> cuda,
                        std::string no_cuda);
  Error attach(Registration& reg, UniqueFd fd) override;
  void submit(TransferJob job, TransferDone done) override;
  Error use_l1(const Registration& reg, std::byte* base, std::uint64_t bytes) override;
  std::uint64_t capabilities() const override;
  Error fault(const Registration& reg) const override;
  bool has_cuda() const { return cuda_ != nullptr; }

 private:
  TransferEngine* engine_for(const Registration& reg) const;
  std::unique_ptr<TransferEngine> cpu_;
  std::unique_ptr<TransferEngine> cuda_;
  std::string no_cuda_;
};

enum class EngineChoice : std::uint8_t {
  automatic,  // CPU engine, plus the CUDA engine when a CUDA device exists
  cpu,        // CPU engine only: cuda_ipc registrations are refused
  cuda,       // both, and a start without a CUDA device is an error
};
// "auto", "cpu" or "cuda" (bad_request otherwise).
Result<EngineChoice> parse_engine_choice(std::string_view text);

struct TransferEngineOptions {
  EngineChoice choice = EngineChoice::automatic;
  unsigned cpu_threads = 2;
  CudaEngineConfig cuda;
};

// The engine --transfer-engine asks for, or why not (cuda without a usable
// device or in a build without CUDA). `summary` says what was built, for
// the server's start-up log line.
Result<std::unique_ptr<RoutingTransferEngine>> make_transfer_engine(asio::any_io_executor completions,
                                                                    const TransferEngineOptions& options,
                                                                    std::string& summary);

}  // namespace kvlink::transfer
