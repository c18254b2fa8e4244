#include "kvlink/transfer/cpu_engine.hpp"

#include <asio/execution/outstanding_work.hpp>
#include <asio/post.hpp>
#include <asio/prefer.hpp>
#include <algorithm>
#include <atomic>
#include <fmt/format.h>

#include "kvlink/error.hpp"
#include "kvlink/log.hpp"
#include "kvlink/transfer/cpu_copy.hpp"

namespace kvlink::transfer {

CpuTransferEngine::CpuTransferEngine(asio::any_io_executor completions, unsigned threads)
    : completions_(std::move(completions)) {
  threads = std::max(threads, 1u);
  threads_.reserve(threads);
  for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { worker(); });
}

CpuTransferEngine::~CpuTransferEngine() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : threads_) t.join();
}

void CpuTransferEngine::worker() {
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
      if (tasks_.empty()) return;  // stopping, and everything queued is done
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    task();
  }
}

Error CpuTransferEngine::attach(Registration& reg, UniqueFd fd) {
  if (reg.layout.backend != wire::KvBackend::cpu_memfd)
    return Error(
        errc::bad_request,
        "this server runs the CPU transfer engine: register a cpu_memfd layout (cuda_ipc needs a CUDA server)");
  if (!fd)
    return Error(errc::bad_request,
                 "no memfd received with REGISTER_KV_CACHE: the CPU engine needs the KV cache's memfd, passed with "
                 "SCM_RIGHTS over a unix: endpoint (Connection::async_call_with_fd)");
  auto mapped = map_memfd(std::move(fd), reg.layout.region_bytes);
  if (!mapped) return mapped.error();
  reg.memory = std::move(*mapped);
  return {};
}

namespace {
// One job split into parts; the last part to finish posts the completion.
struct JobState {
  TransferJob job;
  TransferDone done;
  // Outstanding work on the completion executor: its io_context's run()
  // does not return while a copy is in flight (the server's L1 and the
  // handler stay alive until every completion ran).
  asio::any_io_executor work;
  std::atomic<std::size_t> parts_left{0};
  std::mutex mutex;
  Error error;  // the first part's failure
  bool fenced = false;
};
}  // namespace

void CpuTransferEngine::submit(TransferJob job, TransferDone done) {
  if (job.chunks.empty()) {
    asio::post(completions_, [done = std::move(done)] { done({}); });
    return;
  }
  auto state = std::make_shared<JobState>();
  const std::size_t chunks = job.chunks.size();
  const std::size_t parts = std::min<std::size_t>(chunks, threads_.size());
  state->job = std::move(job);
  state->done = std::move(done);
  state->work = asio::prefer(completions_, asio::execution::outstanding_work.tracked);
  state->parts_left = parts;
  {
    std::lock_guard lock(mutex_);
    for (std::size_t p = 0; p < parts; ++p) {
      const std::size_t first = chunks * p / parts, last = chunks * (p + 1) / parts;
      tasks_.emplace_back([this, state, first, last] {
        if (Error err = copy_chunks(state->job, first, last)) {
          std::lock_guard l(state->mutex);
          if (err == errc::timed_out) state->fenced = true;
          else if (!state->error) state->error = std::move(err);
        }
        if (state->parts_left.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
        const bool store = state->job.direction == Direction::store;
        std::error_code ec;
        if (state->error) {
          log::warn("kvlink-server: {} copy failed: {}", store ? "STORE" : "RETRIEVE", state->error.message());
          ec = state->error.code();
        } else if (state->fenced || (store && Clock::now() >= state->job.fence)) {
          // Every read of a store happened before this check: when it passes,
          // the engine had not been told to reuse the blocks yet.
          ec = errc::timed_out;
        }
        auto work = std::move(state->work);
        asio::post(work, [state, ec] { state->done(ec); });
      });
    }
  }
  if (parts == 1) wake_.notify_one();
  else wake_.notify_all();
}

}  // namespace kvlink::transfer
