// The adapters' metrics without sockets: a call is counted once with its
// latency and error, error labels are stable names, and render() writes
// the documented families and samples (exact Prometheus text lines).
#include <doctest/doctest.h>

#include <algorithm>
#include <asio/error.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "kvlink/adapter/metrics.hpp"

using namespace kvlink;
using namespace kvlink::adapter;
using namespace std::chrono_literals;

namespace {

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

bool has_line(const std::vector<std::string>& lines, const std::string& line) {
  return std::find(lines.begin(), lines.end(), line) != lines.end();
}

std::size_t count_prefix(const std::vector<std::string>& lines, const std::string& prefix) {
  return static_cast<std::size_t>(
      std::count_if(lines.begin(), lines.end(), [&](const std::string& l) { return l.starts_with(prefix); }));
}

}  // namespace

TEST_CASE("adapter metrics: error labels are stable names") {
  CHECK(error_name(errc::timed_out) == "timed_out");
  CHECK(error_name(errc::unhealthy) == "unhealthy");
  CHECK(error_name(errc::not_found) == "not_found");
  CHECK(error_name(errc::not_connected) == "not_connected");
  CHECK(error_name(asio::error::operation_aborted) == "operation_aborted");
  CHECK(error_name(std::make_error_code(std::errc::connection_reset)) ==
        "generic_" + std::to_string(static_cast<int>(std::errc::connection_reset)));
}

TEST_CASE("adapter metrics: ops of each role") {
  CHECK(ops_of(AdapterRole::scheduler).size() == 6);
  CHECK(ops_of(AdapterRole::worker).size() == 7);
  CHECK(ops_of(AdapterRole::scheduler).size() + ops_of(AdapterRole::worker).size() == op_count);
  CHECK(std::string(op_name(Op::store)) == "store");
  CHECK(std::string(op_name(Op::lookup)) == "lookup");
  CHECK(std::string(role_name(AdapterRole::scheduler)) == "scheduler");
}

TEST_CASE("adapter metrics: a timed call is counted once, with its latency and its error") {
  auto box = std::make_shared<detail::MetricsBox>(AdapterRole::worker);
  int called = 0;
  std::error_code seen;
  auto cb = detail::timed<int>(
      box, Op::retrieve,
      [&](std::error_code ec, int v) {
        ++called;
        seen = ec;
        CHECK(v == 7);
      },
      Clock::now() - 30ms);
  cb(make_error_code(errc::not_found), 7);
  CHECK(called == 1);
  CHECK(seen == errc::not_found);
  auto ok = detail::timed<int>(box, Op::retrieve, [](std::error_code, int) {});
  ok({}, 7);
  auto degraded = detail::timed<int>(box, Op::store, [](std::error_code, int) {});
  degraded(make_error_code(errc::unhealthy), 0);

  const AdapterMetrics m = box->copy();
  const CallMetrics& r = m.call(Op::retrieve);
  CHECK(r.calls == 2);
  CHECK(r.failed == 1);
  CHECK(r.degraded == 0);
  CHECK(r.errors == std::map<std::string, std::uint64_t, std::less<>>{{"not_found", 1}});
  CHECK(r.latency.count == 2);
  CHECK(r.latency.sum_seconds >= 0.030);
  CHECK(m.load_errors == 1);  // a failed retrieve is a load error
  const CallMetrics& s = m.call(Op::store);
  CHECK(s.calls == 1);
  CHECK(s.degraded == 1);
  CHECK(s.errors.at("unhealthy") == 1);
  CHECK(m.call(Op::lookup).calls == 0);
}

TEST_CASE("adapter metrics: render writes every family once, labelled role, host labels, op") {
  AdapterMetrics w;
  w.role = AdapterRole::worker;
  w.health.state = health::State::healthy;
  w.health.transitions_to[static_cast<int>(health::State::healthy)] = 2;
  w.health.transitions_to[static_cast<int>(health::State::degraded)] = 1;
  w.health.counters.pings_sent = 10;
  w.health.counters.pings_failed = 1;
  w.health.counters.connects_ok = 3;
  w.health.counters.connects_failed = 4;
  w.health.counters.connections_lost = 2;
  w.health.counters.deadlines_missed = 5;
  w.health.counters.time_in_state[static_cast<int>(health::State::degraded)] = 1500ms;
  w.health.ping_rtt.observe(40us);
  w.call(Op::store).calls = 3;
  w.call(Op::store).latency.observe(2ms);
  w.call(Op::store).latency.observe(2ms);
  w.call(Op::store).latency.observe(20ms);
  w.call(Op::retrieve).calls = 2;
  w.call(Op::retrieve).failed = 1;
  w.call(Op::retrieve).errors["not_found"] = 1;
  w.stored_bytes = 8192;
  w.retrieved_bytes = 4096;
  w.stored_chunks = 1;
  w.load_errors = 1;
  w.load_error_blocks = 2;
  w.registered = true;
  w.reregistrations = 1;

  AdapterMetrics s;
  s.role = AdapterRole::scheduler;
  s.call(Op::lookup).calls = 4;
  s.call(Op::check_lookup).degraded = 1;
  s.lookup_tokens = 128;
  s.lookup_hit_tokens = 64;

  metrics::Exposition e;
  render(w, e, {{"instance", "engine-0"}});
  render(s, e, {{"instance", "engine-0"}});
  const std::string text = e.text();
  const auto lines = lines_of(text);

  // Each family once, whichever adapters it holds samples of.
  CHECK(count_prefix(lines, "# TYPE kvlink_engine_calls_total counter") == 1);
  CHECK(count_prefix(lines, "# TYPE kvlink_engine_call_duration_seconds histogram") == 1);
  CHECK(count_prefix(lines, "# TYPE kvlink_engine_health_state gauge") == 1);
  CHECK(count_prefix(lines, "# TYPE kvlink_engine_ping_rtt_seconds histogram") == 1);
  CHECK(count_prefix(lines, "# TYPE kvlink_engine_transfer_bytes_total counter") == 1);
  CHECK(count_prefix(lines, "# TYPE kvlink_engine_lookup_hit_tokens_total counter") == 1);

  const std::string wl = R"(role="worker",instance="engine-0")";
  const std::string sl = R"(role="scheduler",instance="engine-0")";
  for (const std::string& line : {
           "kvlink_engine_health_state{" + wl + R"(,state="healthy"} 1)",
           "kvlink_engine_health_state{" + wl + R"(,state="degraded"} 0)",
           "kvlink_engine_health_state{" + sl + R"(,state="warming"} 1)",
           "kvlink_engine_health_transitions_total{" + wl + R"(,to="healthy"} 2)",
           "kvlink_engine_health_transitions_total{" + wl + R"(,to="degraded"} 1)",
           "kvlink_engine_health_state_seconds_total{" + wl + R"(,state="degraded"} 1.5)",
           "kvlink_engine_pings_sent_total{" + wl + "} 10",
           "kvlink_engine_pings_failed_total{" + wl + "} 1",
           "kvlink_engine_ping_rtt_seconds_bucket{" + wl + R"(,le="2.5e-05"} 0)",
           "kvlink_engine_ping_rtt_seconds_bucket{" + wl + R"(,le="5e-05"} 1)",
           "kvlink_engine_ping_rtt_seconds_count{" + wl + "} 1",
           "kvlink_engine_deadlines_missed_total{" + wl + "} 5",
           "kvlink_engine_connects_total{" + wl + R"(,result="ok"} 3)",
           "kvlink_engine_connects_total{" + wl + R"(,result="failed"} 4)",
           "kvlink_engine_reconnects_total{" + wl + "} 2",
           "kvlink_engine_connections_lost_total{" + wl + "} 2",
           "kvlink_engine_calls_total{" + wl + R"(,op="store"} 3)",
           "kvlink_engine_calls_total{" + wl + R"(,op="retrieve"} 2)",
           "kvlink_engine_calls_total{" + wl + R"(,op="shutdown"} 0)",
           "kvlink_engine_calls_total{" + sl + R"(,op="lookup"} 4)",
           "kvlink_engine_call_errors_total{" + wl + R"(,op="retrieve",error="not_found"} 1)",
           "kvlink_engine_calls_degraded_total{" + sl + R"(,op="check_lookup"} 1)",
           "kvlink_engine_call_duration_seconds_bucket{" + wl + R"(,op="store",le="0.001"} 0)",
           "kvlink_engine_call_duration_seconds_bucket{" + wl + R"(,op="store",le="0.0025"} 2)",
           "kvlink_engine_call_duration_seconds_bucket{" + wl + R"(,op="store",le="0.025"} 3)",
           "kvlink_engine_call_duration_seconds_bucket{" + wl + R"(,op="store",le="+Inf"} 3)",
           "kvlink_engine_call_duration_seconds_count{" + wl + R"(,op="store"} 3)",
           "kvlink_engine_call_duration_seconds_sum{" + wl + R"(,op="store"} 0.024)",
           "kvlink_engine_transfer_bytes_total{" + wl + R"(,op="store"} 8192)",
           "kvlink_engine_transfer_bytes_total{" + wl + R"(,op="retrieve"} 4096)",
           "kvlink_engine_transfer_chunks_total{" + wl + R"(,op="store"} 1)",
           "kvlink_engine_load_errors_total{" + wl + "} 1",
           "kvlink_engine_load_error_blocks_total{" + wl + "} 2",
           "kvlink_engine_registered{" + wl + "} 1",
           "kvlink_engine_reregistrations_total{" + wl + "} 1",
           "kvlink_engine_lookup_tokens_total{" + sl + "} 128",
           "kvlink_engine_lookup_hit_tokens_total{" + sl + "} 64",
       })
    CHECK_MESSAGE(has_line(lines, line), line);
  // Role-specific families stay with their role; no error series without errors.
  CHECK(count_prefix(lines, "kvlink_engine_lookup_tokens_total{" + wl) == 0);
  CHECK(count_prefix(lines, "kvlink_engine_transfer_bytes_total{" + sl) == 0);
  CHECK(count_prefix(lines, "kvlink_engine_calls_total{" + sl + R"(,op="store")") == 0);
  CHECK(count_prefix(lines, "kvlink_engine_call_errors_total{" + sl) == 0);
  // One scheduler and one worker: a series per op of each.
  CHECK(count_prefix(lines, "kvlink_engine_calls_total{") == op_count);
  CHECK(count_prefix(lines, "kvlink_engine_call_duration_seconds_count{") == op_count);

  CHECK(prometheus_text(s, {{"instance", "engine-0"}}) != text);  // one adapter alone
  CHECK(prometheus_text(s).find(R"(kvlink_engine_calls_total{role="scheduler",op="lookup"} 4)") != std::string::npos);
}
