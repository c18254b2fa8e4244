#include "kvlink/server/reporter.hpp"

#include <fmt/format.h>

#include "kvlink/log.hpp"

namespace kvlink::server {

void Reporter::fail(const wire::Frame& frame, ReplySink& sink, std::error_code code, std::string_view message) {
  if (frame.header.opcode <= wire::max_opcode) ++counters_.ops[frame.header.opcode].errors;
  if (code == errc::protocol_error) ++counters_.protocol_errors;
  // One-way requests get no reply, not even an error: log it instead
  // (within the connection's share of the log; the counters count all).
  if (frame.header.is_one_way()) {
    if (log::level() > log::Level::warn) return;
    const std::string line =
        fmt::format("kvlink-server: dropped one-way {} from {}: {}", wire::opcode_name(frame.header.opcode),
                    turn_session_ ? std::string_view(turn_session_->peer.text) : std::string_view("a client"), message);
    if (turn_session_) warn(*turn_session_, turn_now_, line);
    else log::warn("{}", line);
    return;
  }
  reply_error(sink, frame.header, code, message);
}

void Reporter::refused(SessionState& session, TimePoint now, std::string line) {
  if (log::level() <= log::Level::warn) warn(session, now, "kvlink-server: " + line);
  events_.record(now, ServerEvent::Kind::refusal, session.instance_id, std::move(line));
}

void Reporter::warn(SessionState& session, TimePoint now, std::string_view line) {
  report_held_back(session, now, false);
  if (session.log_limiter.allow(now)) log::warn("{}", line);
}

void Reporter::report_held_back(SessionState& session, TimePoint now, bool final) {
  if (const std::uint64_t n = session.log_limiter.take_held_back(now, final); n > 0)
    log::warn("kvlink-server: ... and {} more like this from {} not logged (at most {} a second per "
              "connection; the STATS counters count every one)",
              n, session.peer.text, session.log_limiter.config().lines);
}

void Reporter::event(ServerEvent::Kind kind, std::uint64_t instance, TimePoint now, std::string line) {
  if (kind == ServerEvent::Kind::refusal) log::warn("kvlink-server: {}", line);
  else log::info("kvlink-server: {}", line);
  events_.record(now, kind, instance, std::move(line));
}

}  // namespace kvlink::server
