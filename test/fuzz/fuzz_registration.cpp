// Fuzzes the registration lifecycle: every byte is one input (event kind +
// time step). It must never crash, never send a REGISTER without a
// connection or after shutdown, and never count an answer to an attempt
// other than the one in flight.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "kvlink/health/registration.hpp"

using namespace kvlink;
using namespace kvlink::health;
using Kind = RegistrationLifecycle::Action::Kind;
using Outcome = RegistrationLifecycle::Outcome;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  RegistrationLifecycle r;
  TimePoint now{};
  bool connected = false;
  std::uint64_t sent = 0;  // the latest attempt sent
  for (std::size_t i = 0; i < size; ++i) {
    const std::uint8_t b = data[i];
    now += std::chrono::milliseconds((b >> 4) * 5);
    RegistrationLifecycle::Action a;
    const std::uint64_t before = r.acknowledgements();
    switch (b & 15) {
      case 0: a = r.register_requested(now); break;
      case 1: a = r.unregister_requested(now); break;
      case 2: if (b & 0x80) a = r.shutdown_requested(now); break;
      case 3: case 4: connected = true; a = r.connection_up(now, b & 0x10, b & 0x20); break;
      case 5: connected = false; a = r.connection_lost(now); break;
      case 6: a = r.answered(now, sent - (b >> 7), Outcome::acknowledged, ""); break;
      case 7: a = r.answered(now, sent, Outcome::transient, "x"); break;
      case 8: a = r.answered(now, sent, Outcome::refused, "x"); break;
      case 9: a = r.not_registered(now); break;
      default: a = r.tick(std::max(now, std::min(r.next_wakeup(), now + std::chrono::seconds(10)))); break;
    }
    if (a.kind == Kind::send_register) {
      if (!connected || r.stopped() || a.attempt == sent) std::abort();
      sent = a.attempt;
    }
    if (a.kind == Kind::send_unregister && !connected) std::abort();
    if (a.kind == Kind::acknowledged && (r.acknowledgements() != before + 1 || !r.held())) std::abort();
    if (r.stopped() && r.phase() != RegistrationLifecycle::Phase::none) std::abort();
    if ((r.phase() == RegistrationLifecycle::Phase::sending) != r.awaiting(sent)) std::abort();
  }
  return 0;
}
