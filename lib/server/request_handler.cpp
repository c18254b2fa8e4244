#include "kvlink/server/request_handler.hpp"

#include <fmt/format.h>

#include "kvlink/log.hpp"
#include "kvlink/version.hpp"

namespace kvlink::server {

void reply_error(ReplySink& sink, const wire::Header& req, std::error_code code, std::string_view message) {
  wire::ErrorReply err{to_wire(code), std::string(message)};
  wire::FrameBuilder(sink.buffer()).add(req.opcode, wire::flag::response | wire::flag::error, req.id,
                                        [&](wire::Writer& w) { wire::encode(w, err); });
  sink.flush();
}

RequestHandler::RequestHandler(const ServerConfig& config, std::uint64_t boot_id)
    : config_(config),
      boot_id_(boot_id),
      liveness_({std::chrono::seconds(config.reap_timeout_s), std::chrono::seconds(config.registration_grace_s)}) {}

void RequestHandler::fail(const wire::Frame& frame, ReplySink& sink, std::error_code code, std::string_view message) {
  if (frame.header.opcode <= wire::max_opcode) ++counters_.ops[frame.header.opcode].errors;
  if (code == errc::protocol_error) ++counters_.protocol_errors;
  // One-way requests get no reply, not even an error: log it instead.
  if (frame.header.is_one_way()) {
    log::warn("kvlink-server: dropped one-way {}: {}", wire::opcode_name(frame.header.opcode), message);
    return;
  }
  reply_error(sink, frame.header, code, message);
}

void RequestHandler::on_session_end(SessionState&, TimePoint) {}

void RequestHandler::tick(TimePoint now) {
  if (std::size_t n = liveness_.reap(now); n > 0) log::info("kvlink-server: reaped {} silent instance(s)", n);
}

bool RequestHandler::handle(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  const wire::Header& h = frame.header;
  if (h.is_response()) {
    ++counters_.protocol_errors;
    reply_error(sink, h, errc::protocol_error, "clients send requests, not responses; closing the connection");
    return false;
  }
  if (h.opcode == 0 || h.opcode > wire::max_opcode) {
    ++counters_.unknown_opcodes;
    if (!h.is_one_way())
      reply_error(sink, h, errc::unknown_opcode,
                  fmt::format("unknown operation {}; this server speaks protocol version {}", h.opcode,
                              wire::protocol_version));
    return true;
  }
  ++counters_.ops[h.opcode].requests;
  const auto op = static_cast<wire::Opcode>(h.opcode);
  if (op == wire::Opcode::hello) return on_hello(session, frame, sink, now);
  if (!session.hello_done) {
    fail(frame, sink, errc::bad_request,
         fmt::format("{} before HELLO: open every connection with HELLO", wire::opcode_name(h.opcode)));
    return true;
  }
  const bool known = liveness_.refresh(session.instance_id, now);  // any traffic keeps an instance alive
  if (op == wire::Opcode::register_kv_cache) liveness_.registered(session.instance_id, now);
  switch (op) {
    case wire::Opcode::ping: {
      wire::PingRequest req;
      if (auto why = wire::decode(frame.payload, req); !why.empty()) {
        fail(frame, sink, errc::protocol_error, why);
        return true;
      }
      if (!known) {
        fail(frame, sink, errc::unknown_instance,
             fmt::format("instance {:016x} is unknown here (reaped after silence, or the server restarted): send "
                         "HELLO and register again",
                         session.instance_id));
        return true;
      }
      liveness_.pinged(session.instance_id, now);
      reply(sink, h, wire::Empty{});
      return true;
    }
    case wire::Opcode::stats:
      on_stats(frame, sink);
      return true;
    default:
      fail(frame, sink, errc::unknown_opcode,
           fmt::format("{} is not implemented by this server build", wire::opcode_name(h.opcode)));
      return true;
  }
}

bool RequestHandler::on_hello(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  wire::HelloRequest req;
  std::string why = wire::decode(frame.payload, req);
  if (!why.empty()) {
    const bool version = req.protocol_version != wire::protocol_version;
    fail(frame, sink, version ? errc::version_mismatch : errc::bad_request, why);
    return !version;  // a client of another version cannot go on
  }
  session.hello_done = true;
  session.role = req.role;
  session.instance_id = req.instance_id;
  session.client_name = req.client_name;
  liveness_.hello(req.instance_id, now);
  log::debug("kvlink-server: HELLO from {} {:016x} ({})", wire::role_name(req.role), req.instance_id, req.client_name);
  wire::HelloReply r;
  r.boot_id = boot_id_;
  r.chunk_size = config_.chunk_size;
  r.max_payload = config_.max_payload;
  r.max_in_flight = config_.max_in_flight;
  r.capabilities = 0;
  r.server_version = version_string;
  reply(sink, frame.header, r);
  return true;
}

void RequestHandler::on_stats(const wire::Frame& frame, ReplySink& sink) {
  wire::StatsReply r;
  auto add = [&](std::string name, std::uint64_t value) {
    r.entries.push_back({std::move(name), static_cast<std::int64_t>(value)});
  };
  add("connections_open", counters_.connections_open);
  add("connections_accepted", counters_.connections_accepted);
  add("connections_refused", counters_.connections_refused);
  add("protocol_errors", counters_.protocol_errors);
  add("unknown_opcodes", counters_.unknown_opcodes);
  add("instances_live", liveness_.size());
  add("instances_reaped", liveness_.reaped());
  for (std::uint8_t op = 1; op <= wire::max_opcode; ++op) {
    std::string name = wire::opcode_name(op);
    for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    add("op_" + name + "_requests", counters_.ops[op].requests);
    add("op_" + name + "_errors", counters_.ops[op].errors);
  }
  reply(sink, frame.header, r);
}

}  // namespace kvlink::server
