// The adapters' metrics against the real kvlink-server: known traffic gives
// exact call counts, chunk counts, bytes moved and latency counts, whatever
// form the calls were made in; the health state and transitions follow a
// server kill and restart; degraded calls and failed retrieves are counted;
// and the Prometheus text parses with the reference Python parser
// (prometheus_client) to the same numbers. Scrapes run from another thread
// and from the adapters' own io thread while the engine works.
#include <doctest/doctest.h>

#include <algorithm>
#include <asio/co_spawn.hpp>
#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>
#include <atomic>
#include <fstream>
#include <future>
#include <map>
#include <numeric>
#include <sstream>
#include <thread>

#include "kvlink/adapter/metrics.hpp"
#include "kvlink/adapter/scheduler.hpp"
#include "kvlink/adapter/worker.hpp"
#include "kvlink/runtime/runtime.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "kvlink/unique_fd.hpp"
#include "adapter_fixture.hpp"
#include "server_process.hpp"
#include "test_support.hpp"

using namespace kvlink;
using namespace kvlink::adapter;
using namespace std::chrono_literals;
using kvlink::test::eventually;
using kvlink::test::ServerProcess;
using kvlink::test::TempDir;

namespace {

using test::block;
using test::blocks;
using test::chunk;
using test::layout;
using test::prompt;

// Bytes of one token's KV over every layer and plane of layout().
std::uint64_t token_bytes() {
  const auto l = layout();
  return l.block_bytes() / l.block_size * l.num_planes * l.num_layers;
}

struct Fixture : test::AdapterFixture {
  // Both adapters' Prometheus text, as a host renders it for its /metrics.
  std::string text() {
    metrics::Exposition e;
    render(worker->metrics(), e, {{"instance", "engine-0"}});
    render(scheduler->metrics(), e, {{"instance", "engine-0"}});
    return e.text();
  }
};

std::uint64_t state_index(health::State s) { return static_cast<std::uint64_t>(s); }

// Parses Prometheus text with the reference parser (python3-prometheus-client)
// and returns every sample as "name{label=value,...}" (labels sorted) ->
// value. The script also checks each histogram: buckets cumulative, the +Inf
// bucket equal to the count.
std::map<std::string, double> parse_with_python(const TempDir& dir, const std::string& text) {
  const std::string text_path = dir.path() + "/metrics.txt";
  const std::string script_path = dir.path() + "/parse.py";
  std::ofstream(text_path) << text;
  std::ofstream(script_path) << R"(import sys
from prometheus_client.parser import text_string_to_metric_families
text = open(sys.argv[1]).read()
for family in text_string_to_metric_families(text):
    buckets = {}
    counts = {}
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}} {s.value!r}")
        if family.type == "histogram":
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            if s.name.endswith("_bucket"):
                buckets.setdefault(key, []).append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                counts[key] = s.value
    for key, bs in buckets.items():
        values = [v for _, v in sorted(bs)]
        if values != sorted(values) or values[-1] != counts[key] or sorted(bs)[-1][0] != float("inf"):
            sys.exit(f"histogram {family.name} {key}: buckets {bs} count {counts[key]}")
)";
  std::string out;
  const int rc = test::run_command("/usr/bin/python3 " + script_path + " " + text_path, out);
  REQUIRE_MESSAGE(rc == 0, "prometheus_client could not parse the text (python3-prometheus-client missing? "
                           "scripts/deps installs it):\n"
                               << out << "\n--- text ---\n"
                               << text);
  std::map<std::string, double> samples;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) {
    const auto space = line.rfind(' ');
    REQUIRE(space != std::string::npos);
    samples[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return samples;
}

double sample(const std::map<std::string, double>& samples, const std::string& key) {
  auto it = samples.find(key);
  if (it == samples.end()) FAIL("no sample " << key);
  return it->second;
}

bool has_line(const std::string& text, const std::string& line) {
  return ("\n" + text).find("\n" + line + "\n") != std::string::npos;
}

// A coroutine engine's lookup (throws on an error).
asio::awaitable<bool> awaited_lookup(std::shared_ptr<SchedulerAdapter> s, std::vector<store::Token> tokens) {
  co_await s->async_submit_lookup("l5", std::move(tokens), asio::use_awaitable);
  co_return true;
}

}  // namespace

TEST_CASE("adapter metrics: known traffic -> exact counts, bytes, latency counts; scraped from any thread") {
  Fixture f;
  f.server.start();
  f.make();

  // A host's metrics thread scraping all along: it never waits for the io
  // thread and never races it (TSan builds check the latter).
  std::atomic<bool> stop{false};
  std::atomic<int> scrapes{0};
  std::thread scraper([&] {
    while (!stop.load()) {
      (void)f.text();
      ++scrapes;
      std::this_thread::sleep_for(1ms);
    }
  });
  struct Join {
    std::atomic<bool>& stop;
    std::thread& t;
    ~Join() {
      stop = true;
      t.join();
    }
  } join{stop, scraper};

  REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
  f.scheduler_connected();
  const auto t1 = prompt(2 * chunk, 1), t2 = prompt(chunk, 2), t3 = prompt(2 * chunk + 5, 3), t4 = prompt(chunk, 4);

  // M = 5 stores: blocking, use_future, a batch of two, the first again.
  auto s1 = f.worker->submit_store(f.spec("s1", t1, 0));
  REQUIRE_MESSAGE(s1, s1.error().message());
  auto s2 = f.worker->async_submit_store(f.spec("s2", t2, 8), asio::use_future);
  REQUIRE(s2.wait_for(5s) == std::future_status::ready);
  CHECK(s2.get().stored_chunks == 1);
  auto batch = f.worker->submit_stores({f.spec("s3", t3, 16), f.spec("s4", t4, 24)});
  REQUIRE_MESSAGE(batch, batch.error().message());
  auto again = f.worker->submit_store(f.spec("s1-again", t1, 0));
  REQUIRE(again);
  CHECK(again->skipped_chunks == 2);  // already held: nothing moved

  // N = 5 lookups: blocking (a hit, a miss), use_future, a callback, a coroutine.
  REQUIRE(f.scheduler->submit_lookup("l1", t1));
  REQUIRE(f.scheduler->submit_lookup("l2", prompt(2 * chunk, 9)));
  auto l3 = f.scheduler->async_submit_lookup("l3", t3, asio::use_future);
  REQUIRE(l3.wait_for(5s) == std::future_status::ready);
  l3.get();
  std::promise<std::error_code> l4;
  f.scheduler->async_submit_lookup("l4", t2, [&](std::error_code ec, Done) { l4.set_value(ec); });
  auto l4f = l4.get_future();
  REQUIRE(l4f.wait_for(5s) == std::future_status::ready);
  CHECK(!l4f.get());
  auto l5 = asio::co_spawn(f.rt.executor(), awaited_lookup(f.scheduler, t4), asio::use_future);
  REQUIRE(l5.wait_for(5s) == std::future_status::ready);
  CHECK(l5.get());
  for (const char* id : {"l1", "l2", "l3", "l4", "l5"}) {
    auto st = f.scheduler->check_lookup(id);
    REQUIRE(st);
    CHECK(st->ready);
  }

  // K = 3 retrieves that succeed (one skipping a 20-token prefix, one in a
  // batch) and one of chunks never stored: a load error of 2 blocks.
  auto r1 = f.worker->submit_retrieve([&] {
    auto s = f.spec("r1", t1, 40);
    s.skip_first_n_tokens = 20;
    return s;
  }());
  REQUIRE_MESSAGE(r1, r1.error().message());
  REQUIRE(f.worker->submit_retrieve(f.spec("r2", t2, 50)));
  auto rb = f.worker->submit_retrieves({f.spec("r3", t3, 60), f.spec("r-miss", prompt(chunk, 8), 70)});
  REQUIRE_MESSAGE(rb, rb.error().message());  // the batch ran; each spec's code is in its value
  REQUIRE(rb->size() == 2);
  CHECK(!(*rb)[0]);
  CHECK((*rb)[1] == errc::not_found);
  CHECK(f.worker->get_finished({})->retrieves.size() == 4);
  CHECK(f.worker->take_load_errors().value() == blocks(70, 2));

  f.healthy();
  // Pings answered: their round trips are in the histogram, one per answer.
  REQUIRE(eventually([&] { return f.worker->metrics().health.counters.pings_ok >= 2; }));

  const AdapterMetrics w = f.worker->metrics();
  const AdapterMetrics s = f.scheduler->metrics();
  CHECK(w.role == AdapterRole::worker);
  CHECK(s.role == AdapterRole::scheduler);
  const auto& store = w.call(Op::store);
  CHECK(store.calls == 5);
  CHECK(store.failed == 0);
  CHECK(store.latency.count == 5);
  CHECK(store.latency.sum_seconds > 0);
  CHECK(w.stored_chunks == 6);
  CHECK(w.skipped_chunks == 2);
  CHECK(w.stored_bytes == 6 * chunk * token_bytes());
  const auto& retrieve = w.call(Op::retrieve);
  CHECK(retrieve.calls == 4);
  CHECK(retrieve.failed == 1);
  CHECK(retrieve.latency.count == 4);
  CHECK(retrieve.errors == std::map<std::string, std::uint64_t, std::less<>>{{"not_found", 1}});
  CHECK(w.retrieved_chunks == 5);
  CHECK(w.retrieved_bytes == (2 * chunk - 20 + chunk + 2 * chunk) * token_bytes());
  CHECK(w.load_errors == 1);
  CHECK(w.load_error_blocks == 2);
  CHECK(w.call(Op::register_kv_caches).calls == 1);
  CHECK(w.call(Op::register_kv_caches).failed == 0);
  CHECK(w.call(Op::get_finished).calls == 1);
  CHECK(w.call(Op::take_load_errors).calls == 1);
  CHECK(w.registered);
  CHECK(w.reregistrations == 0);
  for (Op op : ops_of(AdapterRole::worker)) CHECK(w.call(op).latency.count == w.call(op).calls);
  for (Op op : ops_of(AdapterRole::scheduler)) CHECK(w.call(op).calls == 0);

  CHECK(s.call(Op::lookup).calls == 5);
  CHECK(s.call(Op::lookup).latency.count == 5);
  CHECK(s.call(Op::lookup).failed == 0);
  CHECK(s.call(Op::check_lookup).calls == 5);
  CHECK(s.lookup_tokens == (2 + 2 + 2 + 1 + 1) * chunk);
  CHECK(s.lookup_hit_tokens == (2 + 0 + 2 + 1 + 1) * chunk);
  for (Op op : ops_of(AdapterRole::scheduler)) CHECK(s.call(op).latency.count == s.call(op).calls);

  for (const auto* m : {&w, &s}) {
    CHECK(m->health.state == health::State::healthy);
    CHECK(m->health.transitions_to[state_index(health::State::healthy)] == 1);
    CHECK(m->health.counters.transitions == 1);
    CHECK(m->health.counters.connects_ok == 1);
    CHECK(m->health.ping_rtt.count == m->health.counters.pings_ok);
  }

  // From the io thread itself (a coroutine engine serving /metrics there):
  // no wait on the executor, so no deadlock.
  std::promise<std::uint64_t> on_io;
  asio::post(f.rt.executor(), [&] { on_io.set_value(f.worker->metrics().call(Op::store).calls); });
  auto on_io_f = on_io.get_future();
  REQUIRE(on_io_f.wait_for(5s) == std::future_status::ready);
  CHECK(on_io_f.get() == 5);
  CHECK(scrapes.load() > 0);

  // The text: exact sample lines, and the reference parser's reading.
  const std::string text = f.text();
  const std::string wl = R"(role="worker",instance="engine-0")";
  const std::string sl = R"(role="scheduler",instance="engine-0")";
  for (const std::string& line : {
           "kvlink_engine_calls_total{" + wl + R"(,op="store"} 5)",
           "kvlink_engine_calls_total{" + wl + R"(,op="retrieve"} 4)",
           "kvlink_engine_call_errors_total{" + wl + R"(,op="retrieve",error="not_found"} 1)",
           "kvlink_engine_call_duration_seconds_count{" + wl + R"(,op="store"} 5)",
           "kvlink_engine_call_duration_seconds_bucket{" + wl + R"(,op="store",le="+Inf"} 5)",
           "kvlink_engine_transfer_bytes_total{" + wl + R"(,op="store"} )" + std::to_string(w.stored_bytes),
           "kvlink_engine_transfer_bytes_total{" + wl + R"(,op="retrieve"} )" + std::to_string(w.retrieved_bytes),
           "kvlink_engine_load_errors_total{" + wl + "} 1",
           "kvlink_engine_load_error_blocks_total{" + wl + "} 2",
           "kvlink_engine_registered{" + wl + "} 1",
           "kvlink_engine_calls_total{" + sl + R"(,op="lookup"} 5)",
           "kvlink_engine_lookup_hit_tokens_total{" + sl + "} " + std::to_string(s.lookup_hit_tokens),
           "kvlink_engine_health_state{" + wl + R"(,state="healthy"} 1)",
           "kvlink_engine_health_transitions_total{" + sl + R"(,to="healthy"} 1)",
       })
    CHECK_MESSAGE(has_line(text, line), line << "\n--- text ---\n" << text);

  const auto p = parse_with_python(f.dir, text);
  const std::string wp = "instance=engine-0,", wr = ",role=worker}", sr = ",role=scheduler}";
  CHECK(sample(p, "kvlink_engine_calls_total{" + wp + "op=store" + wr) == 5);
  CHECK(sample(p, "kvlink_engine_calls_total{" + wp + "op=retrieve" + wr) == 4);
  CHECK(sample(p, "kvlink_engine_call_errors_total{error=not_found," + wp + "op=retrieve" + wr) == 1);
  CHECK(sample(p, "kvlink_engine_call_duration_seconds_count{" + wp + "op=store" + wr) == 5);
  CHECK(sample(p, "kvlink_engine_call_duration_seconds_count{" + wp + "op=retrieve" + wr) == 4);
  CHECK(sample(p, "kvlink_engine_call_duration_seconds_sum{" + wp + "op=store" + wr) ==
        doctest::Approx(store.latency.sum_seconds));
  CHECK(sample(p, "kvlink_engine_transfer_bytes_total{" + wp + "op=store" + wr) ==
        static_cast<double>(6 * chunk * token_bytes()));
  CHECK(sample(p, "kvlink_engine_transfer_chunks_total{" + wp + "op=retrieve" + wr) == 5);
  CHECK(sample(p, "kvlink_engine_store_skipped_chunks_total{" + wp.substr(0, wp.size() - 1) + wr) == 2);
  CHECK(sample(p, "kvlink_engine_load_errors_total{" + wp.substr(0, wp.size() - 1) + wr) == 1);
  CHECK(sample(p, "kvlink_engine_calls_total{" + wp + "op=lookup" + sr) == 5);
  CHECK(sample(p, "kvlink_engine_call_duration_seconds_count{" + wp + "op=lookup" + sr) == 5);
  CHECK(sample(p, "kvlink_engine_lookup_tokens_total{" + wp.substr(0, wp.size() - 1) + sr) == 8 * chunk);
  CHECK(sample(p, "kvlink_engine_health_state{" + wp + "role=worker,state=healthy}") == 1);
  CHECK(sample(p, "kvlink_engine_health_state{" + wp + "role=worker,state=degraded}") == 0);
  CHECK(sample(p, "kvlink_engine_ping_rtt_seconds_count{" + wp.substr(0, wp.size() - 1) + wr) >= 2);

  // Shutdown is a call too, and the link is stopped after it.
  REQUIRE(f.worker->shutdown(2s));
  const AdapterMetrics after = f.worker->metrics();
  CHECK(after.call(Op::shutdown).calls == 1);
  CHECK(after.health.state == health::State::stopped);
  CHECK(after.health.transitions_to[state_index(health::State::stopped)] == 1);
  CHECK(!after.registered);
}

TEST_CASE("adapter metrics: health state and transitions across a server kill and restart; degraded calls; "
          "load errors of failed retrieves") {
  Fixture f;
  f.server.start();
  f.make(LookupMode::two_phase);  // "warm" stays pending until checked
  REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
  f.scheduler_connected();
  const auto tokens = prompt(2 * chunk, 5);
  REQUIRE(f.worker->submit_store(f.spec("s", tokens, 0)));
  REQUIRE(f.scheduler->submit_lookup("warm", tokens));
  f.healthy();
  CHECK(f.worker->metrics().health.transitions_to[state_index(health::State::healthy)] == 1);

  f.server.kill();
  REQUIRE(eventually([&] { return f.worker->monitor().state() == health::State::degraded; }, 5s));
  REQUIRE(eventually([&] { return f.scheduler->monitor().state() == health::State::degraded; }, 5s));
  // Not sent while degraded: counted as degraded calls and unhealthy errors.
  CHECK(f.worker->submit_store(f.spec("s-d", tokens, 10)).error() == errc::unhealthy);
  CHECK(f.worker->submit_retrieve(f.spec("r-d", tokens, 20)).error() == errc::unhealthy);
  CHECK(f.scheduler->submit_lookup("during", tokens).error() == errc::unhealthy);
  auto warm = f.scheduler->check_lookup("warm");  // answered here: 0 tokens
  REQUIRE(warm);
  CHECK(warm->ready);
  CHECK(warm->matched_tokens == 0);
  CHECK(f.scheduler->end_session("warm").error() == errc::unhealthy);
  std::this_thread::sleep_for(50ms);  // some time spent degraded

  const AdapterMetrics w = f.worker->metrics();
  const AdapterMetrics s = f.scheduler->metrics();
  CHECK(w.health.state == health::State::degraded);
  CHECK(w.health.transitions_to[state_index(health::State::degraded)] == 1);
  CHECK(w.health.counters.connections_lost >= 1);
  CHECK(w.health.counters.time_in_state[state_index(health::State::degraded)] >= 50ms);
  CHECK(w.call(Op::store).degraded == 1);
  CHECK(w.call(Op::store).errors.at("unhealthy") == 1);
  CHECK(w.call(Op::retrieve).degraded == 1);
  CHECK(w.load_errors == 1);
  CHECK(w.load_error_blocks == 4);  // 2 chunks of 2 blocks, not loaded
  CHECK(s.call(Op::lookup).degraded == 1);
  CHECK(s.call(Op::check_lookup).degraded == 1);
  CHECK(s.call(Op::check_lookup).failed == 0);  // answered: 0 tokens
  CHECK(s.call(Op::end_session).degraded == 1);
  const std::string degraded_text = f.text();
  CHECK(has_line(degraded_text, R"(kvlink_engine_health_state{role="worker",instance="engine-0",state="degraded"} 1)"));
  CHECK(has_line(degraded_text,
                 R"(kvlink_engine_calls_degraded_total{role="scheduler",instance="engine-0",op="lookup"} 1)"));

  f.server.start();
  f.healthy();
  const AdapterMetrics back = f.worker->metrics();
  CHECK(back.health.state == health::State::healthy);
  CHECK(back.health.transitions_to[state_index(health::State::healthy)] == 2);
  CHECK(back.health.transitions_to[state_index(health::State::degraded)] == 1);
  CHECK(back.health.counters.transitions == 3);
  CHECK(back.health.counters.connects_ok >= 2);
  CHECK(back.health.counters.connects_failed >= 1);
  CHECK(back.reregistrations == 1);  // the new server did not hold it
  CHECK(back.registered);
  CHECK(f.scheduler->metrics().health.transitions_to[state_index(health::State::healthy)] == 2);
  const std::string text = f.text();
  CHECK(has_line(text, R"(kvlink_engine_health_transitions_total{role="worker",instance="engine-0",to="healthy"} 2)"));
  CHECK(has_line(text, R"(kvlink_engine_health_transitions_total{role="worker",instance="engine-0",to="degraded"} 1)"));
  CHECK(has_line(text, R"(kvlink_engine_reregistrations_total{role="worker",instance="engine-0"} 1)"));
  const auto p = parse_with_python(f.dir, text);
  CHECK(sample(p, "kvlink_engine_reconnects_total{instance=engine-0,role=worker}") >= 1);
  CHECK(sample(p, "kvlink_engine_health_state_seconds_total{instance=engine-0,role=worker,state=degraded}") >= 0.05);

  // The server stops answering (SIGSTOP) with a retrieve to send: it fails
  // (timed_out at its deadline, or unhealthy if the heartbeat noticed
  // first), and its blocks are load errors once get_finished reports it.
  f.server.stop();
  REQUIRE(eventually([&] { return test::process_stopped(f.server.pid()); }, 5s));
  auto late = f.worker->async_submit_retrieve(f.spec("r-late", tokens, 30), asio::use_future);
  REQUIRE(late.wait_for(5s) == std::future_status::ready);
  CHECK_THROWS(late.get());
  REQUIRE(eventually([&] {
    auto r = f.worker->get_finished({})->retrieves;
    return std::find(r.begin(), r.end(), "r-late") != r.end();
  }, 5s));
  const AdapterMetrics hung = f.worker->metrics();
  CHECK(hung.load_errors == 2);
  CHECK(hung.load_error_blocks == 8);  // blocks 20-23 and 30-33
  const auto& errors = hung.call(Op::retrieve).errors;
  CHECK(hung.call(Op::retrieve).failed == 2);
  CHECK((errors.contains("timed_out") || errors.at("unhealthy") == 2));
  CHECK(f.worker->take_load_errors()->size() == hung.load_error_blocks);
  f.server.resume();
}
