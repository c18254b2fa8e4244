// The warmup gate: closed while the engine loads its model, autotunes and
// captures graphs; no heartbeat runs and nothing is judged unhealthy until
// it opens. It opens on the first of: the engine's explicit ready call, an
// automatic trigger the adapters call (e.g. open("register acknowledged"),
// open("first lookup")), or max_warmup elapsing (the monitor opens it).
//
// open() is idempotent and thread-safe: exactly one call opens the gate and
// runs the subscribers, whatever number of threads race. Subscribers
// registered after opening run at once, in the subscribing thread.
#pragma once

#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/post.hpp>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace kvlink::health {

class WarmupGate {
 public:
  using Subscriber = std::function<void(std::string_view reason)>;

  WarmupGate() = default;
  WarmupGate(const WarmupGate&) = delete;
  WarmupGate& operator=(const WarmupGate&) = delete;

  // Opens the gate. Returns true for the one call that opened it.
  bool open(std::string_view reason) {
    std::vector<Subscriber> subs;
    {
      std::lock_guard lock(mutex_);
      if (open_) return false;
      open_ = true;
      reason_ = std::string(reason);
      subs.swap(subscribers_);
    }
    for (auto& s : subs) s(reason_);  // reason_ is immutable once open
    return true;
  }

  bool is_open() const {
    std::lock_guard lock(mutex_);
    return open_;
  }

  // Why it opened (empty while closed).
  std::string reason() const {
    std::lock_guard lock(mutex_);
    return reason_;
  }

  // Runs `s` once when the gate opens (at once if open already).
  void subscribe(Subscriber s) {
    {
      std::lock_guard lock(mutex_);
      if (!open_) {
        subscribers_.push_back(std::move(s));
        return;
      }
    }
    s(reason_);
  }

  // Completes with (error_code) once the gate is open, on the handler's
  // associated executor (or `ex`).
  template <class Executor, class Token>
  auto async_wait(const Executor& ex, Token&& token) {
    return asio::async_initiate<Token, void(std::error_code)>(
        [this, ex](auto handler) {
          using H = decltype(handler);
          auto shared = std::make_shared<H>(std::move(handler));
          auto exec = asio::get_associated_executor(*shared, ex);
          subscribe([shared, exec](std::string_view) {
            asio::post(exec, [shared] { std::move (*shared)(std::error_code{}); });
          });
        },
        token);
  }

 private:
  mutable std::mutex mutex_;
  bool open_ = false;
  std::string reason_;
  std::vector<Subscriber> subscribers_;
};

}  // namespace kvlink::health
