// How the adapters expose every operation: an Asio async operation with a
// completion token (use_awaitable, callbacks, use_future, deferred) whose
// work runs on the adapter's io thread, plus a blocking form with a deadline
// for engines without an event loop. The async forms complete with Asio's
// (error_code, value); the blocking forms return kvlink::Result<value>
// (kvlink/error.hpp): the value, or the Error that prevented it.
//
// Cancellation: an async form whose completion handler has a cancellation
// slot (asio::bind_cancellation_slot, parallel_group, a coroutine's
// cancellation) completes at once with operation_aborted when the slot is
// signalled. Operations that take a CancelSignal (the scheduler's lookups)
// also cancel the connection call they wait on, so it leaves the pending
// table at once; the lookup then ends as after any failed call (no hit).
// The others run on to their own call deadline and their result is
// dropped: a cancelled transfer stays tracked, so get_finished reports it
// only once the server can no longer touch its blocks.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/dispatch.hpp>
#include <asio/error.hpp>
#include <asio/post.hpp>
#include <chrono>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"

namespace kvlink::adapter {

namespace detail {

template <class T>
using Callback = std::function<void(std::error_code, T)>;

// The caller's cancellation, for an operation to pass on to the connection
// call it waits on (with_cancel below). Emitted on the adapter's executor;
// null when the caller's handler has no cancellation slot.
using CancelSignal = std::shared_ptr<asio::cancellation_signal>;

// Starts an operation through `start(Callback<T>)`, or `start(Callback<T>,
// CancelSignal)` for one that forwards cancellation, and completes the
// token with (error_code, T) on the handler's associated executor, once:
// with the operation's result, or with operation_aborted if the handler's
// cancellation slot is signalled first.
template <class T, class Token, class Start>
auto initiate(const asio::any_io_executor& ex, Token&& token, Start start) {
  return asio::async_initiate<Token, void(std::error_code, T)>(
      [ex](auto handler, Start st) {
        using H = decltype(handler);
        struct Pending {
          H handler;
          bool done = false;
        };
        constexpr bool forwards = std::is_invocable_v<Start&, Callback<T>, CancelSignal>;
        auto slot = asio::get_associated_cancellation_slot(handler);
        auto hex = asio::get_associated_executor(handler, ex);
        auto p = std::make_shared<Pending>(Pending{std::move(handler)});
        // Both ways in run on the handler's executor, so `done` needs no lock.
        auto finish = [p, slot](std::error_code ec, T v) mutable {
          if (std::exchange(p->done, true)) return;
          if (slot.is_connected()) slot.clear();
          std::move(p->handler)(ec, std::move(v));
        };
        CancelSignal forward;
        if (forwards && slot.is_connected()) forward = std::make_shared<asio::cancellation_signal>();
        if (slot.is_connected())
          slot.assign([ex, hex, finish, forward](asio::cancellation_type type) mutable {
            asio::post(hex, [finish]() mutable { finish(asio::error::operation_aborted, T{}); });
            // After the operation's start (posted to `ex` earlier), on the
            // executor that owns its connection call.
            if (forward) asio::post(ex, [forward, type] { forward->emit(type); });
          });
        Callback<T> cb([hex, finish](std::error_code ec, T v) mutable {
          asio::dispatch(hex, [finish, ec, v = std::move(v)]() mutable { finish(ec, std::move(v)); });
        });
        if constexpr (forwards)
          st(std::move(cb), std::move(forward));
        else
          st(std::move(cb));
      },
      token, std::move(start));
}

// A connection call's completion handler that `cancel` (if any) cancels.
// The handler keeps the signal alive: the connection clears its slot only
// when the call completes.
template <class Handler>
auto with_cancel(CancelSignal cancel, Handler handler) {
  auto slot = cancel ? cancel->slot() : asio::cancellation_slot();
  return asio::bind_cancellation_slot(
      slot, [cancel = std::move(cancel), h = std::move(handler)](auto&&... args) mutable {
        h(std::forward<decltype(args)>(args)...);
      });
}

// The blocking form of every adapter call: runs `start(Callback<T>)` and
// waits at most `deadline`; never longer, whatever the server does.
// Returns the value, or the operation's error (timed_out when the deadline
// passed). `on_deadline` runs when it passes.
template <class T, class Start, class OnDeadline>
Result<T> blocking(Duration deadline, Start start, OnDeadline on_deadline) {
  auto p = std::make_shared<std::promise<Result<T>>>();
  auto f = p->get_future();
  start(Callback<T>([p](std::error_code ec, T v) {
    p->set_value(ec ? Result<T>(Error(ec)) : Result<T>(std::move(v)));
  }));
  if (f.wait_for(deadline) != std::future_status::ready) {
    on_deadline();
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline).count();
    return Error(errc::timed_out, "no answer within the blocking call's deadline of " + std::to_string(ms) +
                                      " ms (the operation may still complete); pass a longer deadline or raise "
                                      "the adapter's blocking_deadline");
  }
  return f.get();
}

}  // namespace detail

// The value of operations that return nothing but success or an error.
struct Done {};

}  // namespace kvlink::adapter
