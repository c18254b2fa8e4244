// The client side of the protocol: one socket, many requests in flight.
//
// Every request gets an id and a deadline. Replies are matched by id; a
// request whose deadline passes leaves the pending table at once and fails
// with timed_out (its late reply, if any, is dropped and counted). The moment
// the socket closes every pending request fails with connection_lost.
// Per-request cancellation works through Asio cancellation slots and
// completes with asio::error::operation_aborted (cancelled is not failed).
//
// All state lives on the connection's executor; async_call may be started
// from any thread (it is dispatched there).
#pragma once

#include <fcntl.h>

#include <asio/any_io_executor.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/awaitable.hpp>
#include <asio/dispatch.hpp>
#include <asio/experimental/as_tuple.hpp>  // calls are usually awaited as (error, reply)
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <system_error>
#include <unordered_map>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/log.hpp"
#include "kvlink/net/endpoint.hpp"
#include "kvlink/unique_fd.hpp"
#include "kvlink/wire/messages.hpp"

namespace kvlink::net {

using Clock = kvlink::Clock;

class FrameStream;  // the framed socket (lib/net/frame_stream.hpp), internal

struct ConnectionStats {
  std::uint64_t calls = 0;         // requests sent that expect a reply
  std::uint64_t one_way = 0;       // one-way requests sent
  std::uint64_t replies = 0;       // replies matched to a pending request
  std::uint64_t error_replies = 0; // of those, error responses
  std::uint64_t late_replies = 0;  // replies for requests no longer pending (dropped)
  std::uint64_t timeouts = 0;      // requests failed by their deadline
  std::uint64_t cancelled = 0;     // requests cancelled by the caller
};

namespace detail {

// asio::dispatch(ex, f) for an any_io_executor wrapping an io_context
// executor runs f inline when called on one of that io_context's threads,
// but only after type-erasing f into a heap-recycled executor_function.
// Same semantics, minus the erasure: call f directly in that case.
template <class Executor, class F>
void dispatch_inline(const Executor& ex, F&& f) {
  if constexpr (std::is_same_v<Executor, asio::any_io_executor>) {
    if (const auto* io = ex.template target<asio::io_context::executor_type>(); io && io->running_in_this_thread()) {
      std::forward<F>(f)();
      return;
    }
  }
  asio::dispatch(ex, std::forward<F>(f));
}

// A request waiting for its reply; type-erases the completion handler.
struct PendingCall {
  std::uint64_t id = 0;
  Clock::time_point deadline;
  virtual ~PendingCall() = default;
  // Decodes the reply (when ec is clear) and completes the handler.
  virtual void complete(std::error_code ec, std::span<const std::byte> payload) = 0;
};

template <class Reply, class Handler>
struct PendingCallImpl final : PendingCall {
  PendingCallImpl(Handler&& h, const asio::any_io_executor& fallback)
      : handler(std::move(h)), executor(asio::get_associated_executor(handler, fallback)) {}

  void complete(std::error_code ec, std::span<const std::byte> payload) override {
    Reply reply{};
    if (!ec) {
      if (Error malformed = wire::decode(payload, reply, "reply")) {
        log::warn("kvlink: malformed reply from server: {}", malformed.message());
        ec = errc::protocol_error;
      }
    }
    auto slot = asio::get_associated_cancellation_slot(handler);
    if (slot.is_connected()) slot.clear();
    dispatch_inline(executor, [h = std::move(handler), ec, r = std::move(reply)]() mutable { std::move(h)(ec, std::move(r)); });
  }

  Handler handler;
  asio::associated_executor_t<Handler, asio::any_io_executor> executor;
};

}  // namespace detail

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  using executor_type = asio::any_io_executor;

  // Takes a connected socket and starts reading. Use connect() to get one.
  static std::shared_ptr<Connection> start(Socket socket, std::uint32_t max_payload = wire::default_max_payload);
  ~Connection();

  executor_type get_executor() const { return executor_; }

  // Sends `req` and completes with (error_code, Request::reply_type) when the
  // reply arrives, the deadline passes, the connection closes or the caller
  // cancels. Works with use_awaitable, callbacks, use_future, deferred.
  template <class Request, class Token>
  auto async_call(Request req, Clock::duration timeout, Token&& token) {
    using Reply = typename Request::reply_type;
    return asio::async_initiate<Token, void(std::error_code, Reply)>(
        [self = shared_from_this(), timeout](auto handler, Request request) mutable {
          detail::dispatch_inline(self->executor_, [self, timeout, h = std::move(handler), r = std::move(request)]() mutable {
            self->start_call<Reply>(r, timeout, std::move(h));
          });
        },
        token, std::move(req));
  }

  // async_call with a file descriptor passed along (SCM_RIGHTS): the
  // worker's KV-cache memfd with REGISTER_KV_CACHE. `fd` is duplicated at
  // once (the caller keeps and may close its own); the copy is owned until
  // the kernel took it. Unix endpoints only: on TCP it completes at once
  // with bad_request (last_error_message() says why).
  template <class Request, class Token>
  auto async_call_with_fd(Request req, int fd, Clock::duration timeout, Token&& token) {
    using Reply = typename Request::reply_type;
    return asio::async_initiate<Token, void(std::error_code, Reply)>(
        [self = shared_from_this(), timeout](auto handler, Request request, UniqueFd owned) mutable {
          detail::dispatch_inline(self->executor_, [self, timeout, h = std::move(handler), r = std::move(request),
                                                    f = std::move(owned)]() mutable {
            self->start_call<Reply>(r, timeout, std::move(h), std::move(f), true);
          });
        },
        token, std::move(req), duplicate_fd(fd));
  }

  // Sends a one-way request (no reply). Dropped if the connection is closed.
  template <class Request>
    requires std::is_void_v<typename Request::reply_type>
  void send(Request req) {
    static_assert(wire::one_way_allowed(Request::opcode), "the server refuses this request one-way");
    detail::dispatch_inline(executor_, [self = shared_from_this(), r = std::move(req)] {
      if (self->closed_) return;
      ++self->stats_.one_way;
      self->send_frame(static_cast<std::uint8_t>(Request::opcode), wire::flag::one_way, self->next_id_++,
                       &encode_request<Request>, &r);
    });
  }

  // Closes the socket; pending requests fail with connection_lost.
  // Safe from any thread.
  void close();

  // Called once, on the connection's executor, when the connection ends
  // (with the reason). Set it before anything can close the connection.
  void on_close(std::function<void(const Error&)> handler) { on_close_ = std::move(handler); }
  // Called on the connection's executor for each SERVER_NOTICE the server
  // sends unasked (e.g. draining before a planned restart).
  void on_notice(std::function<void(const wire::ServerNotice&)> handler) { on_notice_ = std::move(handler); }

  // The following are for the connection's executor only.
  bool is_open() const { return !closed_; }
  std::size_t pending() const { return pending_.size(); }
  const ConnectionStats& stats() const { return stats_; }
  std::size_t queued_bytes() const;
  // The server's message for the most recent error reply. Read it inside
  // the completion of the failed call (completions on the connection's
  // executor run before the next frame is read).
  const std::string& last_error_message() const { return last_error_message_; }
  // Applied after HELLO negotiated the server's limits.
  void set_limits(std::uint32_t max_payload, std::uint32_t max_in_flight);

 private:
  Connection(Socket socket, std::uint32_t max_payload);

  template <class Reply, class Handler>
  void start_call(const auto& request, Clock::duration timeout, Handler&& handler, UniqueFd fd = {},
                  bool with_fd = false) {
    using Request = std::decay_t<decltype(request)>;
    auto call = std::make_unique<detail::PendingCallImpl<Reply, std::decay_t<Handler>>>(std::move(handler), executor_);
    if (closed_) return call->complete(errc::connection_lost, {});
    if (with_fd && !is_unix_) {
      last_error_message_ = "KV cache registration needs a unix: endpoint (memfd is passed with SCM_RIGHTS)";
      log::warn("kvlink: {} not sent: {}", wire::opcode_name(Request::opcode), last_error_message_);
      return call->complete(errc::bad_request, {});
    }
    if (with_fd && !fd) {
      last_error_message_ = "the file descriptor to pass is not open (dup failed)";
      return call->complete(errc::bad_request, {});
    }
    // The heartbeat has a slot of its own beyond the data path's budget: a
    // full pipeline of transfers never makes a PING look like a failure.
    const bool ping = Request::opcode == wire::Opcode::ping;
    if (pending_.size() >= max_in_flight_ + (ping ? 1u : 0u)) {
      log::warn("kvlink: {} not sent: {} requests already in flight on this connection", wire::opcode_name(Request::opcode),
                pending_.size());
      return call->complete(errc::limit_exceeded, {});
    }
    const std::uint64_t id = next_id_++;
    call->id = id;
    call->deadline = Clock::now() + timeout;
    auto slot = asio::get_associated_cancellation_slot(call->handler);
    if (slot.is_connected()) {
      slot.assign([weak = weak_from_this(), id](asio::cancellation_type) {
        if (auto self = weak.lock()) self->cancel_call(id);
      });
    }
    ++stats_.calls;
    if (fd) attach_fd(std::move(fd));
    send_frame(static_cast<std::uint8_t>(Request::opcode), 0, id, &encode_request<Request>, &request);
    arm_deadline(call->deadline, id);
    pending_.emplace(id, std::move(call));
  }

  // The framed socket is behind these (connection.cpp), so this header
  // needs none of it: one indirect call per frame to encode the payload
  // straight into the send buffer, no allocation.
  using EncodeFn = void (*)(wire::Writer&, const void* request);
  template <class Request>
  static void encode_request(wire::Writer& w, const void* request) {
    wire::encode(w, *static_cast<const Request*>(request));
  }
  void send_frame(std::uint8_t opcode, std::uint16_t flags, std::uint64_t id, EncodeFn encode, const void* request);
  void attach_fd(UniqueFd fd);

  asio::awaitable<void> read_loop();
  bool on_frame(const wire::Frame& frame);
  void cancel_call(std::uint64_t id);
  void arm_deadline(Clock::time_point deadline, std::uint64_t id);
  void rearm_deadline_timer();
  void on_deadline_timer();
  void fail_all(const Error& end);

  executor_type executor_;
  std::unique_ptr<FrameStream> stream_;
  std::unordered_map<std::uint64_t, std::unique_ptr<detail::PendingCall>> pending_;
  // Deadlines as a min-heap with lazy removal: answered calls stay until
  // popped or until a compaction, which bounds it by the pending count.
  std::vector<std::pair<Clock::time_point, std::uint64_t>> deadlines_;
  asio::steady_timer deadline_timer_;
  Clock::time_point timer_armed_for_ = Clock::time_point::max();
  std::uint64_t next_id_ = 1;
  std::uint32_t max_in_flight_ = 1u << 16;
  bool closed_ = false;
  ConnectionStats stats_;
  std::string last_error_message_;
  bool is_unix_ = false;  // fds can be passed
  std::function<void(const Error&)> on_close_;
  std::function<void(const wire::ServerNotice&)> on_notice_;
};

// Result of connect(): a connection that has completed HELLO, or why not.
// (A struct rather than Result<T>: Asio's co_spawn default-constructs the
// value it hands over with an exception.)
struct ConnectResult {
  Error error;  // its detail names the endpoint
  std::shared_ptr<Connection> connection;
  wire::HelloReply hello;
};

// Connects, runs HELLO and applies the server's limits, all within
// `timeout`. Never throws; a failure is described in the result.
asio::awaitable<ConnectResult> connect(asio::any_io_executor ex, Endpoint endpoint, wire::HelloRequest hello,
                                       Clock::duration timeout);

// A random 63-bit instance id, never 0.
std::uint64_t random_instance_id();
// 16 random bytes binding an instance id to its owner (HelloRequest).
std::string random_instance_secret();

}  // namespace kvlink::net
