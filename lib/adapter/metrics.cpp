#include "kvlink/adapter/metrics.hpp"

#include <asio/error.hpp>
#include <chrono>

namespace kvlink::adapter {

const char* role_name(AdapterRole r) { return r == AdapterRole::scheduler ? "scheduler" : "worker"; }

const char* op_name(Op op) {
  switch (op) {
    case Op::lookup: return "lookup";
    case Op::check_lookup: return "check_lookup";
    case Op::free_lookup_locks: return "free_lookup_locks";
    case Op::end_session: return "end_session";
    case Op::report_block_allocation: return "report_block_allocation";
    case Op::cleanup: return "cleanup";
    case Op::register_kv_caches: return "register_kv_caches";
    case Op::unregister_kv_caches: return "unregister_kv_caches";
    case Op::store: return "store";
    case Op::retrieve: return "retrieve";
    case Op::get_finished: return "get_finished";
    case Op::take_load_errors: return "take_load_errors";
    case Op::shutdown: return "shutdown";
  }
  return "unknown";
}

std::span<const Op> ops_of(AdapterRole r) {
  static constexpr Op scheduler_ops[] = {Op::lookup,      Op::check_lookup,             Op::free_lookup_locks,
                                         Op::end_session, Op::report_block_allocation, Op::cleanup};
  static constexpr Op worker_ops[] = {Op::register_kv_caches, Op::unregister_kv_caches, Op::store, Op::retrieve,
                                      Op::get_finished,       Op::take_load_errors,     Op::shutdown};
  if (r == AdapterRole::scheduler) return scheduler_ops;
  return worker_ops;
}

std::string error_name(std::error_code ec) {
  if (ec.category() == error_category()) {
    switch (static_cast<errc>(ec.value())) {
      case errc::ok: return "ok";
      case errc::connection_lost: return "connection_lost";
      case errc::timed_out: return "timed_out";
      case errc::unhealthy: return "unhealthy";
      case errc::protocol_error: return "protocol_error";
      case errc::unknown_instance: return "unknown_instance";
      case errc::version_mismatch: return "version_mismatch";
      case errc::frame_too_large: return "frame_too_large";
      case errc::unknown_opcode: return "unknown_opcode";
      case errc::bad_request: return "bad_request";
      case errc::not_found: return "not_found";
      case errc::unauthorized: return "unauthorized";
      case errc::limit_exceeded: return "limit_exceeded";
      case errc::not_registered: return "not_registered";
      case errc::server_error: return "server_error";
      case errc::shutting_down: return "shutting_down";
      case errc::not_connected: return "not_connected";
    }
  }
  if (ec == asio::error::operation_aborted) return "operation_aborted";
  return std::string(ec.category().name()) + "_" + std::to_string(ec.value());
}

namespace detail {

void MetricsBox::completed(Op op, TimePoint start, std::error_code ec) {
  const Duration took = Clock::now() - start;
  const std::string error = ec ? error_name(ec) : std::string();  // not under the lock
  std::lock_guard lock(mutex_);
  CallMetrics& c = data_.call(op);
  ++c.calls;
  c.latency.observe(took);
  if (!ec) return;
  ++c.failed;
  if (ec == errc::unhealthy) ++c.degraded;
  if (op == Op::retrieve) ++data_.load_errors;
  ++c.errors[error];
}

}  // namespace detail

namespace {

double seconds(Duration d) { return std::chrono::duration<double>(d).count(); }
double num(std::uint64_t v) { return static_cast<double>(v); }

// The samples of one adapter: its role and the host's labels on each, plus
// the sample's own.
struct Writer {
  metrics::Exposition& out;
  metrics::Labels base;

  metrics::Labels with(metrics::Labels own) const {
    metrics::Labels l = base;
    l.insert(l.end(), std::make_move_iterator(own.begin()), std::make_move_iterator(own.end()));
    return l;
  }
  void counter(const std::string& name, const std::string& help, double v, metrics::Labels own = {}) {
    out.counter(name, help, v, with(std::move(own)));
  }
  void gauge(const std::string& name, const std::string& help, double v, metrics::Labels own = {}) {
    out.gauge(name, help, v, with(std::move(own)));
  }
  void histogram(const std::string& name, const std::string& help, const metrics::Histogram& h,
                 metrics::Labels own = {}) {
    out.histogram(name, help, h, with(std::move(own)));
  }
};

void render_health(Writer& w, const health::MonitorMetrics& h) {
  const auto& c = h.counters;
  for (int s = 0; s < health::state_count; ++s) {
    const auto st = static_cast<health::State>(s);
    w.gauge("kvlink_engine_health_state", "The link's health state: 1 for the current one, 0 for the others",
            h.state == st ? 1 : 0, {{"state", health::state_name(st)}});
  }
  for (int s = 0; s < health::state_count; ++s)
    w.counter("kvlink_engine_health_transitions_total", "Health state transitions, by the state entered",
              num(h.transitions_to[s]), {{"to", health::state_name(static_cast<health::State>(s))}});
  for (int s = 0; s < health::state_count; ++s)
    w.counter("kvlink_engine_health_state_seconds_total", "Time the link spent in each health state",
              seconds(c.time_in_state[s]), {{"state", health::state_name(static_cast<health::State>(s))}});
  w.counter("kvlink_engine_pings_sent_total", "Heartbeat PINGs sent", num(c.pings_sent));
  w.counter("kvlink_engine_pings_failed_total",
            "Heartbeat PINGs failed: timed out, refused, or answered with a data-path error", num(c.pings_failed));
  w.histogram("kvlink_engine_ping_rtt_seconds", "Round trip of answered heartbeat PINGs", h.ping_rtt);
  w.counter("kvlink_engine_deadlines_missed_total",
            "Calls and requests that missed their deadline (each counts as a health failure)",
            num(c.deadlines_missed));
  w.counter("kvlink_engine_connects_total", "Connect + HELLO attempts, by result", num(c.connects_ok),
            {{"result", "ok"}});
  w.counter("kvlink_engine_connects_total", "Connect + HELLO attempts, by result", num(c.connects_failed),
            {{"result", "failed"}});
  w.counter("kvlink_engine_reconnects_total", "Successful connects after the first",
            num(c.connects_ok > 0 ? c.connects_ok - 1 : 0));
  w.counter("kvlink_engine_connections_lost_total", "Connections that ended (EOF, reset, closed)",
            num(c.connections_lost));
  w.counter("kvlink_engine_hellos_repeated_total", "HELLO said again because the server had forgotten the instance",
            num(c.hellos_repeated));
  w.counter("kvlink_engine_planned_restarts_total", "Planned server restarts announced (draining notices)",
            num(c.planned_restarts));
}

void render_calls(Writer& w, const AdapterMetrics& m) {
  for (Op op : ops_of(m.role))
    w.counter("kvlink_engine_calls_total", "Adapter calls completed, by operation", num(m.call(op).calls),
              {{"op", op_name(op)}});
  for (Op op : ops_of(m.role))
    for (const auto& [error, n] : m.call(op).errors)
      w.counter("kvlink_engine_call_errors_total", "Adapter calls that completed with an error, by operation and error",
                num(n), {{"op", op_name(op)}, {"error", error}});
  for (Op op : ops_of(m.role))
    w.counter("kvlink_engine_calls_degraded_total",
              "Adapter calls not sent because the link was degraded or stopped, by operation",
              num(m.call(op).degraded), {{"op", op_name(op)}});
  for (Op op : ops_of(m.role))
    w.histogram("kvlink_engine_call_duration_seconds",
                "Adapter call latency, from the call to its completion, by operation", m.call(op).latency,
                {{"op", op_name(op)}});
}

void render_worker(Writer& w, const AdapterMetrics& m) {
  const std::string bytes_help = "Bytes copied between the engine's KV blocks and the server, by operation";
  w.counter("kvlink_engine_transfer_bytes_total", bytes_help, num(m.stored_bytes), {{"op", "store"}});
  w.counter("kvlink_engine_transfer_bytes_total", bytes_help, num(m.retrieved_bytes), {{"op", "retrieve"}});
  const std::string chunks_help = "Chunks stored or retrieved, by operation";
  w.counter("kvlink_engine_transfer_chunks_total", chunks_help, num(m.stored_chunks), {{"op", "store"}});
  w.counter("kvlink_engine_transfer_chunks_total", chunks_help, num(m.retrieved_chunks), {{"op", "retrieve"}});
  w.counter("kvlink_engine_store_skipped_chunks_total",
            "Chunks of stores the server skipped (already held, locked, or no room)", num(m.skipped_chunks));
  w.counter("kvlink_engine_load_errors_total", "Retrieves that failed: their blocks must be recomputed",
            num(m.load_errors));
  w.counter("kvlink_engine_load_error_blocks_total", "Engine blocks that failed to load (take_load_errors)",
            num(m.load_error_blocks));
  w.gauge("kvlink_engine_registered", "1 when a server holds this worker's KV-cache registration",
          m.registered ? 1 : 0);
  w.counter("kvlink_engine_reregistrations_total",
            "KV-cache registrations sent again without the engine asking (a server had lost it)",
            num(m.reregistrations));
  w.counter("kvlink_engine_registrations_refused_total", "KV-cache registrations the server refused",
            num(m.registrations_refused));
}

void render_scheduler(Writer& w, const AdapterMetrics& m) {
  w.counter("kvlink_engine_lookup_tokens_total", "Tokens of the full chunks sent in prefix lookups",
            num(m.lookup_tokens));
  w.counter("kvlink_engine_lookup_hit_tokens_total", "Matched tokens of the prefix lookups the server answered",
            num(m.lookup_hit_tokens));
}

}  // namespace

void render(const AdapterMetrics& m, metrics::Exposition& out, const metrics::Labels& labels) {
  Writer w{out, {{"role", role_name(m.role)}}};
  w.base.insert(w.base.end(), labels.begin(), labels.end());
  render_health(w, m.health);
  render_calls(w, m);
  if (m.role == AdapterRole::worker) render_worker(w, m);
  else render_scheduler(w, m);
}

std::string prometheus_text(const AdapterMetrics& m, const metrics::Labels& labels) {
  metrics::Exposition e;
  render(m, e, labels);
  return e.text();
}

}  // namespace kvlink::adapter
