// One connection as the request handler sees it: where its replies go
// (ReplySink) and what the handler keeps about it (SessionState).
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/log_limiter.hpp"
#include "kvlink/server/peer.hpp"
#include "kvlink/server/sliced_work.hpp"
#include "kvlink/unique_fd.hpp"
#include "kvlink/wire/messages.hpp"

namespace kvlink::server {

// Where a session's replies go: frames are appended to buffer(), then
// flush() hands them to the transport. A reply sent later (when slow work
// completes) holds weak_self() and drops the reply if the session is gone.
class ReplySink {
 public:
  virtual wire::Bytes& buffer() = 0;
  virtual void flush() = 0;
  virtual std::weak_ptr<ReplySink> weak_self() = 0;

 protected:
  ~ReplySink() = default;
};

// Per-connection state the handler keeps.
struct SessionState {
  bool hello_done = false;
  wire::Role role = wire::Role::scheduler;
  std::uint64_t instance_id = 0;
  std::string client_name;
  Peer peer;  // set by the network layer when the connection is accepted
  bool counted = false;  // counted in the handler's per-instance connections (admins never are)
  // An admin connection (kvlink-cli): not an instance, never in the
  // liveness registry, cannot register, store or retrieve.
  bool admin() const { return hello_done && role == wire::Role::admin; }
  // File descriptors received on the connection (SCM_RIGHTS, unix sockets
  // only), oldest first. Each REGISTER_KV_CACHE takes the oldest (the
  // client sends the memfd with the frame's bytes, so it arrives no later
  // than the frame); the rest are closed when the session ends.
  std::deque<UniqueFd> received_fds;
  // Requests of this connection still being worked on (their copies run):
  // shared with the completions, which may outlive the session (see InFlight).
  std::shared_ptr<std::uint32_t> in_flight = std::make_shared<std::uint32_t>(0);
  // A request of this connection left half done after a slice (see
  // sliced_work.hpp): the network layer holds later frames and calls
  // RequestHandler::continue_work until it finishes.
  UnfinishedWork unfinished;
  // Bounds the warnings this connection can cause (malformed one-way
  // requests, refused HELLOs): a client cannot flood the log.
  LogLimiter log_limiter;
};

// Appends a reply to request `req` carrying `msg`.
template <class Message>
void reply(ReplySink& sink, const wire::Header& req, const Message& msg) {
  wire::FrameBuilder(sink.buffer()).add(req.opcode, wire::flag::response, req.id,
                                        [&](wire::Writer& w) { wire::encode(w, msg); });
  sink.flush();
}

// Appends an error reply (code + message) to request `req`.
void reply_error(ReplySink& sink, const wire::Header& req, std::error_code code, std::string_view message);

// Runs the first slice of `work`; what is left becomes session.unfinished.
void run_sliced(SessionState& session, ReplySink& sink, TimePoint now, UnfinishedWork work);
// Runs the next slice of the session's unfinished request. Returns true
// once nothing is left.
bool continue_work(SessionState& session, ReplySink& sink, TimePoint now);

}  // namespace kvlink::server
