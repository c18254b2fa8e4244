// The server's request handling, free of Asio (sans-io): it sees decoded
// frames and writes reply frames into a ReplySink. The Asio session feeds it
// from a socket; tests and the fuzzer feed it bytes directly.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include <memory>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/server/config.hpp"
#include "kvlink/server/liveness.hpp"
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
};

struct OpCounters {
  std::uint64_t requests = 0;
  std::uint64_t errors = 0;
};

struct ServerCounters {
  std::array<OpCounters, wire::max_opcode + 1> ops{};  // indexed by opcode
  std::uint64_t unknown_opcodes = 0;
  std::uint64_t protocol_errors = 0;  // malformed frames or messages
  std::uint64_t connections_accepted = 0;
  std::uint64_t connections_refused = 0;
  std::uint64_t connections_open = 0;
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

class RequestHandler {
 public:
  RequestHandler(const ServerConfig& config, std::uint64_t boot_id);

  // Handles one frame of a session at time `now`. Returns false when the
  // connection must be closed (after the replies already in the sink are sent).
  bool handle(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);

  // The session's connection ended (closed by either side).
  void on_session_end(SessionState& session, TimePoint now);

  // Called periodically (every tick_interval) for timed housekeeping.
  void tick(TimePoint now);
  static constexpr std::chrono::milliseconds tick_interval{100};

  std::uint64_t boot_id() const { return boot_id_; }
  ServerCounters& counters() { return counters_; }
  const ServerCounters& counters() const { return counters_; }
  // Which instances are alive; the store sets its release hook here.
  LivenessRegistry& liveness() { return liveness_; }

 private:
  bool on_hello(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);
  void on_stats(const wire::Frame& frame, ReplySink& sink);
  void fail(const wire::Frame& frame, ReplySink& sink, std::error_code code, std::string_view message);

  const ServerConfig& config_;
  std::uint64_t boot_id_;
  ServerCounters counters_;
  LivenessRegistry liveness_;
};

}  // namespace kvlink::server
