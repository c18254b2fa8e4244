// The health monitor: one coroutine per monitor on a shared io_context
// drives the sans-io Policy (health/policy.hpp). It connects (HELLO), pings
// with its own deadline at a jittered interval, marks the link degraded at
// once when the connection ends (EOF/reset), reconnects with backoff and a
// connect timeout, says HELLO again when the server forgot the instance,
// and follows a draining server through its planned restart.
//
// What the adapter must restore on a server (its KV-cache registration) is
// not the monitor's business: the adapter sees every connection come up
// (Event::Kind::connected, with the HELLO reply) and holds the link out of
// `healthy` with set_registration_pending() until it is restored.
//
// Any number of monitors share one io_context; none owns a thread.
// Thread-safety: start(), stop(), state(), draining(),
// report_deadline_missed(), connection(), gate() and metrics() may be
// called from any thread; on_event(), counters(), changed(), wait_for(),
// set_registration_pending(), notice() and take_connection_and_stop()
// belong to the monitor's executor.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <asio/steady_timer.hpp>
#include <array>
#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvlink/health/policy.hpp"
#include "kvlink/health/warmup_gate.hpp"
#include "kvlink/metrics/histogram.hpp"
#include "kvlink/net/connection.hpp"

namespace kvlink::health {

struct MonitorOptions {
  Config health;
  net::Endpoint endpoint;
  // Sent on every (re)connect; instance_id 0 gets a random one.
  wire::HelloRequest hello;
  // Shared with the adapters that open it; null creates one.
  std::shared_ptr<WarmupGate> gate;
  // Seeds the jitter; 0 picks a random seed.
  std::uint64_t seed = 0;
  // Names the link in log lines.
  std::string name = "kvlink";
  // Timer wakeups are rounded up to a grid of this step, shared by every
  // monitor, so monitors on one io_context wake (and ping) in batches: one
  // wakeup serves many. Adds at most one step to any deadline; 0 disables.
  Duration timer_slack = std::chrono::milliseconds(2);
};

// What callbacks receive: a state transition, a notice (an observable event
// that changes no state, e.g. a connection lost during warmup), or a
// connection that came up (HELLO answered) or went away. `notice` describes
// every kind but transitions in words.
struct Event {
  enum class Kind : std::uint8_t { transition, notice, connected, disconnected } kind = Kind::transition;
  Transition transition;  // kind == transition
  std::string notice;
  wire::HelloReply hello;  // kind == connected
  TimePoint at{};
};

// What a metrics scrape reads of a monitor (Monitor::metrics()).
struct MonitorMetrics {
  State state = State::warming;
  Counters counters;  // time_in_state brought up to the moment of the copy
  std::array<std::uint64_t, state_count> transitions_to{};  // transitions into each state
  metrics::Histogram ping_rtt;                              // round trips of answered pings
};

class Monitor : public std::enable_shared_from_this<Monitor> {
 public:
  static std::shared_ptr<Monitor> create(asio::any_io_executor ex, MonitorOptions options);
  ~Monitor();

  // Starts the monitor coroutine (once). It connects at once; pings start
  // when the gate opens.
  void start();
  // Stops pinging, closes the connection, enters `stopped`. Idempotent.
  void stop();

  WarmupGate& gate() { return *gate_; }
  std::shared_ptr<WarmupGate> shared_gate() { return gate_; }
  State state() const { return state_.load(std::memory_order_acquire); }
  // The server announced a planned restart: it takes no new transfers.
  bool draining() const { return draining_.load(std::memory_order_acquire); }
  std::uint64_t instance_id() const { return options_.hello.instance_id; }
  // The current connection for issuing calls (null while disconnected).
  std::shared_ptr<net::Connection> connection() const;
  // Passive signal: a request on this link missed its deadline.
  void report_deadline_missed();

  // Callback for every event, on the monitor's executor.
  void on_event(std::function<void(const Event&)> callback);
  // The adapter has something the server must hold before the link may be
  // called healthy (a registration on its way), or no longer.
  void set_registration_pending(bool pending);
  // Publishes a notice event from the adapter (it logs it itself).
  void notice(std::string text);
  // Stops like stop() but hands the open connection (or null) to the caller
  // instead of closing it: shutdown stops the heartbeat first, then sends
  // UNREGISTER on it.
  std::shared_ptr<net::Connection> take_connection_and_stop();
  Counters counters() const;
  // The state, the counters, transitions by target state and the ping
  // round-trip histogram, from any thread (a host's metrics HTTP thread).
  // A copy the executor refreshes under a mutex after every input (a few
  // hundred bytes, about once per ping), so a scrape never waits for the
  // executor and works on its thread too.
  MonitorMetrics metrics() const;
  std::uint64_t boot_id() const { return policy_.boot_id(); }
  // The server's chunk size from the latest HELLO (0 before the first).
  std::uint32_t server_chunk_size() const { return server_chunk_size_.load(std::memory_order_acquire); }
  const MonitorOptions& options() const { return options_; }

  // Completes with the next transition (error operation_aborted if
  // cancelled). Supports cancellation (parallel_group, timeouts).
  template <class Token>
  auto async_changed(Token&& token) {
    return asio::async_initiate<Token, void(std::error_code, Transition)>(
        [self = shared_from_this()](auto handler) { self->add_waiter(std::move(handler)); }, token);
  }
  asio::awaitable<Transition> changed();
  // Waits until the state is `s` or `timeout` passes; returns whether the
  // state is `s`.
  asio::awaitable<bool> wait_for(State s, Duration timeout);

  asio::any_io_executor get_executor() const { return ex_; }

 private:
  using Waiter = std::function<void(std::error_code, Transition)>;
  Monitor(asio::any_io_executor ex, MonitorOptions options);

  static asio::awaitable<void> run(std::shared_ptr<Monitor> self);
  void apply(Actions a);
  void wake();
  TimePoint quantize(TimePoint t) const;
  void do_connect();
  void do_ping();
  void do_hello();
  void on_connected(net::ConnectResult r);
  void publish_connected(const wire::HelloReply& hello, std::string what);
  void on_lost(std::uint64_t gen, std::string why);
  void publish(Event e);
  void publish_metrics(const Actions& a);

  template <class Handler>
  void add_waiter(Handler handler) {
    auto shared = std::make_shared<Handler>(std::move(handler));
    const std::uint64_t id = next_waiter_++;
    auto slot = asio::get_associated_cancellation_slot(*shared);
    auto exec = asio::get_associated_executor(*shared, ex_);
    waiters_.emplace(id, [shared, exec](std::error_code ec, Transition t) {
      asio::post(exec, [shared, ec, t = std::move(t)]() mutable { std::move (*shared)(ec, std::move(t)); });
    });
    if (slot.is_connected()) {
      slot.assign([weak = weak_from_this(), id](asio::cancellation_type) {
        if (auto self = weak.lock()) {
          auto it = self->waiters_.find(id);
          if (it == self->waiters_.end()) return;
          auto w = std::move(it->second);
          self->waiters_.erase(it);
          w(asio::error::operation_aborted, {});
        }
      });
    }
  }

  asio::any_io_executor ex_;
  MonitorOptions options_;
  std::shared_ptr<WarmupGate> gate_;
  Policy policy_;
  asio::steady_timer wake_;
  TimePoint armed_for_ = TimePoint::max();  // the wake timer's expiry while run() waits on it
  bool waiting_ = false;
  std::atomic<State> state_{State::warming};
  std::atomic<bool> started_{false};
  std::atomic<bool> draining_{false};
  std::atomic<std::uint32_t> server_chunk_size_{0};
  bool stopped_ = false;
  mutable std::mutex conn_mutex_;
  // Weak: a connection is owned by its read loop, which lives in the
  // io_context. Its pending calls hold this monitor (and the adapters), so a
  // strong pointer here would be a cycle that outlives a destroyed
  // io_context.
  std::weak_ptr<net::Connection> conn_;
  std::uint64_t gen_ = 0;  // bumps per connection; stale completions are dropped
  std::vector<std::function<void(const Event&)>> callbacks_;
  std::unordered_map<std::uint64_t, Waiter> waiters_;
  std::uint64_t next_waiter_ = 1;
  mutable std::mutex metrics_mutex_;
  MonitorMetrics metrics_;  // guarded by metrics_mutex_; written on the executor
  TimePoint metrics_at_;    // when metrics_.counters was taken
  std::optional<Duration> answered_rtt_;  // a ping's round trip, for the next publish_metrics
};

}  // namespace kvlink::health
