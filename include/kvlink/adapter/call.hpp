// How the adapters expose every operation: an Asio async operation with a
// completion token (use_awaitable, callbacks, use_future, deferred) whose
// work runs on the adapter's io thread, plus a blocking form with a deadline
// for engines without an event loop.
//
// The async forms do not honour per-operation cancellation slots: each one
// completes by its own call deadline (SchedulerConfig/WorkerConfig), so a
// caller racing it against a timer just stops waiting for it.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/dispatch.hpp>
#include <chrono>
#include <functional>
#include <future>
#include <memory>
#include <system_error>
#include <type_traits>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"

namespace kvlink::adapter {

// What a blocking call returns: an error (timed_out when the deadline
// passed) and, when there is none, the value.
template <class T>
struct Result {
  std::error_code ec;
  T value{};
  explicit operator bool() const { return !ec; }
};

namespace detail {

template <class T>
using Callback = std::function<void(std::error_code, T)>;

// Starts an operation through `start(Callback<T>)` and completes the token
// with (error_code, T) on the handler's associated executor.
template <class T, class Token, class Start>
auto initiate(const asio::any_io_executor& ex, Token&& token, Start start) {
  return asio::async_initiate<Token, void(std::error_code, T)>(
      [ex](auto handler, Start st) {
        using H = decltype(handler);
        auto h = std::make_shared<H>(std::move(handler));
        auto hex = asio::get_associated_executor(*h, ex);
        st(Callback<T>([h, hex](std::error_code ec, T v) {
          asio::dispatch(hex, [h, ec, v = std::move(v)]() mutable { std::move (*h)(ec, std::move(v)); });
        }));
      },
      token, std::move(start));
}

// Runs `start(Callback<T>)` and waits at most `deadline`; never longer,
// whatever the server does. `on_deadline` runs when it passes.
template <class T, class Start, class OnDeadline>
Result<T> blocking(Duration deadline, Start start, OnDeadline on_deadline) {
  auto p = std::make_shared<std::promise<Result<T>>>();
  auto f = p->get_future();
  start(Callback<T>([p](std::error_code ec, T v) { p->set_value(Result<T>{ec, std::move(v)}); }));
  if (f.wait_for(deadline) != std::future_status::ready) {
    on_deadline();
    return Result<T>{make_error_code(errc::timed_out), T{}};
  }
  return f.get();
}

}  // namespace detail

// The value of operations that return nothing but success or an error.
struct Done {};

}  // namespace kvlink::adapter
