// The KV-cache registration lifecycle as pure logic (sans-io): no sockets,
// no Asio, no clock reads. The worker adapter feeds it what happens (the
// engine asked to register or unregister, a connection came up or went
// away, the server answered) with the current time, and carries out the one
// action it returns. Unit tests drive it with fake time.
//
// What it guarantees, whatever the order of events:
// - A registration the engine asked for reaches every server the link
//   connects to: it is sent on each connection whose HELLO says the server
//   does not hold it (a restarted server holds nothing; a surviving one that
//   still holds it is not asked again), again after a `not_registered`
//   answer, and retried with backoff after a failure that says nothing about
//   the registration itself (timeout, lost connection). Nothing waits for
//   the warmup gate or a healthy link: the first acknowledgement is what
//   opens a gate triggered by it.
// - A registration the server refuses (bad layout, no room for its slot
//   size) is dropped once, with the server's reason; it is not retried until
//   the engine registers again.
// - An answer to an older attempt (superseded by a newer registration, an
//   unregister or shutdown) changes nothing.
// - Unregister and shutdown forget the registration at once; the UNREGISTER
//   is sent now when connected, else on the next connection whose server
//   still holds it. After shutdown nothing more is sent.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvlink/clock.hpp"

namespace kvlink::health {

class RegistrationLifecycle {
 public:
  enum class Phase : std::uint8_t {
    none,     // nothing to register (never asked, unregistered, refused, or shut down)
    waiting,  // must be sent: waits for a usable connection or its retry time
    sending,  // a REGISTER is in flight
    held,     // the server this link is connected to holds it
  };

  // How a REGISTER ended.
  enum class Outcome : std::uint8_t {
    acknowledged,
    transient,  // timeout, lost connection, server draining: retried
    refused,    // the server rejected the registration itself: dropped
  };

  // The one thing to do now.
  struct Action {
    enum class Kind : std::uint8_t { none, send_register, send_unregister, acknowledged, refused } kind = Kind::none;
    std::uint64_t attempt = 0;  // send_register: pass it back to answered()
    std::string reason;         // refused: the server's reason
  };

  struct Backoff {
    Duration initial = std::chrono::milliseconds(20);
    double multiplier = 2.0;
    Duration max = std::chrono::seconds(1);
  };

  RegistrationLifecycle();
  explicit RegistrationLifecycle(Backoff backoff);

  Phase phase() const { return phase_; }
  // The engine wants a registration the server does not hold yet: the link
  // must not call itself healthy, and transfers cannot be served.
  bool pending() const { return phase_ == Phase::waiting || phase_ == Phase::sending; }
  bool held() const { return phase_ == Phase::held; }
  bool stopped() const { return stopped_; }
  // Whether an answer to `attempt` would still count.
  bool awaiting(std::uint64_t attempt) const { return phase_ == Phase::sending && attempt == attempt_; }
  std::uint64_t acknowledgements() const { return acknowledgements_; }
  // When tick() has something to do (TimePoint::max() when nothing).
  TimePoint next_wakeup() const;

  // Inputs. Each returns what to do now.
  Action register_requested(TimePoint now);
  Action unregister_requested(TimePoint now);
  Action shutdown_requested(TimePoint now);
  // A connection finished HELLO: whether that server holds this instance's
  // registration, and whether it is draining (it takes none now).
  Action connection_up(TimePoint now, bool server_holds, bool server_draining);
  Action connection_lost(TimePoint now);
  Action answered(TimePoint now, std::uint64_t attempt, Outcome outcome, std::string_view reason);
  // A transfer was answered `not_registered`: the server lost it.
  Action not_registered(TimePoint now);
  Action tick(TimePoint now);

 private:
  Action try_send(TimePoint now);

  Backoff backoff_;
  Phase phase_ = Phase::none;
  bool connected_ = false;
  bool draining_ = false;
  bool stopped_ = false;
  bool unregister_owed_ = false;  // the server may still hold one the engine gave up
  std::uint64_t attempt_ = 0;     // of the REGISTER in flight; answers to others are stale
  std::uint64_t acknowledgements_ = 0;
  Duration delay_{};
  TimePoint retry_at_ = TimePoint::min();
};

const char* phase_name(RegistrationLifecycle::Phase p);

}  // namespace kvlink::health
