// The CPU transfer engine: the worker's KV cache is a memfd it passed with
// REGISTER_KV_CACHE (SCM_RIGHTS); attach() maps it, and a small thread pool
// gathers engine blocks into L1 slots (STORE) and scatters them back
// (RETRIEVE). A job is split by chunk across the pool's threads; several
// jobs are in flight at once. Completions are posted to the executor given
// to the constructor (the server's io_context), never run on a pool thread.
#pragma once

#include <asio/any_io_executor.hpp>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "kvlink/transfer/transfer_engine.hpp"

namespace kvlink::transfer {

class CpuTransferEngine final : public TransferEngine {
 public:
  // `completions`: where TransferDone runs. `threads`: copy threads (>= 1).
  explicit CpuTransferEngine(asio::any_io_executor completions, unsigned threads = 2);
  // Finishes the copies already queued, then joins the threads.
  ~CpuTransferEngine() override;
  CpuTransferEngine(const CpuTransferEngine&) = delete;
  CpuTransferEngine& operator=(const CpuTransferEngine&) = delete;

  // Maps the memfd of a cpu_memfd layout (map_memfd); refuses other
  // backends, a REGISTER without an fd, and an fd not sealed against
  // resizing (create_kv_memfd makes one that is).
  Error attach(Registration& reg, UniqueFd fd) override;
  void submit(TransferJob job, TransferDone done) override;
  std::uint64_t capabilities() const override { return wire::capability::cpu_transfer; }

  unsigned threads() const { return static_cast<unsigned>(threads_.size()); }

 private:
  void worker();

  asio::any_io_executor completions_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace kvlink::transfer
