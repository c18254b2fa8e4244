// Fuzzes the health policy: every byte is one input (event kind + time
// step). The policy must never crash, never transition while the gate is
// closed, and never recover from degraded without enough successful pings.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "kvlink/health/policy.hpp"

using namespace kvlink;
using namespace kvlink::health;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Config c;
  c.interval = std::chrono::milliseconds(100);
  c.ping_timeout = std::chrono::milliseconds(100);
  c.max_warmup = std::chrono::seconds(30);
  TimePoint now{};
  Policy p(c, now, size);
  p.start(now);
  std::uint64_t ok_at_degraded = 0;
  for (std::size_t i = 0; i < size; ++i) {
    const std::uint8_t b = data[i];
    now += std::chrono::milliseconds((b >> 4) * 10);
    Actions a;
    switch (b & 15) {
      case 0: a = p.gate_opened(now, "r"); break;
      case 1: a = p.connected(now, 1 + (b >> 7)); break;
      case 2: a = p.connect_failed(now, "x"); break;
      case 3: case 4: a = p.ping_ok(now, std::chrono::milliseconds(1)); break;
      case 5: a = p.ping_failed(now, PingFailure::timeout, "x"); break;
      case 6: a = p.ping_failed(now, PingFailure::unknown_instance, "x"); break;
      case 7: a = p.ping_failed(now, PingFailure::error, "x"); break;
      case 8: a = p.connection_lost(now, "x"); break;
      case 9: a = p.deadline_missed(now); break;
      case 10: a = p.registration_pending(now, (b >> 7) != 0); break;
      case 11:
        a = (b >> 7) ? p.server_draining(now, "x") : (b >> 6) & 1 ? p.hello_answered(now, 1) : p.hello_failed(now, "x");
        break;
      case 12: a = p.stop(now); break;
      default: a = p.tick(std::max(now, std::min(p.next_wakeup(), now + std::chrono::seconds(60)))); break;
    }
    const auto counters = p.counters(now);
    if (a.transition) {
      if (!p.gate_open() && a.transition->to != State::stopped) std::abort();
      if (a.transition->to == State::degraded) ok_at_degraded = counters.pings_ok;
      if (a.transition->from == State::degraded && a.transition->to == State::healthy &&
          counters.pings_ok - ok_at_degraded < static_cast<std::uint64_t>(c.success_threshold))
        std::abort();
    }
    // Healthy without a connection only while a planned restart runs.
    if (p.state() == State::healthy && !p.connected() && !p.draining()) std::abort();
  }
  return 0;
}
