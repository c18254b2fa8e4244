#include "kvlink/health/policy.hpp"

#include <fmt/format.h>

#include <algorithm>

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

TimePoint Policy::next_wakeup() const {
  if (state_ == State::stopped) return TimePoint::max();
  TimePoint t = TimePoint::max();
  if (!gate_open_) t = std::min(t, created_ + config_.max_warmup);
  if (!connected_ && !connecting_) t = std::min(t, reconnect_at_);
  if (connected_ && !reregister_in_flight_ && need_reregister_) t = std::min(t, reregister_at_);
  if (reregister_in_flight_) t = std::min(t, reregister_deadline_);
  if (connected_ && gate_open_ && !reregister_in_flight_ && !need_reregister_) {
    // The next ping is scheduled when one is sent. While a slow ping is still
    // in flight past that time, its answer (or timeout) is what comes next.
    if (!ping_in_flight_ || next_ping_at_ > accounted_until_) t = std::min(t, next_ping_at_);
  }
  return t;
}

Duration Policy::jittered(Duration d, double fraction) {
  if (fraction <= 0) return d;
  std::uniform_real_distribution<double> u(-fraction, fraction);
  return std::chrono::duration_cast<Duration>(d * (1.0 + u(rng_)));
}

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
  backoff_ = std::min(std::chrono::duration_cast<Duration>(backoff_ * config_.reconnect_multiplier),
                      std::max(config_.reconnect_max, config_.reconnect_initial));
}

// A failure judged against the server (only once the gate is open).
void Policy::failure(Actions& a, TimePoint now, std::string_view why) {
  successes_ = 0;
  ++failures_;
  const int threshold = ever_succeeded_ ? config_.failure_threshold : config_.cold_start_failure_threshold;
  if ((state_ == State::healthy || state_ == State::warming) && failures_ >= threshold)
    enter(a, State::degraded, fmt::format("{} ({} consecutive failure{})", why, failures_, failures_ == 1 ? "" : "s"),
          now);
}

void Policy::maybe_recover(Actions& a, TimePoint now) {
  if (need_reregister_ || !connected_) return;
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
  if (reregister_in_flight_ && now >= reregister_deadline_) {
    reregister_in_flight_ = false;
    reregister_at_ = now + jittered(config_.interval, config_.jitter);
    a.notice = "re-registration timed out";
    if (gate_open_) failure(a, now, "re-registration timed out");
  }
  if (connected_ && need_reregister_ && !reregister_in_flight_ && now >= reregister_at_) {
    reregister_in_flight_ = true;
    reregister_deadline_ = now + config_.reregister_timeout;
    a.reregister = true;
    a.hello_first = hello_first_;
  }
  if (connected_ && gate_open_ && !need_reregister_ && !reregister_in_flight_ && !ping_in_flight_ &&
      now >= next_ping_at_) {
    ping_in_flight_ = true;
    ping_sent_at_ = now;
    // One interval from this ping, whatever its outcome: a timeout does not
    // stretch detection, and an answer does not move the schedule.
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

Actions Policy::connected(TimePoint now, std::uint64_t boot_id) {
  Actions a;
  if (state_ == State::stopped || !connecting_) return a;
  account(now);
  connecting_ = false;
  connected_ = true;
  ++counters_.connects_ok;
  backoff_ = config_.reconnect_initial;
  last_connect_error_.clear();
  if (boot_id_ != 0 && boot_id != boot_id_) {
    need_reregister_ = true;
    hello_first_ = false;  // the connect ran HELLO already
    reregister_at_ = now;
    a.notice = fmt::format("server restarted (boot id {:016x} -> {:016x}): re-registering", boot_id_, boot_id);
  } else if (need_reregister_) {
    hello_first_ = false;
    reregister_at_ = now;
  }
  boot_id_ = boot_id;
  successes_ = 0;
  next_ping_at_ = now;
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
  if (gate_open_) failure(a, now, why);
  return a;
}

Actions Policy::ping_ok(TimePoint now, Duration rtt) {
  Actions a;
  if (state_ == State::stopped || !ping_in_flight_) return a;
  account(now);
  ping_in_flight_ = false;
  ++counters_.pings_ok;
  counters_.last_rtt = rtt;
  ever_succeeded_ = true;
  failures_ = 0;
  ++successes_;
  maybe_recover(a, now);
  return a;
}

Actions Policy::ping_failed(TimePoint now, PingFailure kind, std::string_view why) {
  Actions a;
  if (state_ == State::stopped || !ping_in_flight_) return a;
  account(now);
  ping_in_flight_ = false;
  ++counters_.pings_failed;
  if (kind == PingFailure::unknown_instance) {
    // The server is alive but lost our registration (reaped or restarted):
    // not usable until HELLO and the re-registration hook ran again.
    need_reregister_ = true;
    hello_first_ = true;
    reregister_at_ = now;
    successes_ = 0;
    failures_ = 0;
    if (state_ == State::healthy || state_ == State::warming)
      enter(a, State::degraded, fmt::format("server does not know this instance ({})", why), now);
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
  reregister_in_flight_ = false;
  successes_ = 0;
  ++counters_.connections_lost;
  backoff_ = config_.reconnect_initial;
  reconnect_at_ = now;  // first reconnect at once, then back off
  if (gate_open_ && (state_ == State::healthy || state_ == State::warming)) {
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

Actions Policy::reregistered(TimePoint now, bool ok, std::string_view why) {
  Actions a;
  if (state_ == State::stopped || !reregister_in_flight_) return a;
  account(now);
  reregister_in_flight_ = false;
  if (ok) {
    ++counters_.reregistrations;
    need_reregister_ = false;
    hello_first_ = false;
    successes_ = 0;
    next_ping_at_ = now;
    a.notice = "re-registered with the server";
  } else {
    reregister_at_ = now + jittered(config_.interval, config_.jitter);
    a.notice = fmt::format("re-registration failed: {}", why);
    if (gate_open_) failure(a, now, fmt::format("re-registration failed: {}", why));
  }
  return a;
}

Actions Policy::stop(TimePoint now) {
  Actions a;
  if (state_ == State::stopped) return a;
  enter(a, State::stopped, "stopped", now);
  connected_ = connecting_ = ping_in_flight_ = reregister_in_flight_ = false;
  return a;
}

}  // namespace kvlink::health
