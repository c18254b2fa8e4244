#include "kvlink/server/request_handler.hpp"

#include <fmt/format.h>

#include "kvlink/server/inbound_budget.hpp"

namespace kvlink::server {

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
      liveness_({std::chrono::seconds(config.reap_timeout_s), std::chrono::seconds(config.registration_grace_s)}),
      pool_(config.l1_size, config.huge_pages, config.l1_slab_size),
      store_(pool_, store_config(config)),
      lookups_(config, store_, reporter_, totals_, in_flight_, fetches_),
      transfers_({config, engine, pool_, store_, liveness_, reporter_, in_flight_, lookups_, totals_}),
      handshake_(config, {boot_id, engine.capabilities()}, liveness_, reporter_, in_flight_,
                 {.registered = [this](std::uint64_t id) { return transfers_.registered(id); },
                  .drop_registration = [this](std::uint64_t id) { transfers_.drop(id); },
                  .release_scheduler_state = [this](std::uint64_t id) { lookups_.release_instance(id); },
                  .draining = [this] { return transfers_.draining(); }}) {
  fill_stats_table();
}

void RequestHandler::attach_tier(TierChain::Member tier) {
  add_tier_stats(tier.name, *tier.tier);
  tiers_.add(std::move(tier));
  fetches_.set_tier(&tiers_);
  transfers_.set_tiers(&tiers_);
  store_.set_eviction_hook([this](const store::ChunkKey& key, std::span<const std::byte> bytes) {
    tiers_.evicted(key, bytes, Clock::now());
  });
}

void RequestHandler::add_tier_stats(const std::string& name, const store::LowerTier& tier) {
  using S = store::LowerTierStats;
  const auto row = [&](const char* what, auto field) {
    stats_.add(name + "_" + what, [&tier, field] { return static_cast<std::uint64_t>(tier.stats().*field); });
  };
  stats_.add(name + "_enabled", [] { return std::uint64_t{1}; });
  row("healthy", &S::healthy);
  row("chunks", &S::chunks);
  row("bytes", &S::bytes);
  row("capacity_bytes", &S::capacity_bytes);
  row("writes", &S::writes);
  row("write_bytes", &S::write_bytes);
  row("writes_failed", &S::writes_failed);
  row("writes_skipped", &S::writes_skipped);
  row("reads", &S::reads);
  row("read_bytes", &S::read_bytes);
  row("reads_failed", &S::reads_failed);
  row("corrupt_dropped", &S::corrupt_dropped);
  row("evictions", &S::evictions);
  row("write_bytes_in_flight", &S::write_bytes_in_flight);
  row("read_bytes_in_flight", &S::read_bytes_in_flight);
  row("io_errors", &S::io_errors);
  row("stalls", &S::stalls);
  row("transitions", &S::transitions);
  row("recovered_chunks", &S::recovered_chunks);
  row("nodes", &S::nodes);
  row("nodes_degraded", &S::nodes_degraded);
}

void RequestHandler::on_session_end(SessionState& session, TimePoint now) {
  session.received_fds.clear();  // closes fds no REGISTER took
  session.unfinished = nullptr;  // nobody is left to answer
  reporter_.report_held_back(session, now, true);
  handshake_.connection_closed(session, now);
}

void RequestHandler::tick(TimePoint now) {
  handshake_.reap(now);
  store_.tick(now);
  lookups_.tick(now);
  tiers_.tick(now);
}

void RequestHandler::send_drain_notice(ReplySink& sink) const {
  const wire::ServerNotice notice{wire::NoticeKind::draining, std::string(drain_message)};
  wire::FrameBuilder(sink.buffer()).add(static_cast<std::uint8_t>(wire::Opcode::server_notice), wire::flag::one_way,
                                        0, [&](wire::Writer& w) { wire::encode(w, notice); });
  sink.flush();
}

bool RequestHandler::handle(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  const wire::Header& h = frame.header;
  const Reporter::Turn turn(reporter_, session, now);
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
  if (op == wire::Opcode::hello) return handshake_.hello(session, frame, sink, now);
  // A client that honours HELLO's max_in_flight never gets here: it counts
  // every request until its reply, the server only those still working.
  // PING is answered at once and has a slot of its own: a full data path
  // must never make the heartbeat look like a dead server.
  if (*session.in_flight >= config_.max_in_flight && op != wire::Opcode::ping) {
    ++counters_.in_flight_refused;
    reporter_.fail(frame, sink, errc::limit_exceeded,
                   fmt::format("{} refused: this connection already has {} requests in progress, the server's limit "
                               "(--max-in-flight, announced in HELLO); wait for replies before sending more",
                               wire::opcode_name(h.opcode), *session.in_flight));
    return true;
  }
  if (!session.hello_done) {
    reporter_.fail(frame, sink, errc::bad_request,
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
    case wire::Opcode::ping:
      return on_ping(session, frame, sink, known);
    case wire::Opcode::stats:
      reply(sink, h, wire::StatsReply{stats()});
      return true;
    case wire::Opcode::register_kv_cache:
      if (!transfers_.refuse_transfer(session, frame, sink))
        transfers_.register_cache(session, frame, sink, std::move(fd), now);
      return true;
    case wire::Opcode::unregister_kv_cache:
      transfers_.unregister(session, frame, sink, now);
      return true;
    case wire::Opcode::lookup:
      lookups_.lookup(session, frame, sink, now, false);
      return true;
    case wire::Opcode::sync_lookup:
      lookups_.lookup(session, frame, sink, now, true);
      return true;
    case wire::Opcode::query_prefetch_status:
      lookups_.query(frame, sink);
      return true;
    case wire::Opcode::free_lookup_locks:
      lookups_.free_locks(session, frame, sink, now);
      return true;
    case wire::Opcode::end_session:
      lookups_.end_session(session, frame, sink, now);
      return true;
    case wire::Opcode::report_block_allocation:
      on_report_block_allocation(frame, sink);
      return true;
    case wire::Opcode::clear:
      on_clear(session, frame, sink, now);
      return true;
    case wire::Opcode::store:
      if (!transfers_.refuse_transfer(session, frame, sink)) transfers_.store(session, frame, sink, now);
      return true;
    case wire::Opcode::retrieve:
      if (!transfers_.refuse_transfer(session, frame, sink)) transfers_.retrieve(session, frame, sink, now);
      return true;
    case wire::Opcode::server_notice:
      reporter_.fail(frame, sink, errc::bad_request,
                     "SERVER_NOTICE goes from servers to clients; a client never sends it");
      return true;
    default:
      reporter_.fail(frame, sink, errc::unknown_opcode,
                     fmt::format("{} is not implemented by this server build", wire::opcode_name(h.opcode)));
      return true;
  }
}

bool RequestHandler::on_ping(SessionState& session, const wire::Frame& frame, ReplySink& sink, bool known) {
  wire::PingRequest req;
  if (!reporter_.parse(frame, sink, req)) return true;
  if (!known) {
    reporter_.fail(frame, sink, errc::unknown_instance,
                   fmt::format("instance {:016x} is unknown here (reaped after silence, or the server restarted): "
                               "send HELLO and register again",
                               session.instance_id));
    return true;
  }
  wire::PingReply r;
  r.data_path_error = transfers_.data_path_error(session.instance_id);
  reply(sink, frame.header, r);
  return true;
}

void RequestHandler::on_report_block_allocation(const wire::Frame& frame, ReplySink& sink) {
  wire::ReportBlockAllocationRequest req;
  if (!reporter_.parse(frame, sink, req)) return;
  ++block_reports_;
  engine_blocks_allocated_ = req.allocated_blocks;
  engine_blocks_total_ = req.total_blocks;
  if (!frame.header.is_one_way()) reply(sink, frame.header, wire::Empty{});
}

void RequestHandler::on_clear(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  wire::ClearRequest req;
  if (!reporter_.parse(frame, sink, req)) return;
  // Sliced: dropping every chunk of a large L1 is long work.
  run_sliced(session, sink, now,
             [this, header = frame.header, dropped = std::uint64_t{0}](ReplySink& out, TimePoint,
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
}

void RequestHandler::fill_stats_table() {
  const ServerCounters& c = counters_;
  auto& t = stats_;
  t.add("connections_open", [&c] { return c.connections_open; });
  t.add("connections_accepted", [&c] { return c.connections_accepted; });
  t.add("connections_refused", [&c] { return c.connections_refused; });
  t.add("protocol_errors", [&c] { return c.protocol_errors; });
  t.add("unknown_opcodes", [&c] { return c.unknown_opcodes; });
  t.add("in_flight_refused", [&c] { return c.in_flight_refused; });
  t.add("instances_refused", [&c] { return c.instances_refused; });
  t.add("auth_failures", [&c] { return c.auth_failures; });
  t.add("instance_claims_refused", [&c] { return c.instance_claims_refused; });
  t.add("frames_too_large", [&c] { return c.frames_too_large; });
  t.add("reads_paused", [&c] { return c.reads_paused; });
  t.add("connections_paused", [&c] { return c.connections_paused; });
  t.add("slow_reader_closes", [&c] { return c.slow_reader_closes; });
  t.add("inbound_buffered_bytes", [&c] { return c.inbound_buffered_bytes; });
  t.add("inbound_limit_bytes", [this] { return inbound_limit(config_); });
  t.add("inbound_refused", [&c] { return c.inbound_refused; });
  t.add("instances_live", [this] { return liveness_.size(); });
  t.add("instances_reaped", [this] { return liveness_.reaped(); });
  t.add("draining", [this] { return transfers_.draining() ? 1 : 0; });
  t.add("transfers_in_flight", [this] { return in_flight_.total(); });
  for (std::uint8_t op = 1; op <= wire::max_opcode; ++op) {
    t.add(opcode_stat_name(op, "requests"), [&c, op] { return c.ops[op].requests; });
    t.add(opcode_stat_name(op, "errors"), [&c, op] { return c.ops[op].errors; });
  }
  const store::KvStore& st = store_;
  const store::L1Pool& pool = pool_;
  auto capacity = [&pool] { return std::uint64_t{pool.num_slabs()} * pool.slab_bytes(); };
  t.add("store_entries", [&st] { return st.entries(); });
  t.add("l1_capacity_bytes", capacity);
  t.add("l1_bytes_used", [&pool] { return pool.bytes_used(); });
  // Free: in free slabs and in the free slots of slabs in use.
  t.add("l1_bytes_free", [&pool, capacity] { return capacity() - pool.bytes_used() - pool.bytes_wasted(); });
  t.add("l1_bytes_wasted", [&pool] { return pool.bytes_wasted(); });  // slab tails no chunk of their layout fits in
  t.add("l1_slab_bytes", [&pool] { return pool.slab_bytes(); });
  t.add("l1_slabs_total", [&pool] { return pool.num_slabs(); });
  t.add("l1_slabs_free", [&pool] { return pool.free_slabs(); });
  t.add("l1_layouts", [&pool] { return pool.active_classes(); });
  t.add("l1_slabs_moved", [&st] { return st.stats().slabs_moved; });
  t.add("l1_huge_pages", [&pool] { return pool.huge_pages() ? 1 : 0; });
  t.add("lookup_hits", [&st] { return st.stats().hits; });
  t.add("lookup_misses", [&st] { return st.stats().misses; });
  t.add("evictions", [&st] { return st.stats().evictions; });
  t.add("read_locks_held", [&st] { return st.read_locks(); });
  t.add("l1_pinned_bytes", [&st] { return st.pinned_bytes(); });  // held by read locks: unevictable
  t.add("write_locks_held", [&st] { return st.write_locks(); });
  t.add("read_locks_expired", [&st] { return st.stats().expired_read_locks; });
  t.add("write_locks_expired", [&st] { return st.stats().expired_write_locks; });
  t.add("stores_committed", [&st] { return st.stats().stores_committed; });
  t.add("stores_aborted", [&st] { return st.stats().stores_aborted; });
  t.add("instance_l1_quota_bytes", [this] { return transfers_.quota_bytes(); });
  t.add("quota_evictions", [&st] { return st.stats().quota_evictions; });
  t.add("quota_refusals", [&st] { return st.stats().quota_refusals; });
  t.add("transfer_failures", [this] { return transfers_.failures(); });
  t.add("transfers_fenced", [this] { return transfers_.fenced(); });
  t.add("prefetch_jobs", [this] { return lookups_.jobs(); });
  t.add("sessions", [this] { return lookups_.sessions(); });
  t.add("registrations", [this] { return transfers_.registrations(); });
  // Registrations whose data path is down (their transfers are refused).
  t.add("data_path_down", [this] { return transfers_.data_paths_down(); });
  t.add("transfers_refused_data_path", [this] { return transfers_.refused_data_path(); });
  // Lookups and the tiers below L1 (each tier's own rows come with it:
  // attach_tier).
  t.add("tier_lookup_hits", [this] { return lookups_.tier_hits(); });
  t.add("tier_lookups_waiting", [this] { return lookups_.tier_waits(); });
  t.add("tier_fetches_started", [this] { return fetches_.stats().started; });
  t.add("tier_fetches_joined", [this] { return fetches_.stats().joined; });
  t.add("tier_fetches_failed", [this] { return fetches_.stats().failed; });
  t.add("block_allocation_reports", [this] { return block_reports_; });
  t.add("engine_blocks_allocated", [this] { return engine_blocks_allocated_; });
  t.add("engine_blocks_total", [this] { return engine_blocks_total_; });
}

void RequestHandler::status(ServerStatus& out, TimePoint now) const {
  out.draining = transfers_.draining();
  out.transfers_in_flight = in_flight_.total();
  out.jobs = lookups_.jobs();
  out.sessions = lookups_.sessions();
  out.stats = stats();
  out.totals = totals_;
  out.events.assign(reporter_.events().events().begin(), reporter_.events().events().end());
  out.instances = handshake_.instances(now);
  for (auto& i : out.instances) i.registration = transfers_.registration_status(i.id);
  out.namespaces.clear();
  for (const auto& [ns, usage] : store_.namespaces()) out.namespaces.push_back({ns, {}, usage.chunks, usage.bytes});
  transfers_.name_models(out.namespaces);
  out.tiers.clear();
  for (const auto& m : tiers_.members()) out.tiers.push_back({m.name, m.tier->stats(), m.tier->nodes()});
}

}  // namespace kvlink::server
