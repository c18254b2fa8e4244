#include "kvlink/health/registration.hpp"

#include <algorithm>

namespace kvlink::health {

const char* phase_name(RegistrationLifecycle::Phase p) {
  switch (p) {
    case RegistrationLifecycle::Phase::none: return "none";
    case RegistrationLifecycle::Phase::waiting: return "waiting";
    case RegistrationLifecycle::Phase::sending: return "sending";
    case RegistrationLifecycle::Phase::held: return "held";
  }
  return "unknown";
}

using Action = RegistrationLifecycle::Action;

RegistrationLifecycle::RegistrationLifecycle() : RegistrationLifecycle(Backoff{}) {}

RegistrationLifecycle::RegistrationLifecycle(Backoff backoff) : backoff_(backoff) {
  backoff_.multiplier = std::max(backoff_.multiplier, 1.0);
  backoff_.max = std::max(backoff_.max, backoff_.initial);
  delay_ = backoff_.initial;
}

TimePoint RegistrationLifecycle::next_wakeup() const {
  if (phase_ == Phase::waiting && connected_ && !draining_ && !stopped_) return retry_at_;
  return TimePoint::max();
}

Action RegistrationLifecycle::try_send(TimePoint now) {
  if (phase_ != Phase::waiting || !connected_ || draining_ || stopped_ || now < retry_at_) return {};
  phase_ = Phase::sending;
  ++attempt_;
  return {Action::Kind::send_register, attempt_, {}};
}

Action RegistrationLifecycle::register_requested(TimePoint now) {
  if (stopped_) return {};
  phase_ = Phase::waiting;
  ++attempt_;  // an attempt still in flight is superseded
  unregister_owed_ = false;
  delay_ = backoff_.initial;
  retry_at_ = TimePoint::min();
  return try_send(now);
}

Action RegistrationLifecycle::unregister_requested(TimePoint) {
  if (stopped_) return {};
  phase_ = Phase::none;
  ++attempt_;
  // Send it now if we can; otherwise a server that still holds the old
  // registration (a surviving one we reconnect to) hears it later.
  unregister_owed_ = !connected_;
  if (connected_) return {Action::Kind::send_unregister, 0, {}};
  return {};
}

Action RegistrationLifecycle::shutdown_requested(TimePoint) {
  if (stopped_) return {};
  const bool something = phase_ != Phase::none || unregister_owed_;
  stopped_ = true;
  phase_ = Phase::none;
  ++attempt_;
  unregister_owed_ = false;
  if (connected_ && something) return {Action::Kind::send_unregister, 0, {}};
  return {};
}

Action RegistrationLifecycle::connection_up(TimePoint now, bool server_holds, bool server_draining) {
  connected_ = true;
  draining_ = server_draining;
  if (stopped_) return {};
  switch (phase_) {
    case Phase::none:
      if (unregister_owed_ && server_holds && !server_draining) {
        unregister_owed_ = false;
        return {Action::Kind::send_unregister, 0, {}};
      }
      if (!server_holds) unregister_owed_ = false;
      return {};
    case Phase::held:
      if (server_holds) return {};  // the same server, or one that kept it: nothing to send
      phase_ = Phase::waiting;
      break;
    case Phase::sending:  // only on a repeated HELLO of the same connection; its answer still comes
      return {};
    case Phase::waiting:
      break;
  }
  // A new connection is a new chance: no backoff left over from the last one.
  delay_ = backoff_.initial;
  retry_at_ = TimePoint::min();
  return try_send(now);
}

Action RegistrationLifecycle::connection_lost(TimePoint) {
  connected_ = false;
  draining_ = false;
  if (phase_ == Phase::sending) {
    phase_ = Phase::waiting;  // its answer (connection_lost) is stale now
    ++attempt_;
  }
  // `held` stays: the next HELLO tells whether that server still holds it.
  return {};
}

Action RegistrationLifecycle::answered(TimePoint now, std::uint64_t attempt, Outcome outcome,
                                       std::string_view reason) {
  if (phase_ != Phase::sending || attempt != attempt_) return {};
  switch (outcome) {
    case Outcome::acknowledged:
      phase_ = Phase::held;
      ++acknowledgements_;
      delay_ = backoff_.initial;
      return {Action::Kind::acknowledged, attempt, {}};
    case Outcome::transient:
      phase_ = Phase::waiting;
      retry_at_ = now + delay_;
      delay_ = std::min(std::chrono::duration_cast<Duration>(delay_ * backoff_.multiplier), backoff_.max);
      return {};
    case Outcome::refused:
      phase_ = Phase::none;
      return {Action::Kind::refused, attempt, std::string(reason)};
  }
  return {};
}

Action RegistrationLifecycle::not_registered(TimePoint now) {
  if (phase_ != Phase::held) return try_send(now);
  phase_ = Phase::waiting;
  delay_ = backoff_.initial;
  retry_at_ = TimePoint::min();
  return try_send(now);
}

Action RegistrationLifecycle::tick(TimePoint now) { return try_send(now); }

}  // namespace kvlink::health
