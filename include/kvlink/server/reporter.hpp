// How the handler's pieces answer failures and tell the operator: error
// replies (counted for STATS), warnings within a connection's share of the
// log, and events for the status page.
#pragma once

#include <string>
#include <string_view>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/server/server_counters.hpp"
#include "kvlink/server/session.hpp"
#include "kvlink/server/status.hpp"

namespace kvlink::server {

class Reporter {
 public:
  explicit Reporter(ServerCounters& counters) : counters_(counters) {}

  // The session and time of the frame being handled: fail() logs a dropped
  // one-way request through that session's log limiter. Ends with the Turn.
  class Turn {
   public:
    Turn(Reporter& r, SessionState& session, TimePoint now) : r_(r) {
      r_.turn_session_ = &session;
      r_.turn_now_ = now;
    }
    ~Turn() { r_.turn_session_ = nullptr; }
    Turn(const Turn&) = delete;
    Turn& operator=(const Turn&) = delete;

   private:
    Reporter& r_;
  };

  // Counts the failed request and replies with the error; a one-way
  // request gets no reply, so it is logged instead.
  void fail(const wire::Frame& frame, ReplySink& sink, std::error_code code, std::string_view message);
  void fail(const wire::Frame& frame, ReplySink& sink, const Error& err) {
    fail(frame, sink, err.code(), err.message());
  }
  // Decodes the frame's message; false after failing with `code`.
  template <class M>
  bool parse(const wire::Frame& frame, ReplySink& sink, M& msg, std::error_code code = errc::protocol_error) {
    if (Error err = wire::decode(frame.payload, msg)) {
      fail(frame, sink, code, err.message());
      return false;
    }
    return true;
  }
  // A warning caused by the session's client, through its log limiter:
  // held back past its share, summarised once its window ended (and at
  // the session's end).
  void warn(SessionState& session, TimePoint now, std::string_view line);
  void report_held_back(SessionState& session, TimePoint now, bool final);
  // A refusal: warned through the session's limiter, and an event.
  void refused(SessionState& session, TimePoint now, std::string line);
  // Logs `line` at info (a refusal at warn) and records it as an event of `instance`.
  void event(ServerEvent::Kind kind, std::uint64_t instance, TimePoint now, std::string line);

  ServerCounters& counters() { return counters_; }
  const EventLog& events() const { return events_; }

 private:
  ServerCounters& counters_;
  EventLog events_;
  SessionState* turn_session_ = nullptr;
  TimePoint turn_now_{};
};

}  // namespace kvlink::server
