#include "kvlink/store/tier_health.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "kvlink/jitter.hpp"

namespace kvlink::store {

namespace {
long long ms(Duration d) { return std::chrono::duration_cast<std::chrono::milliseconds>(d).count(); }
}  // namespace

const char* tier_state_name(TierState s) {
  switch (s) {
    case TierState::healthy: return "healthy";
    case TierState::degraded: return "degraded";
  }
  return "unknown";
}

bool is_tier_failure(const Error& e) {
  if (!e) return false;
  const auto& cat = e.code().category();
  return cat == std::generic_category() || cat == std::system_category() || e == errc::timed_out;
}

TierHealth::TierHealth(const TierHealthConfig& config, std::string name, std::uint64_t seed)
    : config_(config), name_(std::move(name)), rng_(seed) {
  config_.failure_threshold = std::max(config_.failure_threshold, 1);
  config_.success_threshold = std::max(config_.success_threshold, 1);
  config_.probe_multiplier = std::max(config_.probe_multiplier, 1.0);
  config_.probe_jitter = std::clamp(config_.probe_jitter, 0.0, 0.5);
  config_.probe_max = std::max(config_.probe_max, config_.probe_initial);
  backoff_ = config_.probe_initial;
}

TimePoint TierHealth::next_wakeup() const {
  TimePoint t = probe_in_flight_ ? probe_started_ + config_.op_deadline : probe_at_;
  if (!ops_.empty()) t = std::min(t, ops_.begin()->second.started + config_.op_deadline);
  return t;
}

TierHealth::OpId TierHealth::op_started(TimePoint now, std::string what) {
  const OpId id = next_op_++;
  ops_.emplace(id, Op{now, std::move(what)});
  return id;
}

void TierHealth::schedule_probe(TimePoint now) {
  probe_at_ = now + jittered(backoff_, config_.probe_jitter, rng_);
  backoff_ = std::min(std::chrono::duration_cast<Duration>(backoff_ * config_.probe_multiplier), config_.probe_max);
}

void TierHealth::failure(TierActions& a, TimePoint now, const std::string& why) {
  successes_ = 0;
  if (state_ != TierState::healthy) return;
  if (++failures_ < config_.failure_threshold) return;
  schedule_probe(now);
  TierTransition t;
  t.from = state_;
  t.to = TierState::degraded;
  t.at = now;
  t.line = fmt::format("{}: healthy -> DEGRADED: {} ({} consecutive failure{}); nothing goes to the tier, serving "
                       "from L1 only; first probe in {} ms",
                       name_, why, failures_, failures_ == 1 ? "" : "s", ms(probe_at_ - now));
  state_ = TierState::degraded;
  since_ = now;
  ++counters_.transitions;
  a.transition = std::move(t);
}

TierActions TierHealth::op_finished(OpId id, TimePoint now, const Error& result) {
  TierActions a;
  auto it = ops_.find(id);
  if (it == ops_.end()) {
    stalled_.erase(id);  // already judged as a stall
    return a;
  }
  const std::string what = std::move(it->second.what);
  ops_.erase(it);
  if (is_tier_failure(result)) {
    ++counters_.io_errors;
    // Errors from DiskFiles already say what failed.
    std::string why = result.message();
    if (why.rfind(what, 0) != 0) why = fmt::format("{}: {}", what, why);
    failure(a, now, why);
  } else if (state_ == TierState::healthy) {
    failures_ = 0;
  }
  return a;
}

TierActions TierHealth::tick(TimePoint now) {
  TierActions a;
  while (!ops_.empty() && ops_.begin()->second.started + config_.op_deadline <= now) {
    auto node = ops_.extract(ops_.begin());
    ++counters_.stalls;
    const std::string why = fmt::format("{} stalled: no completion {} ms after it started (deadline {} ms)",
                                        node.mapped().what, ms(now - node.mapped().started), ms(config_.op_deadline));
    stalled_.insert(std::move(node));
    failure(a, now, why);
  }
  if (probe_in_flight_ && now >= probe_started_ + config_.op_deadline) probe_failed(now);
  if (state_ == TierState::degraded && !probe_in_flight_ && now >= probe_at_) {
    probe_in_flight_ = true;
    probe_started_ = now;
    probe_at_ = TimePoint::max();
    ++counters_.probes;
    a.probe = true;
    a.probe_id = ++probe_id_;
  }
  return a;
}

void TierHealth::probe_failed(TimePoint now) {
  probe_in_flight_ = false;
  ++counters_.probes_failed;
  successes_ = 0;
  schedule_probe(now);
}

TierActions TierHealth::probe_finished(TimePoint now, std::uint64_t probe_id, const Error& result) {
  TierActions a;
  if (!probe_in_flight_ || probe_id != probe_id_) return a;
  if (result) {
    probe_failed(now);
    return a;
  }
  probe_in_flight_ = false;
  if (++successes_ < config_.success_threshold) {
    probe_at_ = now;  // confirm at once, not a backoff later
    return a;
  }
  TierTransition t;
  t.from = state_;
  t.to = TierState::healthy;
  t.at = now;
  t.outage = now - since_;
  t.line = fmt::format("{}: RECOVERED -> healthy after {} ms outage ({} consecutive probe{} succeeded); the tier "
                       "takes work again",
                       name_, ms(t.outage), successes_, successes_ == 1 ? "" : "s");
  state_ = TierState::healthy;
  since_ = now;
  failures_ = 0;
  successes_ = 0;
  probe_at_ = TimePoint::max();
  backoff_ = config_.probe_initial;
  ++counters_.transitions;
  a.transition = std::move(t);
  return a;
}

}  // namespace kvlink::store
