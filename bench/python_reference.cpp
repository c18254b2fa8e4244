// The C++ side of bench/python.py: the same calls the Python benchmark
// makes, from C++, against the same server, so the Python figures have an
// in-run reference. Prints "lookup_p50_us X" and "ping_p50_us Y".
//
//   bench-python-ref ENDPOINT SAMPLES
//
// lookup: a blocking SchedulerAdapter::submit_lookup in sync mode (one
// SYNC_LOOKUP round trip) of one 256-token chunk, then cleanup (local);
// ping: one PING on the adapter's connection, waited for with a future
// (what kvlink.SchedulerAdapter.ping does).
#include <asio/use_future.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "kvlink/adapter/scheduler.hpp"
#include "kvlink/runtime/runtime.hpp"

using namespace kvlink;

namespace {

double p50_us(std::vector<Duration> samples) {
  std::nth_element(samples.begin(), samples.begin() + samples.size() / 2, samples.end());
  return std::chrono::duration<double, std::micro>(samples[samples.size() / 2]).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: bench-python-ref ENDPOINT SAMPLES\n");
    return 2;
  }
  const int samples = std::atoi(argv[2]);
  runtime::Runtime rt;
  adapter::SchedulerConfig config;
  config.endpoint = argv[1];
  config.model = "bench";
  config.lookup_mode = adapter::LookupMode::sync;
  auto sched = adapter::SchedulerAdapter::create(rt.executor(), config);
  sched->ready();
  for (int i = 0; i < 500 && !sched->monitor().connection(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  std::vector<store::Token> tokens(256);
  std::iota(tokens.begin(), tokens.end(), 1);

  std::vector<Duration> lookups, pings;
  for (int i = 0; i < samples + samples / 10; ++i) {  // the first tenth warms up
    const std::string id = "ref-" + std::to_string(i);
    const auto start = Clock::now();
    auto r = sched->submit_lookup(id, tokens);
    const auto took = Clock::now() - start;
    if (!r) {
      std::fprintf(stderr, "lookup failed: %s\n", r.error().message().c_str());
      return 1;
    }
    (void)sched->cleanup(id);  // local: cannot fail
    if (i >= samples / 10) lookups.push_back(took);
  }
  for (int i = 0; i < samples + samples / 10; ++i) {
    auto conn = sched->monitor().connection();
    if (!conn) {
      std::fprintf(stderr, "not connected\n");
      return 1;
    }
    const auto start = Clock::now();
    conn->async_call(wire::PingRequest{}, config.call_timeout, asio::use_future).get();
    if (i >= samples / 10) pings.push_back(Clock::now() - start);
  }
  std::printf("lookup_p50_us %.2f\nping_p50_us %.2f\n", p50_us(lookups), p50_us(pings));
  sched->stop();
  return 0;
}
