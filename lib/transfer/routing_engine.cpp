#include "kvlink/transfer/routing_engine.hpp"

#include <asio/post.hpp>
#include <fmt/format.h>

#include "kvlink/error.hpp"
#include "kvlink/log.hpp"
#include "kvlink/transfer/cpu_engine.hpp"

namespace kvlink::transfer {

RoutingTransferEngine::RoutingTransferEngine(std::unique_ptr<TransferEngine> cpu, std::unique_ptr<TransferEngine> cuda,
                                             std::string no_cuda)
    : cpu_(std::move(cpu)), cuda_(std::move(cuda)), no_cuda_(std::move(no_cuda)) {}

TransferEngine* RoutingTransferEngine::engine_for(const Registration& reg) const {
  return reg.layout.backend == wire::KvBackend::cuda_ipc ? cuda_.get() : cpu_.get();
}

Error RoutingTransferEngine::attach(Registration& reg, UniqueFd fd) {
  if (auto* e = engine_for(reg)) return e->attach(reg, std::move(fd));
  return Error(errc::bad_request,
               fmt::format("this server has no CUDA device, so it cannot open a cuda_ipc KV cache ({}); register a "
                           "cpu_memfd layout or run kvlink-server on a host with the engine's GPU",
                           no_cuda_));
}

void RoutingTransferEngine::submit(TransferJob job, TransferDone done) {
  TransferEngine* e = job.registration ? engine_for(*job.registration) : cpu_.get();
  if (!e) {  // attach() refused every such registration: unreachable
    log::warn("kvlink-server: a cuda_ipc job reached a server without a CUDA engine");
    return done(errc::server_error);
  }
  e->submit(std::move(job), std::move(done));
}

Error RoutingTransferEngine::use_l1(const Registration& reg, std::byte* base, std::uint64_t bytes) {
  if (auto* e = engine_for(reg)) return e->use_l1(reg, base, bytes);
  return {};
}

Error RoutingTransferEngine::fault(const Registration& reg) const {
  const TransferEngine* e = engine_for(reg);
  return e ? e->fault(reg) : Error{};
}

std::uint64_t RoutingTransferEngine::capabilities() const {
  return (cpu_ ? cpu_->capabilities() : 0) | (cuda_ ? cuda_->capabilities() : 0);
}

// Declared in cuda_engine.hpp; defined here so builds without CUDA parse
// --cuda-copy too.
const char* copy_method_name(CudaCopyMethod m) { return m == CudaCopyMethod::kernel ? "kernel" : "batch"; }

Result<CudaCopyMethod> parse_copy_method(std::string_view text) {
  if (text == "batch") return CudaCopyMethod::batch;
  if (text == "kernel") return CudaCopyMethod::kernel;
  return Error(errc::bad_request, fmt::format("CUDA copy method '{}': use batch or kernel", text));
}

Result<EngineChoice> parse_engine_choice(std::string_view text) {
  if (text == "auto") return EngineChoice::automatic;
  if (text == "cpu") return EngineChoice::cpu;
  if (text == "cuda") return EngineChoice::cuda;
  return Error(errc::bad_request, fmt::format("transfer engine '{}': use auto, cpu or cuda", text));
}

Result<std::unique_ptr<RoutingTransferEngine>> make_transfer_engine(asio::any_io_executor completions,
                                                                    const TransferEngineOptions& options,
                                                                    std::string& summary) {
  auto cpu = std::make_unique<CpuTransferEngine>(completions, options.cpu_threads);
  std::unique_ptr<TransferEngine> cuda;
  std::string no_cuda;
  if (options.choice == EngineChoice::cpu) {
    no_cuda = "started with --transfer-engine cpu";
  } else {
    Error failed;  // why there is no CUDA engine
#ifdef KVLINK_HAVE_CUDA
    if (auto created = CudaTransferEngine::create(completions, options.cuda)) cuda = std::move(*created);
    else failed = created.error();
#else
    failed = Error(errc::not_found, "kvlink was built without CUDA (no nvcc, or -Dcuda=disabled)");
#endif
    if (failed) no_cuda = failed.message();
    if (!cuda && options.choice == EngineChoice::cuda) return failed.context("--transfer-engine cuda");
  }
  if (cuda) {
#ifdef KVLINK_HAVE_CUDA
    const auto& c = static_cast<CudaTransferEngine&>(*cuda);
    summary = fmt::format("CPU ({} threads) for memfd KV caches, CUDA ({} device(s), {} copies, {} streams per "
                          "direction) for cuda_ipc KV caches",
                          options.cpu_threads, c.devices(), copy_method_name(c.config().method),
                          c.config().streams_per_direction);
#endif
  } else {
    summary = fmt::format("CPU ({} threads); cuda_ipc KV caches are refused: {}", options.cpu_threads, no_cuda);
  }
  return std::make_unique<RoutingTransferEngine>(std::move(cpu), std::move(cuda), std::move(no_cuda));
}

}  // namespace kvlink::transfer
