#include "kvlink/server/request_handler.hpp"

#include <algorithm>
#include <fmt/format.h>
#include <set>
#include <span>

#include "kvlink/log.hpp"
#include "kvlink/server/inbound_budget.hpp"
#include "kvlink/store/keys.hpp"
#include "kvlink/version.hpp"

namespace kvlink::server {

using store::ChunkKey;

void reply_error(ReplySink& sink, const wire::Header& req, std::error_code code, std::string_view message) {
  wire::ErrorReply err{to_wire(code), std::string(message)};
  wire::FrameBuilder(sink.buffer()).add(req.opcode, wire::flag::response | wire::flag::error, req.id,
                                        [&](wire::Writer& w) { wire::encode(w, err); });
  sink.flush();
}

bool constant_time_equal(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  // volatile: keep the compiler from turning the loop into an early exit.
  volatile unsigned char result = diff;
  return result == 0;
}

transfer::TransferEngine& default_transfer_engine() {
  static transfer::NullTransferEngine engine;
  return engine;
}

namespace {
store::StoreConfig store_config(const ServerConfig& c) {
  store::StoreConfig s;
  s.read_lock_ttl = c.read_lock_ttl;
  s.write_lock_ttl = c.write_lock_ttl;
  s.high_watermark = c.high_watermark;
  s.low_watermark = c.low_watermark;
  return s;
}
}  // namespace

RequestHandler::RequestHandler(const ServerConfig& config, std::uint64_t boot_id, transfer::TransferEngine& engine)
    : config_(config),
      boot_id_(boot_id),
      liveness_({std::chrono::seconds(config.reap_timeout_s), std::chrono::seconds(config.registration_grace_s)}),
      engine_(engine),
      pool_(config.l1_size, config.huge_pages, config.l1_slab_size),
      store_(pool_, store_config(config)) {
  liveness_.on_release([this](std::uint64_t instance) { release_instance(instance); });
}

RequestHandler::~RequestHandler() { *alive_ = false; }

template <class M>
bool RequestHandler::parse(const wire::Frame& frame, ReplySink& sink, M& msg, std::error_code code) {
  if (auto why = wire::decode(frame.payload, msg); !why.empty()) {
    fail(frame, sink, code, why);
    return false;
  }
  return true;
}

void RequestHandler::fail(const wire::Frame& frame, ReplySink& sink, std::error_code code, std::string_view message) {
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

void RequestHandler::refused(SessionState& session, TimePoint now, std::string line) {
  if (log::level() <= log::Level::warn) warn(session, now, "kvlink-server: " + line);
  events_.record(now, ServerEvent::Kind::refusal, session.instance_id, std::move(line));
}

void RequestHandler::warn(SessionState& session, TimePoint now, std::string_view line) {
  report_held_back(session, now, false);
  if (session.log_limiter.allow(now)) log::warn("{}", line);
}

void RequestHandler::report_held_back(SessionState& session, TimePoint now, bool final) {
  if (const std::uint64_t n = session.log_limiter.take_held_back(now, final); n > 0)
    log::warn("kvlink-server: ... and {} more like this from {} not logged (at most {} a second per "
              "connection; the STATS counters count every one)",
              n, session.peer.text, session.log_limiter.config().lines);
}

bool RequestHandler::release_locks(const RequestSession& s, LockRelease& at, std::size_t& budget) {
  for (; at.record < s.locked.size(); ++at.record, at.started = false) {
    const std::uint64_t ns = s.locked[at.record].first;
    const auto& hashes = s.locked[at.record].second;
    if (!at.started) {
      at.loop = SlicedLoop(hashes.size(), s.world_size);
      at.started = true;
    }
    const bool done = at.loop.run(budget, [&](std::size_t i, std::uint32_t r) {
      store_.release_all(ChunkKey{ns, hashes[i], r}, s.holder);
    });
    if (!done) return false;
  }
  return true;
}

RequestHandler::Sessions::iterator RequestHandler::end_session(Sessions::iterator it) {
  if (!it->second.locked.empty()) ended_.emplace_back(std::move(it->second), LockRelease{});
  return sessions_.erase(it);
}

bool RequestHandler::release_ended(std::size_t budget) {
  while (!ended_.empty()) {
    auto& [session, at] = ended_.front();
    if (!release_locks(session, at, budget)) return false;
    ended_.pop_front();
  }
  return true;
}

void RequestHandler::release_retrieved(std::uint64_t session_id, std::uint64_t ns, std::uint32_t rank,
                                       std::span<const wire::ChunkHash> hashes) {
  if (session_id == 0) return;
  for (auto it = sessions_.lower_bound({session_id, 0}); it != sessions_.end() && it->first.first == session_id; ++it)
    for (const auto& h : hashes) store_.release_all(ChunkKey{ns, h, rank}, it->second.holder);
}

void RequestHandler::on_session_end(SessionState& session, TimePoint now) {
  session.received_fds.clear();  // closes fds no REGISTER took
  session.unfinished = nullptr;  // nobody is left to answer
  report_held_back(session, now, true);
  if (session.admin()) {
    // Its lookups' locks, unless an instance of that id is connected (ids
    // are random: a clash is a client's bug, and locks are only hints).
    if (!connections_.contains(session.instance_id)) release_scheduler_state(session.instance_id);
    return;
  }
  if (!session.counted) return;
  session.counted = false;
  const std::uint64_t instance = session.instance_id;
  auto c = connections_.find(instance);
  if (c == connections_.end() || --c->second > 0) return;  // another connection of this instance remains
  connections_.erase(c);
  if (auto known = instances_.find(instance); known != instances_.end())
    event(ServerEvent::Kind::disconnect, instance, now,
          fmt::format("{} disconnected{}", known->second.label,
                      liveness_.holds_registration(instance)
                          ? "; its KV-cache registration is kept until it comes back, unregisters or is reaped"
                          : ""));
  // Locks and jobs belong to requests the engine can no longer finish over
  // this link: release them now. The registration (the engine's memory
  // layout) stays valid across a reconnect, so it waits for the instance
  // to come back, UNREGISTER or be reaped.
  release_scheduler_state(instance);
  if (!liveness_.known(instance)) {
    // Reaped while connected and never said HELLO again: a registration it
    // made since is not in the registry, so no reaper would ever end it.
    registrations_.erase(instance);
    instances_.erase(instance);
    return;
  }
  if (liveness_.last_connection_closed(instance)) {
    instances_.erase(instance);
    log::debug("kvlink-server: instance {:016x} left (no KV cache registered): forgotten", instance);
  } else {
    log::debug("kvlink-server: instance {:016x} disconnected; its KV-cache registration is kept until it "
               "reconnects, unregisters or is reaped",
               instance);
  }
}

void RequestHandler::release_scheduler_state(std::uint64_t instance) {
  for (auto it = sessions_.begin(); it != sessions_.end();) it = it->first.second == instance ? end_session(it) : std::next(it);
  release_ended();
  std::erase_if(jobs_, [&](const auto& j) { return j.second.instance_id == instance; });
}

// Reaped: the instance is gone for good (a later HELLO starts afresh).
void RequestHandler::release_instance(std::uint64_t instance) {
  auto known = instances_.extract(instance);
  event(ServerEvent::Kind::reap, instance, reap_now_,
        fmt::format("reaped {}: silent past its reap timeout{}",
                    known ? known.mapped().label : fmt::format("instance {:016x}", instance),
                    registrations_.contains(instance) ? "; its KV-cache registration is dropped" : ""));
  release_scheduler_state(instance);
  registrations_.erase(instance);
}

void RequestHandler::transfer_started(std::uint64_t instance) {
  ++transfers_in_flight_;
  if (auto it = instances_.find(instance); it != instances_.end()) ++it->second.transfers_in_flight;
}

void RequestHandler::transfer_ended(std::uint64_t instance, std::uint8_t opcode, Duration took) {
  --transfers_in_flight_;
  // A reaped instance (forgotten while its copy ran) counts nothing more.
  if (auto it = instances_.find(instance); it != instances_.end() && it->second.transfers_in_flight > 0)
    --it->second.transfers_in_flight;
  observe_latency(opcode, took);
}

void RequestHandler::event(ServerEvent::Kind kind, std::uint64_t instance, TimePoint now, std::string line) {
  if (kind == ServerEvent::Kind::refusal) log::warn("kvlink-server: {}", line);
  else log::info("kvlink-server: {}", line);
  events_.record(now, kind, instance, std::move(line));
}

// ---- planned restart -------------------------------------------------------------

std::uint64_t RequestHandler::begin_drain(TimePoint now, Duration timeout) {
  if (!draining_) {
    draining_ = true;
    drain_started_ = now;
    drain_deadline_ = now + timeout;
  }
  return transfers_in_flight_;
}

void RequestHandler::send_drain_notice(ReplySink& sink) const {
  const wire::ServerNotice notice{wire::NoticeKind::draining, std::string(drain_message)};
  wire::FrameBuilder(sink.buffer()).add(static_cast<std::uint8_t>(wire::Opcode::server_notice), wire::flag::one_way,
                                        0, [&](wire::Writer& w) { wire::encode(w, notice); });
  sink.flush();
}

DrainStep RequestHandler::drain_step(TimePoint now, std::size_t replies_queued) const {
  if (transfers_in_flight_ == 0 && replies_queued == 0) return DrainStep::drained;
  return now >= drain_deadline_ ? DrainStep::timed_out : DrainStep::wait;
}

bool RequestHandler::refuse_admin(const SessionState& session, const wire::Frame& frame, ReplySink& sink) {
  if (!session.admin()) return false;
  fail(frame, sink, errc::bad_request,
       fmt::format("{} from a connection that said HELLO as admin: admin connections (kvlink-cli ping, stats, "
                   "watch) are not instances and cannot register, store or retrieve; say HELLO as worker",
                   wire::opcode_name(frame.header.opcode)));
  return true;
}

bool RequestHandler::refuse_transfer(const SessionState& session, const wire::Frame& frame, ReplySink& sink) {
  if (refuse_admin(session, frame, sink)) return true;
  if (!draining_) return false;
  fail(frame, sink, errc::shutting_down,
       fmt::format("{} refused: {}", wire::opcode_name(frame.header.opcode), drain_message));
  return true;
}

void RequestHandler::tick(TimePoint now) {
  reap_now_ = now;
  liveness_.reap(now);  // release_instance logs each one
  store_.tick(now);
  while (!job_queue_.empty()) {
    auto it = jobs_.find(job_queue_.front());
    if (it != jobs_.end() && it->second.expiry > now) break;
    if (it != jobs_.end()) jobs_.erase(it);  // never polled
    job_queue_.pop_front();
  }
  if (now >= next_session_scan_) {
    next_session_scan_ = now + std::chrono::seconds(1);
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      it = it->second.last_seen + config_.session_ttl <= now ? end_session(it) : std::next(it);
    }
  }
  release_ended();
}

bool RequestHandler::handle(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  const wire::Header& h = frame.header;
  struct Turn {
    RequestHandler& self;
    ~Turn() { self.turn_session_ = nullptr; }
  } turn{*this};
  turn_session_ = &session;
  turn_now_ = now;
  // The network layer holds a connection's frames while a request of it is
  // unfinished; a caller that does not finishes it first, keeping order.
  while (!continue_work(session, sink, now)) {
  }
  // A REGISTER takes the oldest received fd whatever happens next, so a
  // failed registration's memfd is closed here, not handed to a later one.
  UniqueFd fd;
  if (h.opcode == static_cast<std::uint8_t>(wire::Opcode::register_kv_cache) && !session.received_fds.empty()) {
    fd = std::move(session.received_fds.front());
    session.received_fds.pop_front();
  }
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
  if (h.is_one_way() && !wire::one_way_allowed(op)) {
    // No reply could reach the sender's request: say so as the
    // connection's error (id 0), then close.
    ++counters_.protocol_errors;
    ++counters_.ops[h.opcode].errors;
    reply_error(sink, wire::Header{}, errc::protocol_error,
                fmt::format("{} was sent one-way, but it has a reply; only FREE_LOOKUP_LOCKS, END_SESSION and "
                            "REPORT_BLOCK_ALLOCATION may be sent one-way; closing the connection",
                            wire::opcode_name(h.opcode)));
    return false;
  }
  if (op == wire::Opcode::hello) return on_hello(session, frame, sink, now);
  // A client that honours HELLO's max_in_flight never gets here: it counts
  // every request until its reply, the server only those still working.
  // PING is answered at once and has a slot of its own: a full data path
  // must never make the heartbeat look like a dead server.
  if (*session.in_flight >= config_.max_in_flight && op != wire::Opcode::ping) {
    ++counters_.in_flight_refused;
    fail(frame, sink, errc::limit_exceeded,
         fmt::format("{} refused: this connection already has {} requests in progress, the server's limit "
                     "(--max-in-flight, announced in HELLO); wait for replies before sending more",
                     wire::opcode_name(h.opcode), *session.in_flight));
    return true;
  }
  if (!session.hello_done) {
    fail(frame, sink, errc::bad_request,
         fmt::format("{} before HELLO: open every connection with HELLO", wire::opcode_name(h.opcode)));
    return true;
  }
  // Any traffic keeps an instance alive (one registry lookup per request).
  // Admin connections are not instances: nothing to keep alive.
  using Traffic = LivenessRegistry::Traffic;
  const bool known = session.admin() ||
                     liveness_.refresh(session.instance_id, now,
                                       op == wire::Opcode::ping ? Traffic::ping : Traffic::other);
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
      wire::PingReply r;
      if (auto it = registrations_.find(session.instance_id); it != registrations_.end())
        r.data_path_error = engine_.fault(*it->second);
      reply(sink, h, r);
      return true;
    }
    case wire::Opcode::stats:
      on_stats(frame, sink);
      return true;
    case wire::Opcode::register_kv_cache:
      if (refuse_transfer(session, frame, sink)) return true;
      on_register(session, frame, sink, std::move(fd), now);
      return true;
    case wire::Opcode::unregister_kv_cache: {
      wire::UnregisterKvCacheRequest req;
      if (!parse(frame, sink, req) || refuse_admin(session, frame, sink)) return true;
      if (registrations_.erase(session.instance_id) > 0)  // idempotent
        event(ServerEvent::Kind::unregister, session.instance_id, now,
              fmt::format("{} ({}) unregistered its KV cache", session.peer.text, session.client_name));
      liveness_.registered(session.instance_id, now, false);
      reply(sink, h, wire::Empty{});
      return true;
    }
    case wire::Opcode::lookup:
      on_lookup(session, frame, sink, now, false);
      return true;
    case wire::Opcode::sync_lookup:
      on_lookup(session, frame, sink, now, true);
      return true;
    case wire::Opcode::query_prefetch_status:
      on_query(frame, sink);
      return true;
    case wire::Opcode::free_lookup_locks:
      on_free_locks(session, frame, sink, now);
      return true;
    case wire::Opcode::end_session:
      on_end_session(session, frame, sink, now);
      return true;
    case wire::Opcode::report_block_allocation: {
      wire::ReportBlockAllocationRequest req;
      if (!parse(frame, sink, req)) return true;
      ++block_reports_;
      engine_blocks_allocated_ = req.allocated_blocks;
      engine_blocks_total_ = req.total_blocks;
      if (!h.is_one_way()) reply(sink, h, wire::Empty{});
      return true;
    }
    case wire::Opcode::clear: {
      wire::ClearRequest req;
      if (!parse(frame, sink, req)) return true;
      // Sliced: dropping every chunk of a large L1 is long work.
      run_sliced(session, sink, now,
                 [this, header = h, dropped = std::uint64_t{0}](ReplySink& out, TimePoint,
                                                                std::size_t& budget) mutable {
                   const std::size_t n = store_.clear(budget);
                   dropped += n;
                   if (n == budget) {
                     budget = 0;
                     return false;
                   }
                   reply(out, header, wire::ClearResult{dropped});
                   return true;
                 });
      return true;
    }
    case wire::Opcode::store:
      if (refuse_transfer(session, frame, sink)) return true;
      on_store(session, frame, sink, now);
      return true;
    case wire::Opcode::retrieve:
      if (refuse_transfer(session, frame, sink)) return true;
      on_retrieve(session, frame, sink, now);
      return true;
    case wire::Opcode::server_notice:
      fail(frame, sink, errc::bad_request, "SERVER_NOTICE goes from servers to clients; a client never sends it");
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
  if (!config_.auth_token.empty() && !constant_time_equal(req.auth_token, config_.auth_token)) {
    ++counters_.auth_failures;
    refused(session, now,
            fmt::format("HELLO from {} ({}) refused: {} auth token", session.peer.text, req.client_name,
                        req.auth_token.empty() ? "no" : "wrong"));
    fail(frame, sink, errc::unauthorized,
         fmt::format("{} auth token in HELLO: this server requires the shared secret of its --auth-token-file "
                     "(clients read it from KVLINK_AUTH_TOKEN or their token-file option); closing the connection",
                     req.auth_token.empty() ? "no" : "wrong"));
    return false;
  }
  if (session.hello_done && req.instance_id != session.instance_id) {
    fail(frame, sink, errc::bad_request,
         "HELLO with another instance id on an open connection; one connection speaks for one instance");
    return true;
  }
  if (session.hello_done && req.role != session.role) {
    fail(frame, sink, errc::bad_request,
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
      ++counters_.instance_claims_refused;
      refused(session, now,
              fmt::format("HELLO from {} ({}) refused: it claims the instance id of another client",
                          session.peer.text, req.client_name));
      log::debug("kvlink-server: the refused claim was for instance {:016x}", req.instance_id);
      fail(frame, sink, errc::unauthorized,
           "HELLO refused: this instance id belongs to another client (its HELLO carried another instance secret); "
           "every engine process draws its own id and secret (the adapters do); closing the connection");
      return false;
    }
  }
  if (!admin && !liveness_.known(req.instance_id) && liveness_.size() >= config_.max_instances) {
    ++counters_.instances_refused;
    refused(session, now,
            fmt::format("HELLO from {} ({}) refused: the server already knows {} instances (--max-instances)",
                        session.peer.text, req.client_name, liveness_.size()));
    fail(frame, sink, errc::limit_exceeded,
         fmt::format("HELLO refused: the server already knows {} instances, its limit (--max-instances); raise it, "
                     "or wait until silent instances are reaped; closing the connection",
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
  if (!admin) {
    auto [known, fresh] = instances_.try_emplace(req.instance_id);
    Instance& instance = known->second;
    if (fresh) instance.secret = req.instance_secret;
    liveness_.hello(req.instance_id, now);
    // A registration made while the reaper had forgotten this (connected)
    // instance: known again, it is kept and reaped like any other.
    liveness_.registered(req.instance_id, now, registrations_.contains(req.instance_id));
    instance.label = fmt::format("{} ({})", session.peer.text, req.client_name);
    instance.role = req.role;
    instance.client = req.client_name;
    instance.peer = session.peer;
    if (first_hello)
      event(ServerEvent::Kind::connect, req.instance_id, now,
            fmt::format("{} connected as {}{}", instance.label, wire::role_name(req.role),
                        registrations_.contains(req.instance_id) ? "; its KV-cache registration was kept" : ""));
  }
  log::debug("kvlink-server: HELLO from {} {:016x} ({})", wire::role_name(req.role), req.instance_id, req.client_name);
  wire::HelloReply r;
  r.boot_id = boot_id_;
  r.chunk_size = config_.chunk_size;
  r.max_payload = config_.max_payload;
  r.max_in_flight = config_.max_in_flight;
  r.capabilities = engine_.capabilities();
  r.server_version = version_string;
  // A reconnecting worker learns here whether it must REGISTER again.
  r.registered = !admin && registrations_.contains(req.instance_id) ? 1 : 0;
  r.draining = draining_ ? 1 : 0;
  reply(sink, frame.header, r);
  return true;
}

std::uint64_t RequestHandler::quota_bytes() const {
  if (config_.instance_l1_quota_bytes > 0) return config_.instance_l1_quota_bytes;
  return static_cast<std::uint64_t>(config_.instance_l1_quota_fraction *
                                    static_cast<double>(std::uint64_t{pool_.num_slabs()} * pool_.slab_bytes()));
}

std::uint32_t RequestHandler::quota_slots(std::uint64_t slot_bytes) const {
  if (quota_bytes() == 0 || slot_bytes == 0) return 0;
  // The chunks of this size L1 can hold at most, when every slab is theirs.
  const std::uint64_t most = std::uint64_t{pool_.num_slabs()} * (pool_.slab_bytes() / slot_bytes);
  // A quota smaller than one chunk would refuse everything: one slot at least.
  return static_cast<std::uint32_t>(
      std::clamp<std::uint64_t>(quota_bytes() / slot_bytes, 1, std::max<std::uint64_t>(most, 1)));
}

void RequestHandler::on_stats(const wire::Frame& frame, ReplySink& sink) {
  reply(sink, frame.header, wire::StatsReply{stats()});
}

std::vector<wire::StatEntry> RequestHandler::stats() const {
  std::vector<wire::StatEntry> r;
  auto add = [&](std::string name, std::uint64_t value) {
    r.push_back({std::move(name), static_cast<std::int64_t>(value)});
  };
  add("connections_open", counters_.connections_open);
  add("connections_accepted", counters_.connections_accepted);
  add("connections_refused", counters_.connections_refused);
  add("protocol_errors", counters_.protocol_errors);
  add("unknown_opcodes", counters_.unknown_opcodes);
  add("in_flight_refused", counters_.in_flight_refused);
  add("instances_refused", counters_.instances_refused);
  add("auth_failures", counters_.auth_failures);
  add("instance_claims_refused", counters_.instance_claims_refused);
  add("frames_too_large", counters_.frames_too_large);
  add("reads_paused", counters_.reads_paused);
  add("connections_paused", counters_.connections_paused);
  add("slow_reader_closes", counters_.slow_reader_closes);
  add("inbound_buffered_bytes", counters_.inbound_buffered_bytes);
  add("inbound_limit_bytes", inbound_limit(config_));
  add("inbound_refused", counters_.inbound_refused);
  add("instances_live", liveness_.size());
  add("instances_reaped", liveness_.reaped());
  add("draining", draining_ ? 1 : 0);
  add("transfers_in_flight", transfers_in_flight_);
  for (std::uint8_t op = 1; op <= wire::max_opcode; ++op) {
    std::string name = wire::opcode_name(op);
    for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    add("op_" + name + "_requests", counters_.ops[op].requests);
    add("op_" + name + "_errors", counters_.ops[op].errors);
  }
  const auto& st = store_.stats();
  const std::uint64_t capacity = std::uint64_t{pool_.num_slabs()} * pool_.slab_bytes();
  add("store_entries", store_.entries());
  add("l1_capacity_bytes", capacity);
  add("l1_bytes_used", pool_.bytes_used());
  // Free: in free slabs and in the free slots of slabs in use.
  add("l1_bytes_free", capacity - pool_.bytes_used() - pool_.bytes_wasted());
  add("l1_bytes_wasted", pool_.bytes_wasted());  // slab tails no chunk of their layout fits in
  add("l1_slab_bytes", pool_.slab_bytes());
  add("l1_slabs_total", pool_.num_slabs());
  add("l1_slabs_free", pool_.free_slabs());
  add("l1_layouts", pool_.active_classes());
  add("l1_slabs_moved", st.slabs_moved);
  add("l1_huge_pages", pool_.huge_pages() ? 1 : 0);
  add("lookup_hits", st.hits);
  add("lookup_misses", st.misses);
  add("evictions", st.evictions);
  add("read_locks_held", store_.read_locks());
  add("l1_pinned_bytes", store_.pinned_bytes());  // held by read locks: unevictable
  add("write_locks_held", store_.write_locks());
  add("read_locks_expired", st.expired_read_locks);
  add("write_locks_expired", st.expired_write_locks);
  add("stores_committed", st.stores_committed);
  add("stores_aborted", st.stores_aborted);
  add("instance_l1_quota_bytes", quota_bytes());
  add("quota_evictions", st.quota_evictions);
  add("quota_refusals", st.quota_refusals);
  add("transfer_failures", transfer_failures_);
  add("transfers_fenced", transfers_fenced_);
  add("prefetch_jobs", jobs_.size());
  add("sessions", sessions_.size());
  add("registrations", registrations_.size());
  // Registrations whose data path is down (their transfers are refused).
  add("data_path_down", static_cast<std::uint64_t>(std::count_if(
                            registrations_.begin(), registrations_.end(),
                            [&](const auto& r) { return !engine_.fault(*r.second).empty(); })));
  add("transfers_refused_data_path", transfers_refused_data_path_);
  add("block_allocation_reports", block_reports_);
  add("engine_blocks_allocated", engine_blocks_allocated_);
  add("engine_blocks_total", engine_blocks_total_);
  return r;
}

void RequestHandler::status(ServerStatus& out, TimePoint now) const {
  out.draining = draining_;
  out.transfers_in_flight = transfers_in_flight_;
  out.jobs = jobs_.size();
  out.sessions = sessions_.size();
  out.stats = stats();
  out.totals = totals_;
  out.events.assign(events_.events().begin(), events_.events().end());
  out.instances.clear();
  for (const auto& [id, known] : instances_) {
    InstanceStatus i;
    i.id = id;
    i.role = known.role;
    i.client = known.client;
    i.peer = known.peer;
    if (auto c = connections_.find(id); c != connections_.end()) i.connections = c->second;
    if (auto seen = liveness_.last_seen(id)) i.since_seen = now - *seen;
    i.transfers_in_flight = known.transfers_in_flight;
    if (auto r = registrations_.find(id); r != registrations_.end()) {
      const auto& reg = *r->second;
      const auto& l = reg.layout;
      i.registration = InstanceStatus::Registration{
          reg.model, reg.ns, reg.world_size, reg.kv_rank, reg.slot_bytes,
          fmt::format("{} layers, {} planes, blocks of {} tokens x {} heads x {} x {} bytes", l.num_layers,
                      l.num_planes, l.block_size, l.num_kv_heads, l.head_size, l.dtype_size),
          engine_.fault(reg)};
    }
    out.instances.push_back(std::move(i));
  }
  out.namespaces.clear();
  for (const auto& [ns, usage] : store_.namespaces()) out.namespaces.push_back({ns, {}, usage.chunks, usage.bytes});
  for (const auto& entry : registrations_) {
    const transfer::Registration& reg = *entry.second;
    auto it = std::find_if(out.namespaces.begin(), out.namespaces.end(), [&](const auto& n) { return n.ns == reg.ns; });
    if (it == out.namespaces.end()) it = out.namespaces.insert(out.namespaces.end(), {reg.ns, {}, 0, 0});
    it->model = reg.model;
  }
}

// ---- store operations ----------------------------------------------------------

namespace {
std::string check_world_size(std::uint32_t ws) {
  if (ws == 0 || ws > max_world_size)
    return fmt::format("world_size {} is out of range; it must be between 1 and {}", ws, max_world_size);
  return {};
}

// Keys one request may make the server visit (chunks x ranks): keeps any
// single request from stalling the io thread.
constexpr std::uint64_t max_keys_per_request = std::uint64_t{1} << 22;

std::string check_keys(std::size_t chunks, std::uint32_t ws) {
  if (std::uint64_t{chunks} * ws > max_keys_per_request)
    return fmt::format("{} chunks x world_size {} is more than {} keys in one request; split the request", chunks,
                       ws, max_keys_per_request);
  return {};
}
}  // namespace

std::string RequestHandler::check_layout(std::uint64_t instance_id, std::uint64_t slot_bytes) const {
  // Each chunk costs a few hundred bytes of index: below this the index
  // could grow larger than a few percent of L1 itself.
  constexpr std::uint64_t min_chunk_bytes = 4096;
  if (slot_bytes < min_chunk_bytes)
    return fmt::format("a chunk of this layout is {} bytes, below the server's minimum of {}: the index would cost "
                       "too much memory next to such small chunks; raise --chunk-size (tokens per chunk)",
                       slot_bytes, min_chunk_bytes);
  if (auto why = pool_.check_layout(slot_bytes); !why.empty()) return why;
  // Each layout in use needs a slab of its own; the other instances'
  // layouts keep theirs.
  std::set<std::uint64_t> layouts;
  for (const auto& [id, reg] : registrations_)
    if (id != instance_id) layouts.insert(reg->slot_bytes);
  if (!layouts.contains(slot_bytes) && layouts.size() >= pool_.num_slabs())
    return fmt::format("L1 has {} slabs and {} other KV layouts are registered, each needing a slab of its own; raise "
                       "--l1-size or lower --l1-slab-size",
                       pool_.num_slabs(), layouts.size());
  return {};
}

void RequestHandler::on_register(SessionState& session, const wire::Frame& frame, ReplySink& sink, UniqueFd fd,
                                 TimePoint now) {
  wire::RegisterKvCacheRequest req;
  if (!parse(frame, sink, req, errc::bad_request)) return;
  // Every refusal is in the server's log too, with who asked: the engine's
  // log is not the only place an operator looks.
  auto refuse = [&](std::string why) {
    refused(session, now,
            fmt::format("refused a KV-cache registration from {} ({}): {}", session.peer.text, session.client_name,
                        why));
    fail(frame, sink, errc::bad_request, why);
  };
  if (auto why = check_world_size(req.world_size); !why.empty()) return refuse(why);
  if (req.ns == 0)
    return refuse(
        "namespace 0 is not a namespace id; compute it with store::namespace_id(model, world size, salt)");
  if (auto why = store::check_chunk_size(config_.chunk_size, req.layout.block_size); !why.empty())
    return refuse(why);
  const std::uint32_t blocks_per_chunk = config_.chunk_size / req.layout.block_size;
  std::uint64_t slot = 0;
  if (__builtin_mul_overflow(std::uint64_t{req.layout.num_layers} * req.layout.num_planes * blocks_per_chunk,
                             req.layout.block_bytes(), &slot))
    return refuse("the layout's chunk size in bytes overflows 64 bits");
  if (auto why = check_layout(session.instance_id, slot); !why.empty()) return refuse(why);
  auto reg = std::make_shared<transfer::Registration>();
  reg->instance_id = session.instance_id;
  reg->ns = req.ns;
  reg->model = std::move(req.model);
  reg->world_size = req.world_size;
  reg->kv_rank = req.kv_rank;
  reg->layout = std::move(req.layout);
  reg->blocks_per_chunk = blocks_per_chunk;
  reg->slot_bytes = slot;
  const bool had_fd = static_cast<bool>(fd);
  if (auto why = engine_.attach(*reg, std::move(fd)); !why.empty()) {
    // The server collects fds on worker connections only (server.cpp).
    if (!had_fd && session.role != wire::Role::worker)
      why += fmt::format("; fds are received on worker connections only, and this one said HELLO as {}",
                         wire::role_name(session.role));
    return refuse(why);
  }
  if (auto why = engine_.use_l1(*reg, pool_.region(), pool_.region_bytes()); !why.empty())
    return refuse(why);
  event(ServerEvent::Kind::register_kv_cache, session.instance_id, now,
        fmt::format("{} ({}) registered a KV cache: model {}, rank {}/{}, {} layers, {} bytes per chunk",
                    session.peer.text, session.client_name, reg->model, reg->kv_rank, reg->world_size,
                    reg->layout.num_layers, slot));
  log::debug("kvlink-server: registration of {} is instance {:016x}", session.peer.text, session.instance_id);
  registrations_[session.instance_id] = std::move(reg);
  liveness_.registered(session.instance_id, now);
  reply(sink, frame.header, wire::Empty{});
}

std::uint32_t RequestHandler::record_locks(const SessionKey& key, store::Holder holder, std::uint64_t ns,
                                           std::uint32_t world_size, std::span<const wire::ChunkHash> hashes,
                                           std::uint32_t matched, TimePoint now) {
  auto it = sessions_.find(key);
  if (it == sessions_.end() || it->second.holder != holder) {
    // The session ended (or was reaped) while the lookup ran: nobody will
    // release these locks, so the lookup counts as a miss.
    for (std::uint32_t i = 0; i < matched; ++i)
      for (std::uint32_t r = 0; r < world_size; ++r) store_.release_all(ChunkKey{ns, hashes[i], r}, holder);
    return 0;
  }
  RequestSession& s = it->second;
  s.last_seen = now;
  s.world_size = std::max(s.world_size, world_size);
  if (matched == 0) return matched;
  // Remember which keys this session locked, once each (release_all drops
  // all of a holder's locks on a key): a repeated or growing lookup of the
  // same prompt replaces its earlier record instead of adding one.
  const std::span<const wire::ChunkHash> now_locked(hashes.data(), matched);
  for (auto& [rec_ns, rec] : s.locked) {
    if (rec_ns != ns) continue;
    const std::size_t common = std::min(rec.size(), now_locked.size());
    if (!std::equal(rec.begin(), rec.begin() + static_cast<std::ptrdiff_t>(common), now_locked.begin())) continue;
    if (now_locked.size() > rec.size()) rec.assign(now_locked.begin(), now_locked.end());
    return matched;
  }
  // Bounded: past the cap the oldest record's locks are left to their TTL.
  constexpr std::size_t max_records = 64;
  if (s.locked.size() >= max_records) s.locked.erase(s.locked.begin());
  s.locked.emplace_back(ns, std::vector<wire::ChunkHash>(now_locked.begin(), now_locked.end()));
  return matched;
}

void RequestHandler::run_sliced(SessionState& session, ReplySink& sink, TimePoint now, UnfinishedWork work) {
  std::size_t budget = keys_per_slice;
  if (!work(sink, now, budget)) session.unfinished = std::move(work);
}

bool RequestHandler::continue_work(SessionState& session, ReplySink& sink, TimePoint now) {
  if (!session.unfinished) return true;
  std::size_t budget = keys_per_slice;
  if (!session.unfinished(sink, now, budget)) return false;
  session.unfinished = nullptr;
  return true;
}

void RequestHandler::on_lookup(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now,
                               bool sync) {
  // SYNC_LOOKUP answers the match; LOOKUP a job id to poll (L1 is the only
  // tier, so the job is done by the time it is answered).
  wire::LookupRequest req;
  if (sync) {
    wire::SyncLookupRequest s;
    if (!parse(frame, sink, s)) return;
    req = {s.ns, s.world_size, s.session_id, std::move(s.hashes)};
  } else if (!parse(frame, sink, req)) {
    return;
  }
  if (auto why = check_world_size(req.world_size); !why.empty()) return fail(frame, sink, errc::bad_request, why);
  if (auto why = check_keys(req.hashes.size(), req.world_size); !why.empty())
    return fail(frame, sink, errc::bad_request, why);
  const SessionKey key{req.session_id, session.instance_id};
  auto& s = sessions_[key];
  if (s.holder == 0) s.holder = next_holder_++;
  s.last_seen = now;
  run_sliced(session, sink, now,
             [this, req = std::move(req), key, holder = s.holder, header = frame.header, sync, next = std::uint32_t{0}](
                 ReplySink& out, TimePoint at, std::size_t& budget) mutable {
               const auto n = static_cast<std::uint32_t>(req.hashes.size());
               bool missed = false;
               while (next < n && budget > 0) {
                 if (!store_.match_chunk(req.ns, req.world_size, req.hashes[next], at, holder)) {
                   missed = true;
                   break;
                 }
                 ++next;
                 budget -= std::min<std::size_t>(budget, req.world_size);
               }
               if (!missed && next < n) return false;
               store_.record_lookup(next, n - next);
               const std::uint32_t matched = record_locks(key, holder, req.ns, req.world_size, req.hashes, next, at);
               totals_.lookup_requested_tokens += std::uint64_t{n} * config_.chunk_size;
               totals_.lookup_hit_tokens += std::uint64_t{matched} * config_.chunk_size;
               if (sync) {
                 reply(out, header, wire::LookupResult{matched});
                 return true;
               }
               const std::uint64_t id = next_job_++;
               Job job;
               job.instance_id = key.second;
               job.matched = matched;
               job.expiry = at + config_.job_ttl;
               jobs_.emplace(id, job);
               job_queue_.push_back(id);
               reply(out, header, wire::LookupAccepted{id});
               return true;
             });
}

void RequestHandler::on_query(const wire::Frame& frame, ReplySink& sink) {
  wire::QueryPrefetchStatusRequest req;
  if (!parse(frame, sink, req)) return;
  auto it = jobs_.find(req.job_id);
  if (it == jobs_.end())
    return fail(frame, sink, errc::not_found,
                fmt::format("prefetch job {} is unknown: its result was already reported, it expired after {} s "
                            "without a poll, or it never existed; start a new LOOKUP",
                            req.job_id, config_.job_ttl.count()));
  wire::PrefetchStatus st{it->second.state, it->second.matched};
  if (st.state == wire::PrefetchState::done) jobs_.erase(it);  // reported exactly once
  reply(sink, frame.header, st);
}

void RequestHandler::on_free_locks(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  wire::FreeLookupLocksRequest req;
  if (!parse(frame, sink, req)) return;
  if (auto why = check_world_size(req.world_size); !why.empty()) return fail(frame, sink, errc::bad_request, why);
  if (auto why = check_keys(req.hashes.size(), req.world_size); !why.empty())
    return fail(frame, sink, errc::bad_request, why);
  if (req.start > req.end || req.end > req.hashes.size())
    return fail(frame, sink, errc::bad_request,
                fmt::format("FREE_LOOKUP_LOCKS range [{}, {}) is not within the {} hashes given", req.start, req.end,
                            req.hashes.size()));
  const SessionKey key{req.session_id, session.instance_id};
  const SlicedLoop range(req.end - req.start, req.world_size);
  run_sliced(session, sink, now,
             [this, req = std::move(req), key, header = frame.header, loop = range](
                 ReplySink& out, TimePoint, std::size_t& budget) mutable {
               auto it = sessions_.find(key);
               if (it != sessions_.end()) {
                 const store::Holder holder = it->second.holder;
                 if (!loop.run(budget, [&](std::size_t i, std::uint32_t r) {
                       store_.release_all(ChunkKey{req.ns, req.hashes[req.start + i], r}, holder);
                     }))
                   return false;
               }
               if (!header.is_one_way()) reply(out, header, wire::Empty{});
               return true;
             });
}

void RequestHandler::on_end_session(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  wire::EndSessionRequest req;
  if (!parse(frame, sink, req)) return;
  // The session ends now (its locks are released slice by slice: an
  // aborted request's hits pin nothing); then its chunks are made most
  // recently used, at most max_keys_per_request of them.
  RequestSession ended;
  if (auto it = sessions_.find({req.session_id, session.instance_id}); it != sessions_.end()) {
    ended = std::move(it->second);
    sessions_.erase(it);
  }
  const std::uint32_t ws = ended.world_size;
  const std::size_t touched = std::min<std::size_t>(req.hashes.size(), max_keys_per_request / ws);
  run_sliced(session, sink, now,
             [this, req = std::move(req), ended = std::move(ended), header = frame.header, at = LockRelease{},
              touch = SlicedLoop(touched, ws)](ReplySink& out, TimePoint, std::size_t& budget) mutable {
               if (!release_locks(ended, at, budget)) return false;
               if (!touch.run(budget, [&](std::size_t i, std::uint32_t r) {
                     store_.touch(ChunkKey{req.ns, req.hashes[i], r});
                   }))
                 return false;
               if (!header.is_one_way()) reply(out, header, wire::Empty{});
               return true;
             });
}

std::shared_ptr<const transfer::Registration> RequestHandler::registration_for(
    const SessionState& session, std::uint64_t ns, std::uint32_t kv_rank, std::size_t chunks, std::size_t block_ids,
    const wire::Frame& frame, ReplySink& sink) {
  auto it = registrations_.find(session.instance_id);
  if (it == registrations_.end()) {
    fail(frame, sink, errc::not_registered,
         fmt::format("instance {:016x} has no KV cache registered; send REGISTER_KV_CACHE first",
                     session.instance_id));
    return nullptr;
  }
  const auto& reg = *it->second;
  if (auto why = engine_.fault(reg); !why.empty()) {
    ++transfers_refused_data_path_;
    fail(frame, sink, errc::server_error,
         fmt::format("the server cannot move this KV cache's data: {}; recompute until it is back", why));
    return nullptr;
  }
  if (ns != reg.ns) {
    fail(frame, sink, errc::bad_request,
         fmt::format("namespace {:016x} does not match the registered KV cache's namespace {:016x} (model {}); "
                     "compute keys with the registered model, world size and salt",
                     ns, reg.ns, reg.model));
    return nullptr;
  }
  if (kv_rank != reg.kv_rank) {
    fail(frame, sink, errc::bad_request,
         fmt::format("kv_rank {} does not match the registered KV cache's rank {}", kv_rank, reg.kv_rank));
    return nullptr;
  }
  if (block_ids != chunks * reg.blocks_per_chunk) {
    fail(frame, sink, errc::bad_request,
         fmt::format("{} block ids given for {} chunks; need chunks x chunk_size / block_size = {} x {} = {}",
                     block_ids, chunks, chunks, reg.blocks_per_chunk, chunks * reg.blocks_per_chunk));
    return nullptr;
  }
  return it->second;
}

namespace {
// Finds the first block id outside the registered cache; "" if none.
std::string check_blocks(const std::vector<std::uint32_t>& ids, const transfer::Registration& reg) {
  for (std::size_t i = 0; i < ids.size(); ++i)
    if (ids[i] >= reg.layout.num_blocks)
      return fmt::format("block id {} (position {}) is not below the registered num_blocks {}", ids[i], i,
                         reg.layout.num_blocks);
  return {};
}

// Where a completion replies: the sink itself while submit() runs (an
// engine that completes inline), otherwise the session if it still exists.
struct ReplyTarget {
  ReplySink* inline_sink = nullptr;
  std::weak_ptr<ReplySink> weak;
  template <class F>
  void with(F&& f) {
    if (inline_sink) return f(*inline_sink);
    if (auto s = weak.lock()) f(*s);
  }
};
}  // namespace

void RequestHandler::copy_failed(const wire::Header& header, std::error_code ec, ReplySink& sink,
                                 std::string_view consequence) {
  ++counters_.ops[header.opcode].errors;
  const char* op = header.opcode == static_cast<std::uint8_t>(wire::Opcode::store) ? "STORE" : "RETRIEVE";
  if (ec == errc::timed_out) {
    ++transfers_fenced_;
    return reply_error(sink, header, errc::timed_out,
                       fmt::format("{} was not done before its fence (the worker's transfer deadline), so the server "
                                   "left the engine's blocks alone; {}",
                                   op, consequence));
  }
  ++transfer_failures_;
  reply_error(sink, header, errc::server_error, fmt::format("{} copy failed: {}; {}", op, ec.message(), consequence));
}

void RequestHandler::on_store(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  wire::StoreRequest req;
  if (!parse(frame, sink, req)) return;
  auto reg = registration_for(session, req.ns, req.kv_rank, req.hashes.size(), req.block_ids.size(), frame, sink);
  if (!reg) return;
  if (auto why = check_blocks(req.block_ids, *reg); !why.empty()) return fail(frame, sink, errc::bad_request, why);
  struct Reserved {
    ChunkKey key;
    std::uint64_t generation;
  };
  std::vector<Reserved> reserved;
  transfer::TransferJob job;
  job.direction = transfer::Direction::store;
  job.registration = reg;
  job.engine_event = std::move(req.engine_event);
  job.fence = wire::fence_from_wire(req.fence_ns);
  if (now >= job.fence) return copy_failed(frame.header, errc::timed_out, sink, "nothing was stored");
  const std::uint32_t bpc = reg->blocks_per_chunk;
  std::uint32_t skipped = 0;
  const store::Writer writer{reg->slot_bytes, session.instance_id, quota_slots(reg->slot_bytes)};
  std::uint32_t other_layout = 0;
  for (std::size_t i = 0; i < req.hashes.size(); ++i) {
    ChunkKey key{req.ns, req.hashes[i], req.kv_rank};
    store::Slot slot = 0;
    std::uint64_t gen = 0;
    const auto got = store_.reserve(key, writer, now, slot, gen);
    if (got != store::KvStore::Reserve::reserved) {
      // Present, being written, no room or over quota: not an error.
      ++skipped;
      other_layout += got == store::KvStore::Reserve::other_layout ? 1 : 0;
      continue;
    }
    reserved.push_back({key, gen});
    auto first = req.block_ids.begin() + static_cast<std::ptrdiff_t>(i * bpc);
    job.chunks.push_back({pool_.data(slot), std::vector<std::uint32_t>(first, first + bpc)});
  }
  if (other_layout > 0)
    warn(session, now,
         fmt::format("kvlink-server: {} ({}) stored {} chunks that are already in L1 with another KV layout: engines "
                     "sharing a namespace (model, world size, cache salt) must share the layout; give each layout "
                     "its own cache salt",
                     session.peer.text, session.client_name, other_layout));
  if (reserved.empty()) return reply(sink, frame.header, wire::StoreResult{0, skipped});
  auto target = std::make_shared<ReplyTarget>(ReplyTarget{&sink, sink.weak_self()});
  const wire::Header header = frame.header;
  std::weak_ptr<bool> alive = alive_;
  std::shared_ptr<std::uint32_t> in_flight = session.in_flight;
  ++*in_flight;
  transfer_started(session.instance_id);
  const std::uint64_t bytes = reg->slot_bytes * reserved.size();
  engine_.submit(std::move(job), [this, alive, target, header, reserved = std::move(reserved), skipped,
                                  in_flight, instance = session.instance_id, started = now,
                                  bytes](std::error_code ec) {
    --*in_flight;
    auto live = alive.lock();
    if (!live || !*live) return;  // the handler is gone
    const TimePoint done = Clock::now();
    transfer_ended(instance, header.opcode, done - started);
    for (const auto& r : reserved) {
      if (ec) store_.abort(r.key, r.generation);
      else store_.commit(r.key, r.generation, done);
    }
    if (!ec) {
      totals_.stored_bytes += bytes;
      ++totals_.stores_completed;
    }
    if (ec) return target->with([&](ReplySink& s) { copy_failed(header, ec, s, "nothing was stored"); });
    target->with([&](ReplySink& s) {
      reply(s, header, wire::StoreResult{static_cast<std::uint32_t>(reserved.size()), skipped});
    });
  });
  target->inline_sink = nullptr;
}

void RequestHandler::on_retrieve(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  wire::RetrieveRequest req;
  if (!parse(frame, sink, req)) return;
  // Refused, the engine recomputes those blocks: the request's lookups need
  // the chunks no more.
  if (!submit_retrieve(session, frame, sink, req, now)) release_retrieved(req.session_id, req.ns, req.kv_rank, req.hashes);
}

bool RequestHandler::submit_retrieve(SessionState& session, const wire::Frame& frame, ReplySink& sink,
                                     wire::RetrieveRequest& req, TimePoint now) {
  auto refuse = [&](std::error_code code, std::string_view why) {
    fail(frame, sink, code, why);
    return false;
  };
  auto reg = registration_for(session, req.ns, req.kv_rank, req.hashes.size(), req.block_ids.size(), frame, sink);
  if (!reg) return false;
  if (auto why = check_blocks(req.block_ids, *reg); !why.empty()) return refuse(errc::bad_request, why);
  const std::uint64_t tokens = std::uint64_t{req.hashes.size()} * config_.chunk_size;
  if (req.skip_first_n_tokens > tokens && !req.hashes.empty())
    return refuse(errc::bad_request,
                  fmt::format("skip_first_n_tokens {} exceeds the {} tokens of the {} chunks requested",
                              req.skip_first_n_tokens, tokens, req.hashes.size()));
  transfer::TransferJob job;
  job.direction = transfer::Direction::retrieve;
  job.registration = reg;
  job.skip_first_n_tokens = req.skip_first_n_tokens;
  job.engine_event = std::move(req.engine_event);
  job.fence = wire::fence_from_wire(req.fence_ns);
  if (now >= job.fence) {
    copy_failed(frame.header, errc::timed_out, sink, "nothing was copied");
    return false;
  }
  const std::uint32_t bpc = reg->blocks_per_chunk;
  std::vector<ChunkKey> keys;
  keys.reserve(req.hashes.size());
  for (std::size_t i = 0; i < req.hashes.size(); ++i) {
    ChunkKey key{req.ns, req.hashes[i], req.kv_rank};
    const auto* e = store_.find(key);
    if (!e)
      return refuse(errc::not_found,
                    fmt::format("chunk {} (hash {}, rank {}) is not in the store: evicted or never stored; look the "
                              "prompt up again and recompute what is missing",
                                i, store::to_string(key.hash), key.rank));
    if (store_.slot_bytes(*e) != reg->slot_bytes)
      return refuse(errc::bad_request,
                    fmt::format("chunk {} (hash {}) was stored with another KV layout ({} bytes per chunk; this "
                                "registration's chunks are {} bytes): engines sharing a namespace (model, world "
                                "size, cache salt) must share the layout; give each layout its own cache salt",
                                i, store::to_string(key.hash), store_.slot_bytes(*e), reg->slot_bytes));
    auto first = req.block_ids.begin() + static_cast<std::ptrdiff_t>(i * bpc);
    job.chunks.push_back({pool_.data(e->slot), std::vector<std::uint32_t>(first, first + bpc)});
    keys.push_back(key);
  }
  // The copy holds its own read lock so the slots cannot be evicted under it.
  for (const auto& k : keys) store_.lock(k, store::transfer_holder, now);
  auto target = std::make_shared<ReplyTarget>(ReplyTarget{&sink, sink.weak_self()});
  const wire::Header header = frame.header;
  std::weak_ptr<bool> alive = alive_;
  std::shared_ptr<std::uint32_t> in_flight = session.in_flight;
  ++*in_flight;
  transfer_started(session.instance_id);
  const std::uint64_t bytes = reg->slot_bytes * keys.size();
  engine_.submit(std::move(job), [this, alive, target, header, keys = std::move(keys), hashes = std::move(req.hashes),
                                  ns = req.ns, rank = req.kv_rank, session_id = req.session_id, in_flight,
                                  instance = session.instance_id, started = now, bytes](std::error_code ec) {
    --*in_flight;
    auto live = alive.lock();
    if (!live || !*live) return;
    transfer_ended(instance, header.opcode, Clock::now() - started);
    if (!ec) {
      totals_.retrieved_bytes += bytes;
      ++totals_.retrieves_completed;
    }
    for (const auto& k : keys) store_.release_one(k, store::transfer_holder);
    // Loaded or failed (the engine recomputes), the request's lookups need
    // these chunks no more.
    release_retrieved(session_id, ns, rank, hashes);
    if (ec)
      return target->with(
          [&](ReplySink& s) { copy_failed(header, ec, s, "treat the request's blocks as not loaded"); });
    target->with(
        [&](ReplySink& s) { reply(s, header, wire::RetrieveResult{static_cast<std::uint32_t>(keys.size())}); });
  });
  target->inline_sink = nullptr;
  return true;
}

}  // namespace kvlink::server
