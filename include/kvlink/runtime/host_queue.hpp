// Completions delivered on the host's thread, when the host asks: a queue of
// handlers, an eventfd that is readable while the queue is not empty, and
// poll() to run them. The host watches fd() in its own loop (epoll, libuv,
// asyncio's add_reader...) and calls poll() when it is readable; it never
// needs to busy-loop, and its single-threaded code needs no locks, because
// every handler bound to executor() runs inside poll() on the host's thread.
//
// Threads: post()/executor().execute() from any thread; poll(), fd() and
// running_in_this_thread() from the host thread (one thread at a time).
#pragma once

#include <asio/execution.hpp>
#include <asio/execution_context.hpp>
#include <atomic>
#include <cstddef>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvlink/unique_fd.hpp"

namespace kvlink::runtime {

class HostExecutor;

class HostQueue {
 public:
  // `context` is what executor() reports as its execution context: I/O
  // objects made from executor() (timers, sockets) use its services, and
  // their handlers still run in poll(). Throws std::system_error when no
  // eventfd can be made.
  explicit HostQueue(asio::execution_context& context);
  ~HostQueue();  // drops handlers never polled (their destructors run)
  HostQueue(const HostQueue&) = delete;
  HostQueue& operator=(const HostQueue&) = delete;

  // Readable while handlers are queued. Level-triggered: it stays readable
  // until poll() took them. Never read or close it yourself.
  int fd() const { return fd_.get(); }

  // Runs the handlers queued before the call, on this thread, without
  // blocking; returns how many ran. Handlers they queue run at the next
  // poll() (fd() is readable again), so one poll() is bounded work.
  std::size_t poll();

  // Queues `f` to run in poll(). Any thread.
  template <class F>
  void post(F&& f) {
    push(std::make_unique<Task<std::decay_t<F>>>(std::forward<F>(f)));
  }

  // An Asio executor that queues here: asio::bind_executor(q.executor(),
  // handler), co_spawn(q.executor(), ...), or asio::post(q.executor(), f).
  HostExecutor executor();
  asio::execution_context& context() const { return context_; }
  // True inside poll() on the polling thread.
  bool running_in_this_thread() const { return polling_thread_.load() == std::this_thread::get_id(); }

 private:
  struct TaskBase {
    virtual ~TaskBase() = default;
    virtual void run() = 0;
  };
  template <class F>
  struct Task final : TaskBase {
    explicit Task(F&& fn) : f(std::move(fn)) {}
    explicit Task(const F& fn) : f(fn) {}
    void run() override { std::move(f)(); }
    F f;
  };
  void push(std::unique_ptr<TaskBase> task);

  asio::execution_context& context_;
  UniqueFd fd_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<TaskBase>> queue_;  // guarded by mutex_
  std::atomic<std::thread::id> polling_thread_{};
};

// Executor (Asio's standard executor model) for a HostQueue. Never runs a
// function inline: execute() always queues, and poll() runs it.
class HostExecutor {
 public:
  explicit HostExecutor(HostQueue& q) noexcept : q_(&q) {}

  template <class F>
  void execute(F&& f) const {
    q_->post(std::forward<F>(f));
  }
  asio::execution_context& query(asio::execution::context_t) const noexcept { return q_->context(); }
  static constexpr asio::execution::blocking_t query(asio::execution::blocking_t) noexcept {
    return asio::execution::blocking.never;
  }
  HostExecutor require(asio::execution::blocking_t::never_t) const noexcept { return *this; }
  bool running_in_this_thread() const noexcept { return q_->running_in_this_thread(); }

  friend bool operator==(const HostExecutor& a, const HostExecutor& b) noexcept { return a.q_ == b.q_; }
  friend bool operator!=(const HostExecutor& a, const HostExecutor& b) noexcept { return a.q_ != b.q_; }

 private:
  HostQueue* q_;
};

inline HostExecutor HostQueue::executor() { return HostExecutor(*this); }

}  // namespace kvlink::runtime
