// The adapters' metrics: what an engine's operator puts on a dashboard. Each
// adapter counts on its io thread and hands out copies from any thread
// (SchedulerAdapter::metrics(), WorkerAdapter::metrics()); render() turns a
// copy into Prometheus text samples (metrics::Exposition) that a host
// appends to its own /metrics. docs/adapters.md#metrics lists every metric.
//
// Calls are counted once per call whatever form it was made in (async with
// any token, or blocking), when the adapter completes it on its io thread:
// latency from the moment the call was made (on the caller's thread) to
// that completion. A call the engine cancelled, or whose blocking deadline
// passed, is counted with the outcome the operation itself had, which the
// caller no longer hears (the monitor's deadlines_missed counts the latter).
// A batch (submit_stores, submit_retrieves) counts as one store or retrieve
// per spec, each timed from the batch's start.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include "kvlink/adapter/call.hpp"
#include "kvlink/clock.hpp"
#include "kvlink/health/monitor.hpp"
#include "kvlink/metrics/exposition.hpp"
#include "kvlink/metrics/histogram.hpp"

namespace kvlink::adapter {

// Which adapter: the `role` label.
enum class AdapterRole : std::uint8_t { scheduler, worker };
const char* role_name(AdapterRole r);

// The timed operations: the `op` label. The first six are the scheduler's,
// the others the worker's (store and retrieve include the specs of batches).
enum class Op : std::uint8_t {
  lookup,                   // submit_lookup
  check_lookup,             // check_lookup
  free_lookup_locks,        // free_lookup_locks
  end_session,              // end_session
  report_block_allocation,  // report_block_allocation
  cleanup,                  // cleanup
  register_kv_caches,       // register_kv_caches
  unregister_kv_caches,     // unregister_kv_caches
  store,                    // submit_store, each spec of submit_stores
  retrieve,                 // submit_retrieve, each spec of submit_retrieves
  get_finished,             // get_finished
  take_load_errors,         // take_load_errors
  shutdown,                 // shutdown
};
inline constexpr std::size_t op_count = 13;
const char* op_name(Op op);
// The operations of one adapter, in the order above.
std::span<const Op> ops_of(AdapterRole r);

// The `error` label of a failed call: kvlink's errc names ("timed_out",
// "unhealthy", ...), "operation_aborted", or "<category>_<value>".
std::string error_name(std::error_code ec);

// One operation's calls.
struct CallMetrics {
  std::uint64_t calls = 0;   // completed, with or without an error
  std::uint64_t failed = 0;  // completed with an error
  // Not sent because the link was degraded or stopped: completed with
  // `unhealthy`, or (check_lookup) answered ready with 0 tokens.
  std::uint64_t degraded = 0;
  std::map<std::string, std::uint64_t, std::less<>> errors;  // failed calls by error_name()
  metrics::Histogram latency;                                // call made -> completed
};

// A copy of one adapter's metrics: plain data.
struct AdapterMetrics {
  AdapterRole role = AdapterRole::worker;
  // The link's health (the adapter's monitor; a scheduler sharing the
  // worker's monitor reports the same link).
  health::MonitorMetrics health;
  std::array<CallMetrics, op_count> calls;  // by Op; only ops_of(role) are used
  const CallMetrics& call(Op op) const { return calls[static_cast<std::size_t>(op)]; }
  CallMetrics& call(Op op) { return calls[static_cast<std::size_t>(op)]; }

  // Worker. Bytes are those copied between the engine's KV blocks and the
  // server: chunks stored (not the skipped ones) and tokens retrieved (not
  // the skipped prefix), over every layer and plane.
  std::uint64_t stored_bytes = 0;
  std::uint64_t retrieved_bytes = 0;
  std::uint64_t stored_chunks = 0;
  std::uint64_t skipped_chunks = 0;  // a store's chunks the server already held (or had no room for)
  std::uint64_t retrieved_chunks = 0;
  std::uint64_t load_errors = 0;        // retrieves that failed (each one's blocks failed to load)
  std::uint64_t load_error_blocks = 0;  // blocks added to the load-error set (take_load_errors)
  bool registered = false;              // a server holds this worker's KV-cache registration
  std::uint64_t reregistrations = 0;    // sent again without the engine asking (a server had lost it)
  std::uint64_t registrations_refused = 0;

  // Scheduler.
  std::uint64_t lookup_tokens = 0;      // tokens of the full chunks sent in lookups
  std::uint64_t lookup_hit_tokens = 0;  // matched tokens of the lookups the server answered
};

// Adds `m`'s samples to `out` as kvlink_engine_* families, labelled
// role=..., then `labels` (the host's: instance, model, rank, ...), then
// op/state/error where the family has them. Render every adapter of a
// process into one Exposition: each family is written once with all their
// samples (two texts concatenated would repeat the families, which
// Prometheus rejects).
void render(const AdapterMetrics& m, metrics::Exposition& out, const metrics::Labels& labels = {});
// One adapter's Prometheus text (render() into a fresh Exposition).
std::string prometheus_text(const AdapterMetrics& m, const metrics::Labels& labels = {});

namespace detail {

// Where an adapter keeps its counts. The io thread writes them under the
// mutex as calls complete; metrics() copies them under it from any thread.
// A mutex, not post-and-wait: a scrape must not wait behind the io thread's
// work, nor deadlock when the host serves /metrics on that thread (a
// coroutine engine), and the io thread's cost is one uncontended lock per
// completion. Shared by the adapter and its pending callbacks (never the
// adapter itself, which would make a cycle through the callbacks it holds).
class MetricsBox {
 public:
  explicit MetricsBox(AdapterRole role) { data_.role = role; }
  AdapterMetrics copy() const {
    std::lock_guard lock(mutex_);
    return data_;
  }
  template <class F>
  void update(F&& f) {
    std::lock_guard lock(mutex_);
    f(data_);
  }
  // One call of `op` made at `start` completed now with `ec`.
  void completed(Op op, TimePoint start, std::error_code ec);

 private:
  mutable std::mutex mutex_;
  AdapterMetrics data_;
};

// `cb`, counting its call in `box` when it completes.
template <class T>
Callback<T> timed(const std::shared_ptr<MetricsBox>& box, Op op, Callback<T> cb, TimePoint start = Clock::now()) {
  return [box, op, start, cb = std::move(cb)](std::error_code ec, T v) {
    box->completed(op, start, ec);
    cb(ec, std::move(v));
  };
}

}  // namespace detail

}  // namespace kvlink::adapter
