#include "kvlink/health/monitor.hpp"

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/experimental/parallel_group.hpp>
#include <asio/post.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <random>
#include <utility>

#include "kvlink/log.hpp"

namespace kvlink::health {

namespace {
std::uint64_t random_seed() {
  std::random_device rd;
  return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
}
double ms(Duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
}  // namespace

std::shared_ptr<Monitor> Monitor::create(asio::any_io_executor ex, MonitorOptions options) {
  return std::shared_ptr<Monitor>(new Monitor(std::move(ex), std::move(options)));
}

Monitor::Monitor(asio::any_io_executor ex, MonitorOptions options)
    : ex_(ex),
      options_(std::move(options)),
      gate_(options_.gate ? options_.gate : std::make_shared<WarmupGate>()),
      policy_(options_.health, Clock::now(), options_.seed ? options_.seed : random_seed()),
      wake_(ex, TimePoint::max()),
      metrics_at_(Clock::now()) {
  if (options_.hello.instance_id == 0) options_.hello.instance_id = net::random_instance_id();
  if (options_.hello.instance_secret.empty()) options_.hello.instance_secret = net::random_instance_secret();
}

Monitor::~Monitor() = default;

void Monitor::start() {
  if (started_.exchange(true)) return;
  auto self = shared_from_this();
  asio::post(ex_, [self] {
    if (self->stopped_) return;
    self->gate_->subscribe([weak = std::weak_ptr<Monitor>(self), ex = self->ex_](std::string_view reason) {
      asio::post(ex, [weak, r = std::string(reason)] {
        if (auto s = weak.lock()) {
          if (s->stopped_) return;
          log::info("{}: warmup gate opened: {}", s->options_.name, r);
          s->apply(s->policy_.gate_opened(Clock::now(), r));
        }
      });
    });
    asio::co_spawn(self->ex_, run(self), asio::detached);
  });
}

void Monitor::stop() {
  asio::post(ex_, [self = shared_from_this()] {
    if (auto c = self->take_connection_and_stop()) c->close();
  });
}

std::shared_ptr<net::Connection> Monitor::take_connection_and_stop() {
  if (stopped_) return nullptr;
  apply(policy_.stop(Clock::now()));
  stopped_ = true;
  std::shared_ptr<net::Connection> c;
  {
    std::lock_guard lock(conn_mutex_);
    c = conn_.lock();
    conn_.reset();
  }
  ++gen_;  // its close is no longer a lost connection of this monitor
  wake_.cancel();
  return c;
}

void Monitor::set_registration_pending(bool pending) {
  if (!stopped_) apply(policy_.registration_pending(Clock::now(), pending));
}

void Monitor::notice(std::string text) {
  Event e;
  e.kind = Event::Kind::notice;
  e.notice = std::move(text);
  e.at = Clock::now();
  publish(std::move(e));
}

std::shared_ptr<net::Connection> Monitor::connection() const {
  std::lock_guard lock(conn_mutex_);
  return conn_.lock();
}

void Monitor::report_deadline_missed() {
  asio::post(ex_, [self = shared_from_this()] { self->apply(self->policy_.deadline_missed(Clock::now())); });
}

void Monitor::on_event(std::function<void(const Event&)> callback) { callbacks_.push_back(std::move(callback)); }

Counters Monitor::counters() const { return policy_.counters(Clock::now()); }

MonitorMetrics Monitor::metrics() const {
  std::lock_guard lock(metrics_mutex_);
  MonitorMetrics m = metrics_;
  const TimePoint now = Clock::now();
  if (now > metrics_at_) m.counters.time_in_state[static_cast<int>(m.state)] += now - metrics_at_;
  return m;
}

void Monitor::publish_metrics(const Actions& a) {
  const TimePoint now = Clock::now();
  std::lock_guard lock(metrics_mutex_);
  if (a.transition) ++metrics_.transitions_to[static_cast<int>(a.transition->to)];
  if (answered_rtt_) metrics_.ping_rtt.observe(*std::exchange(answered_rtt_, std::nullopt));
  metrics_.state = policy_.state();
  metrics_.counters = policy_.counters(now);
  metrics_at_ = now;
}

asio::awaitable<void> Monitor::run(std::shared_ptr<Monitor> self) {
  self->apply(self->policy_.start(Clock::now()));
  while (!self->stopped_) {
    self->apply(self->policy_.tick(Clock::now()));
    if (self->stopped_) break;
    self->armed_for_ = self->quantize(self->policy_.next_wakeup());
    self->wake_.expires_at(self->armed_for_);
    self->waiting_ = true;
    co_await self->wake_.async_wait(asio::experimental::as_tuple(asio::use_awaitable));
    self->waiting_ = false;
  }
}

TimePoint Monitor::quantize(TimePoint t) const {
  const auto step = options_.timer_slack;
  if (t == TimePoint::max() || step <= Duration::zero()) return t;
  const auto since = t.time_since_epoch();
  const auto rounded = (since + step - Duration(1)) / step * step;
  return rounded < since ? t : TimePoint(rounded);
}

// Re-arms the wake timer only when something is due before it fires: a ping
// answer that changes nothing due costs no timer operation.
void Monitor::wake() {
  if (waiting_ && (stopped_ || quantize(policy_.next_wakeup()) < armed_for_)) {
    armed_for_ = TimePoint::min();
    wake_.cancel();
  }
}

void Monitor::apply(Actions a) {
  draining_.store(policy_.draining(), std::memory_order_release);
  publish_metrics(a);
  if (a.transition) {
    const Transition& t = *a.transition;
    state_.store(t.to, std::memory_order_release);
    if (t.to == State::degraded)
      log::warn("{}: link to {} degraded ({} -> degraded): {}", options_.name, options_.endpoint.to_string(),
                state_name(t.from), t.reason);
    else if (t.from == State::degraded && t.to == State::healthy)
      log::warn("{}: link to {} healthy again after an outage of {:.1f} ms: {}", options_.name,
                options_.endpoint.to_string(), ms(t.outage), t.reason);
    else
      log::info("{}: link to {} {} -> {}: {}", options_.name, options_.endpoint.to_string(), state_name(t.from),
                state_name(t.to), t.reason);
    Event e;
    e.kind = Event::Kind::transition;
    e.transition = t;
    e.at = t.at;
    publish(std::move(e));
  }
  if (!a.notice.empty()) {
    log::info("{}: {}", options_.name, a.notice);
    notice(std::move(a.notice));
  }
  if (stopped_) return;
  if (a.open_gate) gate_->open("max warmup elapsed");
  if (a.connect) do_connect();
  if (a.send_hello) do_hello();
  if (a.send_ping) do_ping();
  wake();  // the coroutine re-reads the next wakeup
}

void Monitor::publish(Event e) {
  for (auto& cb : callbacks_) cb(e);
  if (e.kind == Event::Kind::transition && !waiters_.empty()) {
    auto waiters = std::move(waiters_);
    waiters_.clear();
    for (auto& [id, w] : waiters) w({}, e.transition);
  }
}

void Monitor::do_connect() {
  auto self = shared_from_this();
  asio::co_spawn(ex_, net::connect(ex_, options_.endpoint, options_.hello, policy_.config().connect_timeout),
                 [self](std::exception_ptr ep, net::ConnectResult r) {
                   if (ep) r.error = Error(errc::server_error, "connect threw");
                   self->on_connected(std::move(r));
                 });
}

void Monitor::on_connected(net::ConnectResult r) {
  if (stopped_) {
    if (r.connection) r.connection->close();
    return;
  }
  const auto now = Clock::now();
  if (r.error) {
    apply(policy_.connect_failed(now, r.error.message()));
    return;
  }
  const std::uint64_t gen = ++gen_;
  {
    std::lock_guard lock(conn_mutex_);
    conn_ = r.connection;
  }
  r.connection->on_close([weak = weak_from_this(), gen](const Error& end) {
    if (auto self = weak.lock()) self->on_lost(gen, end.message());
  });
  r.connection->on_notice([weak = weak_from_this(), gen](const wire::ServerNotice& n) {
    auto self = weak.lock();
    if (!self || gen != self->gen_ || self->stopped_) return;
    if (n.kind == wire::NoticeKind::draining) self->apply(self->policy_.server_draining(Clock::now(), n.message));
  });
  server_chunk_size_.store(r.hello.chunk_size, std::memory_order_release);
  apply(policy_.connected(now, r.hello.boot_id, r.hello.draining != 0));
  publish_connected(r.hello, "connected");
  if (!r.connection->is_open()) on_lost(gen, "closed right after connecting");
}

void Monitor::publish_connected(const wire::HelloReply& hello, std::string what) {
  Event e;
  e.kind = Event::Kind::connected;
  e.hello = hello;
  e.notice = fmt::format("{} to {} (server boot id {:016x}{}{})", what, options_.endpoint.to_string(), hello.boot_id,
                         hello.registered ? ", it holds this instance's registration" : "",
                         hello.draining ? ", draining" : "");
  e.at = Clock::now();
  publish(std::move(e));
}

void Monitor::on_lost(std::uint64_t gen, std::string why) {
  if (gen != gen_ || stopped_) return;
  ++gen_;
  {
    std::lock_guard lock(conn_mutex_);
    conn_.reset();
  }
  apply(policy_.connection_lost(Clock::now(), why));
  Event e;
  e.kind = Event::Kind::disconnected;
  e.notice = fmt::format("disconnected: {}", why);
  e.at = Clock::now();
  publish(std::move(e));
}

void Monitor::do_hello() {
  auto c = connection();
  if (!c) return;
  c->async_call(options_.hello, policy_.config().connect_timeout,
                [self = shared_from_this(), gen = gen_](std::error_code ec, wire::HelloReply reply) {
                  if (gen != self->gen_ || self->stopped_) return;
                  const auto now = Clock::now();
                  if (ec == errc::connection_lost) return self->on_lost(gen, "connection lost during HELLO");
                  if (ec) return self->apply(self->policy_.hello_failed(now, ec.message()));
                  self->apply(self->policy_.hello_answered(now, reply.boot_id));
                  self->publish_connected(reply, "HELLO answered again");
                });
}

void Monitor::do_ping() {
  auto c = connection();
  if (!c) return;
  const auto t0 = Clock::now();
  c->async_call(wire::PingRequest{}, policy_.probe_timeout(),
                [self = shared_from_this(), t0, gen = gen_](std::error_code ec, wire::PingReply reply) {
                  if (gen != self->gen_ || self->stopped_) return;
                  const auto now = Clock::now();
                  // Alive but unable to move KV data: as good as down for
                  // the engine, which recomputes until it is back.
                  if (!ec && !reply.data_path_error.empty())
                    return self->apply(self->policy_.ping_failed(
                        now, PingFailure::error, "the server's data path is down: " + reply.data_path_error));
                  if (!ec) {
                    self->answered_rtt_ = now - t0;  // observed with the counters it changes
                    return self->apply(self->policy_.ping_ok(now, now - t0));
                  }
                  if (ec == errc::connection_lost) return self->on_lost(gen, "connection lost during a ping");
                  PingFailure kind = ec == errc::timed_out           ? PingFailure::timeout
                                     : ec == errc::unknown_instance ? PingFailure::unknown_instance
                                                                    : PingFailure::error;
                  self->apply(self->policy_.ping_failed(now, kind, ec.message()));
                });
}

asio::awaitable<Transition> Monitor::changed() { co_return co_await async_changed(asio::use_awaitable); }

asio::awaitable<bool> Monitor::wait_for(State s, Duration timeout) {
  auto self = shared_from_this();
  const auto deadline = Clock::now() + timeout;
  asio::steady_timer timer(ex_, deadline);
  while (state() != s && Clock::now() < deadline) {
    auto [order, ec, t, tec] =
        co_await asio::experimental::make_parallel_group(self->async_changed(asio::experimental::deferred),
                                                         timer.async_wait(asio::experimental::deferred))
            .async_wait(asio::experimental::wait_for_one(), asio::use_awaitable);
    (void)ec;
    (void)t;
    (void)tec;
    if (order[0] == 1) break;
  }
  co_return state() == s;
}

}  // namespace kvlink::health
