// The scheduler side of the engine: prefix lookups (two-phase or sync),
// lookup locks, session ends and block-allocation reports (SPEC section 7).
//
// Every operation exists as an Asio async operation, async_xxx(args...,
// token), completing with (error_code, value), and as a blocking call with a
// deadline returning kvlink::Result<value>: the value or an Error (timed_out
// once the deadline passes; the monitor counts it as a missed deadline). Both may be called from any
// thread; all state lives on the adapter's executor, which must be a
// single-threaded io_context (e.g. runtime::Runtime). Blocking calls must not
// be made from that thread.
//
// Degraded mode: lookups are not sent and report 0 matched tokens (ready);
// free-locks, end-session and block reports are dropped. Those calls then
// complete with errc::unhealthy.
#pragma once

#include <asio/any_io_executor.hpp>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvlink/adapter/call.hpp"
#include "kvlink/adapter/metrics.hpp"
#include "kvlink/health/monitor.hpp"
#include "kvlink/store/keys.hpp"

namespace kvlink::adapter {

enum class LookupMode : std::uint8_t {
  two_phase,  // LOOKUP, then QUERY_PREFETCH_STATUS from check_lookup
  sync,       // SYNC_LOOKUP: one round trip
};

struct SchedulerConfig {
  std::string endpoint;  // "unix:/path" or "tcp:host:port"
  std::string model;
  std::uint32_t world_size = 1;
  std::string cache_salt;
  // Tokens per chunk; 0 takes the server's from HELLO.
  std::uint32_t chunk_size = 0;
  LookupMode lookup_mode = LookupMode::two_phase;
  // Deadline of each remote call.
  Duration call_timeout = std::chrono::seconds(5);
  // Default deadline of the blocking calls.
  Duration blocking_deadline = std::chrono::seconds(5);
  // The first lookup opens the warmup gate (the heartbeat starts).
  bool open_gate_on_first_lookup = true;
  health::Config health;
  // HELLO's shared secret; empty: read from auth_token_file if set, else
  // from $KVLINK_AUTH_TOKEN (none if unset).
  std::string auth_token;
  std::string auth_token_file;
  std::string name = "kvlink-scheduler";
  // Shares an existing monitor (and its connection); null creates one.
  std::shared_ptr<health::Monitor> monitor;
};

// check_lookup's answer: pending, or final with the matched prefix length.
struct LookupStatus {
  bool ready = false;
  std::uint32_t matched_tokens = 0;
};

class SchedulerAdapter : public std::enable_shared_from_this<SchedulerAdapter> {
 public:
  // Validates the namespace (throws std::invalid_argument) and starts the
  // monitor (which connects at once; pings start when the gate opens).
  static std::shared_ptr<SchedulerAdapter> create(asio::any_io_executor ex, SchedulerConfig config);
  ~SchedulerAdapter();

  health::Monitor& monitor() { return *monitor_; }
  std::shared_ptr<health::Monitor> shared_monitor() { return monitor_; }
  asio::any_io_executor get_executor() const { return ex_; }
  const SchedulerConfig& config() const { return config_; }
  std::uint64_t namespace_id() const { return ns_; }
  // The engine is ready: opens the warmup gate.
  void ready() { monitor_->gate().open("engine ready"); }
  // Stops the monitor it owns (a shared one is left alone). Idempotent.
  void stop();

  // Starts a lookup of `tokens`' full chunks for `request_id`. A second
  // submit for the same id is ignored (completes at once, no error).
  // Cancelled (call.hpp), the LOOKUP call is cancelled too and the lookup
  // reports no hit.
  template <class CompletionToken>
  auto async_submit_lookup(std::string request_id, std::vector<store::Token> tokens, CompletionToken&& token) {
    return detail::initiate<Done>(
        ex_, token,
        [self = shared_from_this(), id = std::move(request_id), t = std::move(tokens)](
            detail::Callback<Done> cb, detail::CancelSignal cancel) mutable {
          self->start_submit(std::move(id), std::move(t), std::move(cb), std::move(cancel));
        });
  }
  Result<Done> submit_lookup(std::string request_id, std::vector<store::Token> tokens, Duration deadline = {});

  // Pending, or the matched tokens (cached after the first final answer).
  // Two-phase: polls QUERY_PREFETCH_STATUS. Unknown id: not_found.
  // Cancelled (call.hpp), the query is cancelled too and the lookup is
  // final with no hit (the server reports a job's result only once).
  template <class CompletionToken>
  auto async_check_lookup(std::string request_id, CompletionToken&& token) {
    return detail::initiate<LookupStatus>(
        ex_, token,
        [self = shared_from_this(), id = std::move(request_id)](detail::Callback<LookupStatus> cb,
                                                                detail::CancelSignal cancel) mutable {
          self->start_check(std::move(id), std::move(cb), std::move(cancel));
        });
  }
  Result<LookupStatus> check_lookup(std::string request_id, Duration deadline = {});

  // Releases the lookup's read locks on chunks [start_chunk, end_chunk)
  // (chunk indices into the request's prompt). One-way.
  template <class CompletionToken>
  auto async_free_lookup_locks(std::string request_id, std::uint32_t start_chunk, std::uint32_t end_chunk,
                               CompletionToken&& token) {
    return detail::initiate<Done>(ex_, token, [self = shared_from_this(), id = std::move(request_id), start_chunk,
                                               end_chunk](detail::Callback<Done> cb) mutable {
      self->start_free_locks(std::move(id), start_chunk, end_chunk, std::move(cb));
    });
  }
  Result<Done> free_lookup_locks(std::string request_id, std::uint32_t start_chunk, std::uint32_t end_chunk,
                                 Duration deadline = {});

  // END_SESSION (one-way), then drops the request's local state.
  template <class CompletionToken>
  auto async_end_session(std::string request_id, CompletionToken&& token) {
    return detail::initiate<Done>(ex_, token, [self = shared_from_this(), id = std::move(request_id)](
                                                  detail::Callback<Done> cb) mutable {
      self->start_end_session(std::move(id), std::move(cb));
    });
  }
  Result<Done> end_session(std::string request_id, Duration deadline = {});

  // REPORT_BLOCK_ALLOCATION (one-way, observability).
  template <class CompletionToken>
  auto async_report_block_allocation(std::string request_id, std::uint32_t allocated_blocks,
                                     std::uint32_t total_blocks, CompletionToken&& token) {
    return detail::initiate<Done>(ex_, token, [self = shared_from_this(), id = std::move(request_id),
                                               allocated_blocks, total_blocks](detail::Callback<Done> cb) mutable {
      self->start_report(std::move(id), allocated_blocks, total_blocks, std::move(cb));
    });
  }
  Result<Done> report_block_allocation(std::string request_id, std::uint32_t allocated_blocks,
                                       std::uint32_t total_blocks, Duration deadline = {});

  // Drops the request's local state (nothing is sent). Every submitted
  // request must end with end_session or cleanup, or its state stays.
  template <class CompletionToken>
  auto async_cleanup(std::string request_id, CompletionToken&& token) {
    return detail::initiate<Done>(ex_, token, [self = shared_from_this(), id = std::move(request_id)](
                                                  detail::Callback<Done> cb) mutable {
      self->start_cleanup(std::move(id), std::move(cb));
    });
  }
  Result<Done> cleanup(std::string request_id, Duration deadline = {});

  // For tests and stats, on the executor: requests with local state.
  std::size_t tracked_requests() const { return lookups_.size(); }

  // A copy of this adapter's counters, latencies and its link's health
  // (adapter/metrics.hpp; render() makes Prometheus text of it). From any
  // thread, the executor's included: it never waits for the executor.
  AdapterMetrics metrics() const;

 private:
  struct Lookup {
    std::uint64_t session_id = 0;
    std::vector<wire::ChunkHash> hashes;
    std::uint32_t chunk_size = 0;
    bool final = false;
    std::uint32_t matched_tokens = 0;
    std::uint64_t job_id = 0;
    bool job_known = false;
    bool query_in_flight = false;
  };
  SchedulerAdapter(asio::any_io_executor ex, SchedulerConfig config);

  // `cancel`: the caller's cancellation, forwarded to the call (async forms).
  void start_submit(std::string id, std::vector<store::Token> tokens, detail::Callback<Done> cb,
                    detail::CancelSignal cancel = nullptr);
  void start_check(std::string id, detail::Callback<LookupStatus> cb, detail::CancelSignal cancel = nullptr);
  void start_free_locks(std::string id, std::uint32_t start, std::uint32_t end, detail::Callback<Done> cb);
  void start_end_session(std::string id, detail::Callback<Done> cb);
  void start_report(std::string id, std::uint32_t allocated, std::uint32_t total, detail::Callback<Done> cb);
  void start_cleanup(std::string id, detail::Callback<Done> cb);
  // The connection to send on, or null when degraded/stopped/disconnected.
  std::shared_ptr<net::Connection> usable_connection() const;
  void note_error(std::error_code ec);
  Duration deadline_or_default(Duration d) const { return d == Duration{} ? config_.blocking_deadline : d; }
  // The blocking form of a call: waits at most `deadline` (the configured
  // one when zero) and reports a missed deadline to the monitor.
  template <class T, class Start>
  Result<T> wait_for(Duration deadline, Start start) {
    return detail::blocking<T>(deadline_or_default(deadline), std::move(start),
                               [m = monitor_] { m->report_deadline_missed(); });
  }

  asio::any_io_executor ex_;
  SchedulerConfig config_;
  std::uint64_t ns_ = 0;
  std::shared_ptr<health::Monitor> monitor_;
  bool owns_monitor_ = false;
  std::unordered_map<std::string, std::shared_ptr<Lookup>> lookups_;
  std::shared_ptr<detail::MetricsBox> metrics_ = std::make_shared<detail::MetricsBox>(AdapterRole::scheduler);
};

}  // namespace kvlink::adapter
