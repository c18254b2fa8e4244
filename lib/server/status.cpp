#include "kvlink/server/status.hpp"

#include <fmt/format.h>

#include <map>
#include <tuple>

#include "kvlink/json.hpp"
#include "kvlink/log.hpp"
#include "kvlink/metrics/exposition.hpp"
#include "kvlink/version.hpp"

namespace kvlink::server {

const char* event_kind_name(ServerEvent::Kind kind) {
  switch (kind) {
    case ServerEvent::Kind::connect: return "connect";
    case ServerEvent::Kind::disconnect: return "disconnect";
    case ServerEvent::Kind::register_kv_cache: return "register";
    case ServerEvent::Kind::unregister: return "unregister";
    case ServerEvent::Kind::reap: return "reap";
    case ServerEvent::Kind::refusal: return "refusal";
  }
  return "?";
}

std::int64_t ServerStatus::stat(std::string_view name) const {
  for (const auto& e : stats)
    if (e.name == name) return e.value;
  return 0;
}

void StatusHistory::update(ServerStatus& s, TimePoint now) {
  if (!last_ || now - *last_ >= interval_) {
    last_ = now;
    if (samples_.size() == capacity_) samples_.pop_front();
    samples_.push_back({s.taken_at, static_cast<std::uint64_t>(s.stat("l1_bytes_used")),
                        s.totals.lookup_requested_tokens, s.totals.lookup_hit_tokens, s.totals.stored_bytes,
                        s.totals.retrieved_bytes});
  }
  s.history.assign(samples_.begin(), samples_.end());
}

namespace {

double seconds(Duration d) { return std::chrono::duration<double>(d).count(); }
double unix_seconds(WallClock::time_point t) {
  return std::chrono::duration<double>(t.time_since_epoch()).count();
}
std::string hex16(std::uint64_t v) { return fmt::format("\"{:016x}\"", v); }

// Every refusal counter of STATS, by the limit or check that refused:
// /metrics labels them, /status sums them.
constexpr std::pair<const char*, const char*> refusal_stats[] = {
    {"max_in_flight", "in_flight_refused"},     {"max_instances", "instances_refused"},
    {"auth_token", "auth_failures"},            {"instance_claim", "instance_claims_refused"},
    {"max_connections", "connections_refused"}, {"max_payload", "frames_too_large"},
    {"max_inbound_bytes", "inbound_refused"},   {"slow_reader", "slow_reader_closes"},
    {"l1_quota", "quota_refusals"},             {"data_path", "transfers_refused_data_path"},
};

std::string instance_json(const InstanceStatus& i) {
  std::string out = fmt::format(
      R"({{"id":{},"role":"{}","client":{},"pid":{},"uid":{},"peer":{},"connected":{},"connections":{},)"
      R"("last_seen_seconds_ago":{:.3f},"transfers_in_flight":{},"registration":)",
      hex16(i.id), wire::role_name(i.role), json_string(i.client),
      i.peer.has_credentials ? std::to_string(i.peer.pid) : "null",
      i.peer.has_credentials ? std::to_string(i.peer.uid) : "null", json_string(i.peer.text), i.connections > 0,
      i.connections, seconds(i.since_seen), i.transfers_in_flight);
  if (!i.registration) return out + R"(null,"data_path_error":""})";
  const auto& r = *i.registration;
  return out + fmt::format(
                   R"({{"model":{},"namespace":{},"world_size":{},"kv_rank":{},"chunk_bytes":{},"layout":{}}},)"
                   R"("data_path_error":{}}})",
                   json_string(r.model), hex16(r.ns), r.world_size, r.kv_rank, r.chunk_bytes, json_string(r.layout),
                   json_string(r.data_path_error));
}

std::string tier_json(const TierStatus& t) {
  const auto& ts = t.stats;
  std::string out = fmt::format(
      R"({{"name":{},"healthy":{},"chunks":{},"bytes":{},"capacity_bytes":{},"writes":{},"write_bytes":{},)"
      R"("writes_failed":{},"writes_skipped":{},"reads":{},"read_bytes":{},"reads_failed":{},"corrupt_dropped":{},)"
      R"("transitions":{},"nodes":[)",
      json_string(t.name), ts.healthy, ts.chunks, ts.bytes, ts.capacity_bytes, ts.writes, ts.write_bytes,
      ts.writes_failed, ts.writes_skipped, ts.reads, ts.read_bytes, ts.reads_failed, ts.corrupt_dropped,
      ts.transitions);
  for (std::size_t i = 0; i < t.nodes.size(); ++i)
    out += fmt::format(R"({}{{"address":{},"healthy":{},"slots":{}}})", i ? "," : "", json_string(t.nodes[i].address),
                       t.nodes[i].healthy, t.nodes[i].slots);
  return out + "]}";
}

}  // namespace

std::string status_json(const ServerStatus& s) {
  std::string out = fmt::format(
      R"({{"version":{},"protocol_version":{},"boot_id":{},"started_at":"{}","uptime_seconds":{:.3f},)"
      R"("snapshot_age_seconds":{:.3f},"ready":{},"draining":{},"listeners":[)",
      json_string(version_string), wire::protocol_version, hex16(s.boot_id), log::iso8601_utc(s.started_at),
      seconds(s.taken_at - s.started_at), seconds(WallClock::now() - s.taken_at), s.ready, s.draining);
  for (std::size_t i = 0; i < s.listeners.size(); ++i) out += (i ? "," : "") + json_string(s.listeners[i]);
  out += fmt::format(
      R"(],"transfer_engine":{},"l1":{{"capacity_bytes":{},"used_bytes":{},"free_bytes":{},"pinned_bytes":{},)"
      R"("wasted_bytes":{},"chunks":{},"read_locks":{},"write_locks":{},"slab_bytes":{},"slabs_total":{},)"
      R"("slabs_free":{},"layouts":{},"huge_pages":{}}},"namespaces":[)",
      json_string(s.transfer_engine), s.stat("l1_capacity_bytes"), s.stat("l1_bytes_used"), s.stat("l1_bytes_free"),
      s.stat("l1_pinned_bytes"), s.stat("l1_bytes_wasted"), s.stat("store_entries"), s.stat("read_locks_held"),
      s.stat("write_locks_held"), s.stat("l1_slab_bytes"), s.stat("l1_slabs_total"), s.stat("l1_slabs_free"),
      s.stat("l1_layouts"), s.stat("l1_huge_pages") != 0);
  for (std::size_t i = 0; i < s.namespaces.size(); ++i) {
    const auto& n = s.namespaces[i];
    out += fmt::format(R"({}{{"namespace":{},"model":{},"chunks":{},"bytes":{}}})", i ? "," : "", hex16(n.ns),
                       json_string(n.model), n.chunks, n.bytes);
  }
  out += R"(],"tiers":[)";
  for (std::size_t i = 0; i < s.tiers.size(); ++i) out += (i ? "," : "") + tier_json(s.tiers[i]);
  out += R"(],"instances":[)";
  for (std::size_t i = 0; i < s.instances.size(); ++i) out += (i ? "," : "") + instance_json(s.instances[i]);
  std::uint64_t requests = 0, errors = 0;
  for (const auto& e : s.stats) {
    if (e.name.starts_with("op_") && e.name.ends_with("_requests")) requests += static_cast<std::uint64_t>(e.value);
    if (e.name.starts_with("op_") && e.name.ends_with("_errors")) errors += static_cast<std::uint64_t>(e.value);
  }
  std::int64_t refusals = 0;
  for (const auto& [limit, name] : refusal_stats) refusals += s.stat(name);
  out += fmt::format(
      R"(],"jobs":{},"sessions":{},"transfers_in_flight":{},"totals":{{"lookup_requested_tokens":{},)"
      R"("lookup_hit_tokens":{},"stored_bytes":{},"retrieved_bytes":{},"evictions":{},"requests":{},"errors":{},)"
      R"("instances_reaped":{},"refusals":{}}},"history":[)",
      s.jobs, s.sessions, s.transfers_in_flight, s.totals.lookup_requested_tokens, s.totals.lookup_hit_tokens,
      s.totals.stored_bytes, s.totals.retrieved_bytes, s.stat("evictions"), requests, errors,
      s.stat("instances_reaped"), refusals);
  for (std::size_t i = 0; i < s.history.size(); ++i) {
    const auto& h = s.history[i];
    out += fmt::format(
        R"({}{{"t":{:.3f},"l1_used_bytes":{},"lookup_requested_tokens":{},"lookup_hit_tokens":{},)"
        R"("stored_bytes":{},"retrieved_bytes":{}}})",
        i ? "," : "", unix_seconds(h.at), h.l1_used_bytes, h.lookup_requested_tokens, h.lookup_hit_tokens,
        h.stored_bytes, h.retrieved_bytes);
  }
  out += R"(],"events":[)";
  for (std::size_t i = 0; i < s.events.size(); ++i) {
    const auto& e = s.events[i];
    out += fmt::format(R"({}{{"t":"{}","kind":"{}","instance":"{}","text":{}}})", i ? "," : "",
                       log::iso8601_utc(s.wall_time(e.at)), event_kind_name(e.kind),
                       e.instance ? fmt::format("{:016x}", e.instance) : "", json_string(e.text));
  }
  return out + "]}\n";
}

std::string status_metrics(const ServerStatus& s) {
  metrics::Exposition m;
  auto stat = [&](std::string_view name) { return static_cast<double>(s.stat(name)); };
  m.gauge("kvlink_server_info", "The server's version and boot id (always 1)", 1,
          {{"version", std::string(version_string)}, {"boot_id", fmt::format("{:016x}", s.boot_id)}});
  m.gauge("kvlink_server_uptime_seconds", "Seconds since the server started", seconds(s.taken_at - s.started_at));
  m.gauge("kvlink_server_ready", "1 once L1 is mapped and the listeners accept, 0 while starting or draining",
          s.ready && !s.draining ? 1 : 0);
  m.gauge("kvlink_server_draining", "1 while draining for a planned restart", s.draining ? 1 : 0);

  for (std::uint8_t op = 1; op <= wire::max_opcode; ++op) {
    std::string name = wire::opcode_name(op);
    for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    const metrics::Labels labels{{"op", name}};
    m.counter("kvlink_requests_total", "Requests received, by operation", stat("op_" + name + "_requests"), labels);
    m.counter("kvlink_request_errors_total", "Requests answered with an error, by operation",
              stat("op_" + name + "_errors"), labels);
    m.histogram("kvlink_request_duration_seconds",
                "Time from a request's receipt to its reply (STORE and RETRIEVE: to their copy's end)",
                s.totals.latency[op], labels);
  }
  m.counter("kvlink_transfer_bytes_total", "KV bytes copied by completed transfers", 
            static_cast<double>(s.totals.stored_bytes), {{"direction", "store"}});
  m.counter("kvlink_transfer_bytes_total", "KV bytes copied by completed transfers",
            static_cast<double>(s.totals.retrieved_bytes), {{"direction", "retrieve"}});
  m.counter("kvlink_transfers_total", "Transfers completed", static_cast<double>(s.totals.stores_completed),
            {{"direction", "store"}});
  m.counter("kvlink_transfers_total", "Transfers completed", static_cast<double>(s.totals.retrieves_completed),
            {{"direction", "retrieve"}});
  m.counter("kvlink_transfer_failures_total", "Transfers whose copy failed", stat("transfer_failures"));
  m.counter("kvlink_transfers_fenced_total", "Transfers not done before their deadline (fence)",
            stat("transfers_fenced"));
  m.gauge("kvlink_transfers_in_flight", "STOREs and RETRIEVEs being copied now",
          static_cast<double>(s.transfers_in_flight));

  m.gauge("kvlink_l1_capacity_bytes", "L1 memory for KV chunks", stat("l1_capacity_bytes"));
  m.gauge("kvlink_l1_used_bytes", "L1 bytes holding chunks (present or being written)", stat("l1_bytes_used"));
  m.gauge("kvlink_l1_free_bytes", "L1 bytes free for chunks", stat("l1_bytes_free"));
  m.gauge("kvlink_l1_pinned_bytes", "L1 bytes held by read locks (not evictable)", stat("l1_pinned_bytes"));
  m.gauge("kvlink_l1_wasted_bytes", "Slab tails no chunk of their layout fits in", stat("l1_bytes_wasted"));
  m.gauge("kvlink_l1_chunks", "Chunks in L1", stat("store_entries"));
  m.counter("kvlink_evictions_total", "Chunks evicted from L1", stat("evictions"));
  m.counter("kvlink_quota_evictions_total", "Chunks an instance's quota evicted", stat("quota_evictions"));
  m.counter("kvlink_lookup_requested_tokens_total", "Tokens of the chunks lookups asked for",
            static_cast<double>(s.totals.lookup_requested_tokens));
  m.counter("kvlink_lookup_hit_tokens_total", "Tokens of the chunks lookups found (hit rate: hit / requested)",
            static_cast<double>(s.totals.lookup_hit_tokens));
  m.gauge("kvlink_read_locks", "Read locks held by lookups and retrieves", stat("read_locks_held"));
  m.gauge("kvlink_write_locks", "Write locks held by stores in progress", stat("write_locks_held"));
  m.counter("kvlink_locks_expired_total", "Locks released by their TTL", stat("read_locks_expired"),
            {{"kind", "read"}});
  m.counter("kvlink_locks_expired_total", "Locks released by their TTL", stat("write_locks_expired"),
            {{"kind", "write"}});

  std::map<std::string, std::pair<double, double>> by_role;  // role -> (known, connected)
  for (const char* role : {"scheduler", "worker"}) by_role[role] = {0, 0};
  for (const auto& i : s.instances) {
    auto& [known, connected] = by_role[wire::role_name(i.role)];
    ++known;
    connected += i.connections > 0 ? 1 : 0;
  }
  for (const auto& [role, n] : by_role) {
    m.gauge("kvlink_instances", "Instances the server knows (connected, or kept for their registration)", n.first,
            {{"role", role}});
    m.gauge("kvlink_instances_connected", "Instances with an open connection", n.second, {{"role", role}});
  }
  m.counter("kvlink_instances_reaped_total", "Instances forgotten after silence past the reap timeout",
            stat("instances_reaped"));
  m.gauge("kvlink_connections_open", "Client connections open (admin ones included)", stat("connections_open"));
  m.counter("kvlink_connections_accepted_total", "Client connections accepted", stat("connections_accepted"));
  m.counter("kvlink_protocol_errors_total", "Malformed frames or messages", stat("protocol_errors"));
  for (const auto& [limit, name] : refusal_stats)
    m.counter("kvlink_refusals_total", "Requests or connections refused, by the limit or check that refused them",
              stat(name), {{"limit", limit}});
  m.gauge("kvlink_prefetch_jobs", "Prefetch jobs not yet polled", static_cast<double>(s.jobs));
  for (const auto& t : s.tiers) {
    const auto& ts = t.stats;
    const metrics::Labels l{{"tier", t.name}};
    const auto n = [](std::uint64_t v) { return static_cast<double>(v); };
    m.gauge("kvlink_tier_healthy", "1 while the tier below L1 takes work, 0 while it is degraded (L1-only service)",
            ts.healthy ? 1 : 0, l);
    m.gauge("kvlink_tier_chunks", "Complete chunks on the tier below L1", n(ts.chunks), l);
    m.gauge("kvlink_tier_bytes", "Bytes of the tier's slots in use", n(ts.bytes), l);
    m.gauge("kvlink_tier_capacity_bytes", "Bytes the tier may take", n(ts.capacity_bytes), l);
    for (const auto& [op, chunks, bytes, failed] :
         {std::tuple{"write", ts.writes, ts.write_bytes, ts.writes_failed},
          std::tuple{"read", ts.reads, ts.read_bytes, ts.reads_failed}}) {
      const metrics::Labels lo{{"tier", t.name}, {"op", op}};
      m.counter("kvlink_tier_chunks_total", "Chunks written to and read back from the tier", n(chunks), lo);
      m.counter("kvlink_tier_bytes_total", "Chunk bytes written to and read back from the tier", n(bytes), lo);
      m.counter("kvlink_tier_failures_total", "Tier I/O that failed, by what", n(failed), lo);
    }
    m.counter("kvlink_tier_writes_skipped_total",
              "Chunks not written to the tier: degraded, over the in-flight bound, no room, another layout",
              n(ts.writes_skipped), l);
    m.counter("kvlink_tier_corrupt_dropped_total", "Chunks that failed their checksum or were torn, dropped unserved",
              n(ts.corrupt_dropped), l);
    m.counter("kvlink_tier_evictions_total", "Chunks the tier dropped for room", n(ts.evictions), l);
    m.counter("kvlink_tier_stalls_total", "Tier I/O past its deadline", n(ts.stalls), l);
    m.counter("kvlink_tier_transitions_total",
              "Tier health changes (healthy <-> degraded; for a cluster, its nodes' heartbeats)", n(ts.transitions), l);
    for (const auto& node : t.nodes) {
      const metrics::Labels ln{{"tier", t.name}, {"node", node.address}};
      m.gauge("kvlink_tier_node_healthy", "1 while a node of the tier answers its heartbeat, 0 while its chunks miss",
              node.healthy ? 1 : 0, ln);
      m.gauge("kvlink_tier_node_slots", "Hash slots the node serves", node.slots, ln);
    }
  }
  if (!s.tiers.empty()) {
    m.counter("kvlink_tier_lookup_hits_total", "Chunks lookups matched that came up from the tier",
              stat("tier_lookup_hits"));
    m.gauge("kvlink_tier_lookups_waiting", "Lookups waiting for chunks from the tier", stat("tier_lookups_waiting"));
  }
  m.gauge("kvlink_lookup_sessions", "Engine requests with lookups (and their locks) open",
          static_cast<double>(s.sessions));
  for (const auto& n : s.namespaces) {
    const metrics::Labels labels{{"namespace", fmt::format("{:016x}", n.ns)}, {"model", n.model}};
    m.gauge("kvlink_namespace_chunks", "Chunks in L1 per namespace (model, world size, salt)",
            static_cast<double>(n.chunks), labels);
    m.gauge("kvlink_namespace_bytes", "L1 bytes per namespace", static_cast<double>(n.bytes), labels);
  }
  return m.text();
}

}  // namespace kvlink::server
