#include "kvlink/health/policy.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "kvlink/jitter.hpp"

namespace kvlink::health {

const char* state_name(State s) {
  switch (s) {
    case State::warming: return "warming";
    case State::healthy: return "healthy";
    case State::degraded: return "degraded";
    case State::stopped: return "stopped";
  }
  return "unknown";
}

Policy::Policy(const Config& config, TimePoint now, std::uint64_t seed)
    : config_(config), rng_(seed), created_(now), state_since_(now), accounted_until_(now) {
  config_.failure_threshold = std::max(config_.failure_threshold, 1);
  config_.success_threshold = std::max(config_.success_threshold, 1);
  config_.cold_start_failure_threshold = std::max(config_.cold_start_failure_threshold, 1);
  config_.jitter = std::clamp(config_.jitter, 0.0, 0.5);
  config_.reconnect_jitter = std::clamp(config_.reconnect_jitter, 0.0, 0.5);
  config_.reconnect_multiplier = std::max(config_.reconnect_multiplier, 1.0);
  config_.interval = std::max(config_.interval, Duration(std::chrono::milliseconds(1)));
  backoff_ = config_.reconnect_initial;
}

void Policy::account(TimePoint now) {
  if (now > accounted_until_) {
    counters_.time_in_state[static_cast<int>(state_)] += now - accounted_until_;
    accounted_until_ = now;
  }
}

Counters Policy::counters(TimePoint now) const {
  Counters c = counters_;
  if (now > accounted_until_) c.time_in_state[static_cast<int>(state_)] += now - accounted_until_;
  return c;
}

bool Policy::may_ping() const {
  return connected_ && gate_open_ && !need_hello_ && !hello_in_flight_ && !draining_;
}

TimePoint Policy::next_wakeup() const {
  if (state_ == State::stopped) return TimePoint::max();
  TimePoint t = TimePoint::max();
  if (!gate_open_) t = std::min(t, created_ + config_.max_warmup);
  if (!connected_ && !connecting_) t = std::min(t, reconnect_at_);
  if (!connected_ && draining_) t = std::min(t, planned_until_);
  if (connected_ && need_hello_ && !hello_in_flight_) t = std::min(t, accounted_until_);
  if (may_ping()) {
    // The next ping is scheduled when one is sent. While a slow ping is still
    // in flight past that time, its answer (or timeout) is what comes next.
    if (!ping_in_flight_ || next_ping_at_ > accounted_until_) t = std::min(t, next_ping_at_);
  }
  return t;
}

Duration Policy::probe_timeout() const {
  // Degraded, there is no verdict to hurry: one probe waits the whole
  // ping_timeout, so a server that resumes finds one in flight to answer.
  if (state_ == State::degraded) return config_.ping_timeout;
  const int threshold = ever_succeeded_ ? config_.failure_threshold : config_.cold_start_failure_threshold;
  // A server that is merely slow keeps its answers counted: never below
  // four smoothed round trips.
  return std::min(config_.ping_timeout, std::max(config_.ping_timeout / threshold, 4 * srtt_));
}

Duration Policy::jittered(Duration d, double fraction) { return kvlink::jittered(d, fraction, rng_); }

void Policy::enter(Actions& a, State to, std::string reason, TimePoint now) {
  account(now);
  Transition t;
  t.from = state_;
  t.to = to;
  t.reason = std::move(reason);
  t.at = now;
  if (state_ == State::degraded && to == State::healthy) t.outage = now - state_since_;
  state_ = to;
  state_since_ = now;
  ++counters_.transitions;
  a.transition = std::move(t);
}

void Policy::schedule_reconnect(Actions& a, TimePoint now) {
  const Duration d = jittered(backoff_, config_.reconnect_jitter);
  reconnect_at_ = now + d;
  a.reconnect_after = d;
  const Duration cap = std::max(std::min(config_.reconnect_max, config_.interval), config_.reconnect_initial);
  backoff_ = std::min(std::chrono::duration_cast<Duration>(backoff_ * config_.reconnect_multiplier), cap);
}

// A failure judged against the server (only once the gate is open).
void Policy::failure(Actions& a, TimePoint now, std::string_view why) {
  successes_ = 0;
  ++failures_;
  const int threshold = ever_succeeded_ ? config_.failure_threshold : config_.cold_start_failure_threshold;
  if ((state_ == State::healthy || state_ == State::warming) && failures_ >= threshold)
    enter(a, State::degraded, fmt::format("{} ({} consecutive failure{})", why, failures_, failures_ == 1 ? "" : "s"),
          now);
  else if (state_ == State::degraded) return;
  // Not a verdict yet: confirm it with the next probe now, not an interval
  // later. A verdict: the first probe for recovery goes now too, so a
  // server that resumes finds one in flight.
  next_ping_at_ = std::min(next_ping_at_, now);
}

void Policy::maybe_recover(Actions& a, TimePoint now) {
  if (registration_pending_ || need_hello_ || hello_in_flight_ || !connected_) return;
  if (state_ == State::warming && gate_open_ && successes_ >= 1) {
    enter(a, State::healthy, "first ping answered", now);
  } else if (state_ == State::degraded && successes_ >= config_.success_threshold) {
    enter(a, State::healthy, fmt::format("{} consecutive pings answered", successes_), now);
  }
}

Actions Policy::start(TimePoint now) {
  Actions a;
  if (started_ || state_ == State::stopped) return a;
  started_ = true;
  reconnect_at_ = now;
  return tick(now);
}

Actions Policy::tick(TimePoint now) {
  Actions a;
  if (state_ == State::stopped || !started_) return a;
  account(now);
  if (!gate_open_ && now >= created_ + config_.max_warmup) a.open_gate = true;
  if (!connected_ && !connecting_ && now >= reconnect_at_) {
    connecting_ = true;
    reconnect_at_ = TimePoint::max();
    a.connect = true;
  }
  if (draining_ && !connected_ && now >= planned_until_) {
    draining_ = false;
    planned_until_ = TimePoint::max();
    if (gate_open_ && state_ != State::degraded)
      enter(a, State::degraded,
            fmt::format("the server did not come back within {} ms of its planned restart ({})",
                        std::chrono::duration_cast<std::chrono::milliseconds>(config_.planned_restart_grace).count(),
                        last_connect_error_.empty() ? "no answer" : last_connect_error_),
            now);
  }
  if (connected_ && need_hello_ && !hello_in_flight_) {
    hello_in_flight_ = true;
    a.send_hello = true;
  }
  if (may_ping() && !ping_in_flight_ && now >= next_ping_at_) {
    ping_in_flight_ = true;
    ping_sent_at_ = now;
    // One interval from this ping, whatever its outcome: a timeout does not
    // stretch detection, and an answer does not move the schedule (except
    // for the probes that confirm a verdict, which go at once).
    next_ping_at_ = now + jittered(config_.interval, config_.jitter);
    ++counters_.pings_sent;
    a.send_ping = true;
  }
  return a;
}

Actions Policy::gate_opened(TimePoint now, std::string_view reason) {
  Actions a;
  if (gate_open_ || state_ == State::stopped) return a;
  account(now);
  gate_open_ = true;
  next_ping_at_ = now;
  if (!connected_ && !last_connect_error_.empty())
    enter(a, State::degraded, fmt::format("warmup gate opened ({}) while not connected: {}", reason, last_connect_error_),
          now);
  return a;
}

Actions Policy::connected(TimePoint now, std::uint64_t boot_id, bool server_draining) {
  Actions a;
  if (state_ == State::stopped || !connecting_) return a;
  account(now);
  connecting_ = false;
  connected_ = true;
  ++counters_.connects_ok;
  backoff_ = config_.reconnect_initial;
  last_connect_error_.clear();
  need_hello_ = hello_in_flight_ = false;
  if (boot_id_ != 0 && boot_id != boot_id_)
    a.notice = fmt::format("server restarted (boot id {:016x} -> {:016x}){}", boot_id_, boot_id,
                           draining_ ? ": planned restart complete" : "");
  if (server_draining) {
    // The old server, still draining: nothing to judge on it, and it will
    // close this connection.
    draining_ = true;
    planned_until_ = now + config_.planned_restart_grace;
  } else {
    draining_ = false;
    planned_until_ = TimePoint::max();
  }
  boot_id_ = boot_id;
  successes_ = 0;
  next_ping_at_ = now;
  return a;
}

Actions Policy::hello_answered(TimePoint now, std::uint64_t boot_id) {
  Actions a;
  if (state_ == State::stopped || !hello_in_flight_) return a;
  account(now);
  hello_in_flight_ = need_hello_ = false;
  boot_id_ = boot_id;
  next_ping_at_ = now;
  a.notice = "HELLO answered: the server knows this instance again";
  maybe_recover(a, now);
  return a;
}

Actions Policy::hello_failed(TimePoint now, std::string_view why) {
  Actions a;
  if (state_ == State::stopped || !hello_in_flight_) return a;
  account(now);
  hello_in_flight_ = false;  // need_hello_ stays: tried again on the next tick
  if (gate_open_) failure(a, now, fmt::format("HELLO again failed: {}", why));
  return a;
}

Actions Policy::connect_failed(TimePoint now, std::string_view why) {
  Actions a;
  if (state_ == State::stopped || !connecting_) return a;
  account(now);
  connecting_ = false;
  ++counters_.connects_failed;
  last_connect_error_ = std::string(why);
  schedule_reconnect(a, now);
  // While a planned restart's replacement starts, a refused connect is expected.
  if (gate_open_ && !draining_) failure(a, now, why);
  return a;
}

Actions Policy::ping_ok(TimePoint now, Duration rtt) {
  Actions a;
  if (state_ == State::stopped || !ping_in_flight_) return a;
  account(now);
  ping_in_flight_ = false;
  ++counters_.pings_ok;
  counters_.last_rtt = rtt;
  srtt_ = srtt_ == Duration{} ? rtt : (7 * srtt_ + rtt) / 8;
  ever_succeeded_ = true;
  failures_ = 0;
  ++successes_;
  maybe_recover(a, now);
  // Recovering: the confirming pings go back to back.
  if (state_ == State::degraded && successes_ < config_.success_threshold) next_ping_at_ = now;
  return a;
}

Actions Policy::ping_failed(TimePoint now, PingFailure kind, std::string_view why) {
  Actions a;
  if (state_ == State::stopped || !ping_in_flight_) return a;
  account(now);
  ping_in_flight_ = false;
  ++counters_.pings_failed;
  if (kind == PingFailure::unknown_instance) {
    // The server answers, so it is alive: it forgot this instance (reaped
    // it after a silence). Say HELLO again; what the adapter registered is
    // restored once the HELLO reply says the server does not hold it.
    need_hello_ = true;
    ++counters_.hellos_repeated;
    a.notice = fmt::format("the server does not know this instance ({}): saying HELLO again", why);
    return a;
  }
  failure(a, now, kind == PingFailure::timeout ? fmt::format("ping timed out ({})", why)
                                                : fmt::format("ping failed ({})", why));
  return a;
}

Actions Policy::connection_lost(TimePoint now, std::string_view why) {
  Actions a;
  if (state_ == State::stopped || !connected_) return a;
  account(now);
  connected_ = false;
  ping_in_flight_ = false;
  need_hello_ = hello_in_flight_ = false;
  successes_ = 0;
  ++counters_.connections_lost;
  backoff_ = config_.reconnect_initial;
  reconnect_at_ = now;  // first reconnect at once, then back off
  if (draining_) {
    planned_until_ = now + config_.planned_restart_grace;
    a.notice = fmt::format("planned restart: the draining server closed the connection ({}); reconnecting", why);
  } else if (gate_open_ && (state_ == State::healthy || state_ == State::warming)) {
    enter(a, State::degraded, fmt::format("connection lost: {}", why), now);
  } else {
    a.notice = fmt::format("connection lost{}: {}", gate_open_ ? "" : " during warmup", why);
  }
  return a;
}

Actions Policy::deadline_missed(TimePoint now) {
  Actions a;
  if (state_ == State::stopped || !gate_open_) return a;
  account(now);
  ++counters_.deadlines_missed;
  failure(a, now, "a request missed its deadline");
  return a;
}

Actions Policy::registration_pending(TimePoint now, bool pending) {
  Actions a;
  if (state_ == State::stopped || pending == registration_pending_) return a;
  account(now);
  registration_pending_ = pending;
  if (!pending) maybe_recover(a, now);
  return a;
}

Actions Policy::server_draining(TimePoint now, std::string_view why) {
  Actions a;
  if (state_ == State::stopped || draining_) return a;
  account(now);
  draining_ = true;
  ping_in_flight_ = false;  // its answer or timeout no longer counts
  planned_until_ = now + config_.planned_restart_grace;
  ++counters_.planned_restarts;
  a.notice = fmt::format("draining: the server announced a planned restart ({})", why);
  return a;
}

Actions Policy::stop(TimePoint now) {
  Actions a;
  if (state_ == State::stopped) return a;
  enter(a, State::stopped, "stopped", now);
  connected_ = connecting_ = ping_in_flight_ = hello_in_flight_ = false;
  return a;
}

}  // namespace kvlink::health
