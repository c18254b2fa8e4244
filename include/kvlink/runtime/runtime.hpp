// Who runs kvlink's io_context. Three ways to embed kvlink (README,
// "Embedding"):
//
//  (a) own thread: Runtime runs the io_context on a thread of its own. The
//      engine's threads call the adapters' blocking or async functions,
//      which post into it; completions run on that thread (or wherever the
//      completion token's executor says).
//  (b) host-driven: the same Runtime, plus a host queue. The host watches
//      host_fd() in its own event loop and calls poll() when it is
//      readable; handlers bound to host_executor() (asio::bind_executor, or
//      coroutines co_spawned on it) run inside poll() on the host's thread.
//      Sockets, timers, heartbeats and deadlines stay on Runtime's thread,
//      so a host that polls late (a long forward pass) delays only its own
//      completions, never a heartbeat (no false "server hung").
//  (c) the host's own io_context: no Runtime at all. Create the adapters on
//      the host's executor (io.get_executor()); the io_context must be run
//      by one thread (adapters keep unsynchronized state on it) and must
//      keep running while adapters exist, or heartbeats stop.
//
// Threads: executor(), host_executor(), stop() from any thread except
// Runtime's own (stop); poll() and host_fd() from the host thread.
#pragma once

#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <thread>

#include "kvlink/runtime/host_queue.hpp"

namespace kvlink::runtime {

class Runtime {
 public:
  Runtime() : host_(io_), work_(asio::make_work_guard(io_)), thread_([this] { io_.run(); }) {}
  ~Runtime() { stop(); }
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  // kvlink's executor: create adapters and connections on it.
  asio::io_context::executor_type executor() { return io_.get_executor(); }
  asio::io_context& context() { return io_; }
  bool running_in_this_thread() const { return std::this_thread::get_id() == thread_.get_id(); }

  // Mode (b). An executor whose handlers run in poll(), e.g.
  //   worker->async_submit_store(spec, asio::bind_executor(rt.host_executor(), on_stored));
  HostExecutor host_executor() { return host_.executor(); }
  // Readable (level-triggered) while completions wait for poll().
  int host_fd() const { return host_.fd(); }
  // Runs the completions queued for the host, without blocking.
  std::size_t poll() { return host_.poll(); }
  HostQueue& host_queue() { return host_; }

  // Stops the io_context (queued handlers are dropped) and joins the
  // thread. Idempotent; not from the runtime's own thread. Completions
  // already queued for the host stay until poll() or destruction.
  void stop() {
    if (!thread_.joinable()) return;
    work_.reset();
    io_.stop();
    thread_.join();
  }

 private:
  asio::io_context io_;
  HostQueue host_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  std::thread thread_;
};

}  // namespace kvlink::runtime
