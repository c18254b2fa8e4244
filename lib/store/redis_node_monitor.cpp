#include "store/redis_node_monitor.hpp"

#include <fmt/format.h>

#include "kvlink/log.hpp"

namespace kvlink::store {

std::shared_ptr<NodeMonitor> NodeMonitor::create(asio::any_io_executor ex, ClusterNode node, std::string password,
                                                 const health::Config& config, std::uint64_t seed,
                                                 OnTransition on_transition) {
  return std::shared_ptr<NodeMonitor>(
      new NodeMonitor(ex, std::move(node), std::move(password), config, seed, std::move(on_transition)));
}

NodeMonitor::NodeMonitor(asio::any_io_executor ex, ClusterNode node, std::string password,
                         const health::Config& config, std::uint64_t seed, OnTransition on_transition)
    : ex_(ex),
      node_(std::move(node)),
      password_(std::move(password)),
      policy_(config, Clock::now(), seed),
      on_transition_(std::move(on_transition)),
      timer_(ex) {}

void NodeMonitor::start() {
  const TimePoint now = Clock::now();
  apply(policy_.start(now));
  apply(policy_.gate_opened(now, "the cluster tier is in use"));  // no warmup: a node is up or not
}

void NodeMonitor::stop() {
  if (stopped_) return;
  stopped_ = true;
  timer_.cancel();
  if (conn_) conn_->close();
  on_transition_ = nullptr;
}

void NodeMonitor::apply(health::Actions a) {
  if (stopped_) return;
  if (a.transition) {
    const auto& t = *a.transition;
    if (t.to == health::State::degraded)
      log::warn("kvlink-server: redis node {} {} -> DEGRADED: {}; its slots are misses until it answers again",
                to_string(node_), health::state_name(t.from), t.reason);
    else if (t.from == health::State::degraded)
      log::info("kvlink-server: redis node {} RECOVERED after {} ms: {}", to_string(node_),
                std::chrono::duration_cast<std::chrono::milliseconds>(t.outage).count(), t.reason);
    if (on_transition_) on_transition_(node_, t);
  }
  if (stopped_) return;
  if (a.connect) do_connect();
  if (a.send_ping) do_ping();
  arm();
}

void NodeMonitor::arm() {
  const TimePoint at = policy_.next_wakeup();
  if (at == TimePoint::max()) return;
  timer_.expires_at(at);
  timer_.async_wait([weak = weak_from_this()](std::error_code ec) {
    auto self = weak.lock();
    if (ec || !self || self->stopped_) return;
    self->apply(self->policy_.tick(Clock::now()));
  });
}

void NodeMonitor::do_connect() {
  if (conn_) conn_->close();
  conn_.reset();
  const std::uint64_t gen = ++conn_gen_;
  RedisConnection::connect(ex_, node_, password_, policy_.config().connect_timeout,
                           [weak = weak_from_this(), gen](Result<std::shared_ptr<RedisConnection>> r) {
                             auto self = weak.lock();
                             if (!self || self->stopped_ || gen != self->conn_gen_) return;
                             const TimePoint now = Clock::now();
                             if (!r) return self->apply(self->policy_.connect_failed(now, r.error().message()));
                             self->conn_ = *r;
                             self->apply(self->policy_.connected(now, 1));
                           });
}

void NodeMonitor::do_ping() {
  if (!conn_) return;
  const TimePoint sent = Clock::now();
  conn_->send({"PING"}, policy_.probe_timeout(),
              [weak = weak_from_this(), gen = conn_gen_, sent](const Error& e, RedisValue v) {
                auto self = weak.lock();
                if (!self || self->stopped_ || gen != self->conn_gen_) return;
                const TimePoint now = Clock::now();
                if (e == errc::not_connected) return self->apply(self->policy_.connection_lost(now, e.message()));
                if (e) return self->apply(self->policy_.ping_failed(now, health::PingFailure::timeout, e.message()));
                if (v.is_error())
                  return self->apply(self->policy_.ping_failed(now, health::PingFailure::error, v.str()));
                self->apply(self->policy_.ping_ok(now, now - sent));
              });
}

}  // namespace kvlink::store
