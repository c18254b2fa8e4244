// One io_context and the one thread that runs it, for engines that have no
// event loop of their own. Every adapter made on runtime.executor() keeps
// its state on this thread; the engine's threads call the adapters'
// blocking or async functions, which post into it.
#pragma once

#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <thread>

namespace kvlink::runtime {

class Runtime {
 public:
  Runtime() : work_(asio::make_work_guard(io_)), thread_([this] { io_.run(); }) {}
  ~Runtime() { stop(); }
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  asio::io_context::executor_type executor() { return io_.get_executor(); }
  asio::io_context& context() { return io_; }
  bool running_in_this_thread() const { return std::this_thread::get_id() == thread_.get_id(); }

  // Stops the io_context (queued handlers are dropped) and joins the
  // thread. Idempotent; not from the runtime's own thread.
  void stop() {
    if (!thread_.joinable()) return;
    work_.reset();
    io_.stop();
    thread_.join();
  }

 private:
  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  std::thread thread_;
};

}  // namespace kvlink::runtime
