#include "kvlink/server/handshake.hpp"

#include <fmt/format.h>

#include "kvlink/log.hpp"
#include "kvlink/version.hpp"

namespace kvlink::server {

bool constant_time_equal(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  // volatile: keep the compiler from turning the loop into an early exit.
  volatile unsigned char result = diff;
  return result == 0;
}

Handshake::Handshake(const ServerConfig& config, Identity identity, LivenessRegistry& liveness, Reporter& reporter,
                     InFlight& in_flight, Hooks hooks)
    : config_(config),
      identity_(identity),
      liveness_(liveness),
      reporter_(reporter),
      in_flight_(in_flight),
      hooks_(std::move(hooks)) {
  liveness_.on_release([this](std::uint64_t instance) { reaped(instance); });
}

void Handshake::forget(std::uint64_t instance) {
  instances_.erase(instance);
  in_flight_.forget(instance);
}

bool Handshake::hello(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  wire::HelloRequest req;
  if (Error err = wire::decode(frame.payload, req)) {
    const bool version = req.protocol_version != wire::protocol_version;
    reporter_.fail(frame, sink, version ? errc::version_mismatch : errc::bad_request, err.message());
    return !version;  // a client of another version cannot go on
  }
  ServerCounters& counters = reporter_.counters();
  if (!config_.auth_token.empty() && !constant_time_equal(req.auth_token, config_.auth_token)) {
    ++counters.auth_failures;
    reporter_.refused(session, now,
                      fmt::format("HELLO from {} ({}) refused: {} auth token", session.peer.text, req.client_name,
                                  req.auth_token.empty() ? "no" : "wrong"));
    reporter_.fail(frame, sink, errc::unauthorized,
                   fmt::format("{} auth token in HELLO: this server requires the shared secret of its "
                               "--auth-token-file (clients read it from KVLINK_AUTH_TOKEN or their token-file "
                               "option); closing the connection",
                               req.auth_token.empty() ? "no" : "wrong"));
    return false;
  }
  if (session.hello_done && req.instance_id != session.instance_id) {
    reporter_.fail(frame, sink, errc::bad_request,
                   "HELLO with another instance id on an open connection; one connection speaks for one instance");
    return true;
  }
  if (session.hello_done && req.role != session.role) {
    reporter_.fail(frame, sink, errc::bad_request,
                   fmt::format("HELLO as {} on a connection that said HELLO as {}; one connection keeps its role",
                               wire::role_name(req.role), wire::role_name(session.role)));
    return true;
  }
  // Admin connections (kvlink-cli) are not instances: no liveness entry,
  // no --max-instances slot, nothing left behind when they close.
  const bool admin = req.role == wire::Role::admin;
  if (!admin) {
    auto bound = instances_.find(req.instance_id);
    if (bound != instances_.end() && !constant_time_equal(bound->second.secret, req.instance_secret)) {
      ++counters.instance_claims_refused;
      reporter_.refused(session, now,
                        fmt::format("HELLO from {} ({}) refused: it claims the instance id of another client",
                                    session.peer.text, req.client_name));
      log::debug("kvlink-server: the refused claim was for instance {:016x}", req.instance_id);
      reporter_.fail(frame, sink, errc::unauthorized,
                     "HELLO refused: this instance id belongs to another client (its HELLO carried another instance "
                     "secret); every engine process draws its own id and secret (the adapters do); closing the "
                     "connection");
      return false;
    }
  }
  if (!admin && !liveness_.known(req.instance_id) && liveness_.size() >= config_.max_instances) {
    ++counters.instances_refused;
    reporter_.refused(session, now,
                      fmt::format("HELLO from {} ({}) refused: the server already knows {} instances (--max-instances)",
                                  session.peer.text, req.client_name, liveness_.size()));
    reporter_.fail(frame, sink, errc::limit_exceeded,
                   fmt::format("HELLO refused: the server already knows {} instances, its limit (--max-instances); "
                               "raise it, or wait until silent instances are reaped; closing the connection",
                               liveness_.size()));
    return false;
  }
  // A repeated HELLO of the same instance re-announces it after the server
  // forgot it (unknown_instance); the connection is counted once.
  const bool first_hello = !session.hello_done;
  if (!admin && !session.counted) {
    session.counted = true;
    ++connections_[req.instance_id];
  }
  session.hello_done = true;
  session.role = req.role;
  session.instance_id = req.instance_id;
  session.client_name = req.client_name;
  const bool registered = !admin && hooks_.registered(req.instance_id);
  if (!admin) {
    auto [known, fresh] = instances_.try_emplace(req.instance_id);
    Instance& instance = known->second;
    if (fresh) {
      instance.secret = req.instance_secret;
      in_flight_.forget(req.instance_id);  // a new record counts only its own transfers
    }
    liveness_.hello(req.instance_id, now);
    // A registration made while the reaper had forgotten this (connected)
    // instance: known again, it is kept and reaped like any other.
    liveness_.registered(req.instance_id, now, registered);
    instance.label = fmt::format("{} ({})", session.peer.text, req.client_name);
    instance.role = req.role;
    instance.client = req.client_name;
    instance.peer = session.peer;
    if (first_hello)
      reporter_.event(ServerEvent::Kind::connect, req.instance_id, now,
                      fmt::format("{} connected as {}{}", instance.label, wire::role_name(req.role),
                                  registered ? "; its KV-cache registration was kept" : ""));
  }
  log::debug("kvlink-server: HELLO from {} {:016x} ({})", wire::role_name(req.role), req.instance_id, req.client_name);
  wire::HelloReply r;
  r.boot_id = identity_.boot_id;
  r.chunk_size = config_.chunk_size;
  r.max_payload = config_.max_payload;
  r.max_in_flight = config_.max_in_flight;
  r.capabilities = identity_.capabilities;
  r.server_version = version_string;
  // A reconnecting worker learns here whether it must REGISTER again.
  r.registered = registered ? 1 : 0;
  r.draining = hooks_.draining() ? 1 : 0;
  reply(sink, frame.header, r);
  return true;
}

void Handshake::connection_closed(SessionState& session, TimePoint now) {
  if (session.admin()) {
    // Its lookups' locks, unless an instance of that id is connected (ids
    // are random: a clash is a client's bug, and locks are only hints).
    if (!connections_.contains(session.instance_id)) hooks_.release_scheduler_state(session.instance_id);
    return;
  }
  if (!session.counted) return;
  session.counted = false;
  const std::uint64_t instance = session.instance_id;
  auto c = connections_.find(instance);
  if (c == connections_.end() || --c->second > 0) return;  // another connection of this instance remains
  connections_.erase(c);
  if (auto known = instances_.find(instance); known != instances_.end())
    reporter_.event(ServerEvent::Kind::disconnect, instance, now,
                    fmt::format("{} disconnected{}", known->second.label,
                                liveness_.holds_registration(instance)
                                    ? "; its KV-cache registration is kept until it comes back, unregisters or is "
                                      "reaped"
                                    : ""));
  // Locks and jobs belong to requests the engine can no longer finish over
  // this link: release them now. The registration (the engine's memory
  // layout) stays valid across a reconnect, so it waits for the instance
  // to come back, UNREGISTER or be reaped.
  hooks_.release_scheduler_state(instance);
  if (!liveness_.known(instance)) {
    // Reaped while connected and never said HELLO again: a registration it
    // made since is not in the registry, so no reaper would ever end it.
    hooks_.drop_registration(instance);
    forget(instance);
    return;
  }
  if (liveness_.last_connection_closed(instance)) {
    forget(instance);
    log::debug("kvlink-server: instance {:016x} left (no KV cache registered): forgotten", instance);
  } else {
    log::debug("kvlink-server: instance {:016x} disconnected; its KV-cache registration is kept until it "
               "reconnects, unregisters or is reaped",
               instance);
  }
}

void Handshake::reap(TimePoint now) {
  reap_now_ = now;
  liveness_.reap(now);  // reaped() logs each one
}

void Handshake::reaped(std::uint64_t instance) {
  auto known = instances_.find(instance);
  reporter_.event(ServerEvent::Kind::reap, instance, reap_now_,
                  fmt::format("reaped {}: silent past its reap timeout{}",
                              known != instances_.end() ? known->second.label
                                                        : fmt::format("instance {:016x}", instance),
                              hooks_.registered(instance) ? "; its KV-cache registration is dropped" : ""));
  forget(instance);
  hooks_.release_scheduler_state(instance);
  hooks_.drop_registration(instance);
}

std::vector<InstanceStatus> Handshake::instances(TimePoint now) const {
  std::vector<InstanceStatus> out;
  out.reserve(instances_.size());
  for (const auto& [id, known] : instances_) {
    InstanceStatus i;
    i.id = id;
    i.role = known.role;
    i.client = known.client;
    i.peer = known.peer;
    if (auto c = connections_.find(id); c != connections_.end()) i.connections = c->second;
    if (auto seen = liveness_.last_seen(id)) i.since_seen = now - *seen;
    i.transfers_in_flight = in_flight_.of_instance(id);
    out.push_back(std::move(i));
  }
  return out;
}

}  // namespace kvlink::server
