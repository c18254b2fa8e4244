// The worker side of the engine: KV-cache registration, stores, retrieves
// and get_finished bookkeeping (SPEC sections 6 and 7).
//
// Same calling conventions as the scheduler adapter (adapter/scheduler.hpp):
// async_xxx(args..., token) completing with (error_code, value) and a
// blocking form with a deadline; callable from any thread; all state lives
// on the adapter's single-threaded executor.
//
// Degraded mode: stores are not sent (they count as finished by the server);
// retrieves are not sent and their blocks become load errors; the next
// get_finished drains every pending transfer (GetFinishedTracker).
// Registration follows health::RegistrationLifecycle: the adapter keeps what
// the engine registered and sends it to every server the link reaches that
// does not hold it (after a restart, a reap, a not_registered answer, or
// when the engine started before the server), retrying with backoff; the
// link is not called healthy before the server holds it.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <asio/steady_timer.hpp>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kvlink/adapter/call.hpp"
#include "kvlink/adapter/metrics.hpp"
#include "kvlink/unique_fd.hpp"
#include "kvlink/adapter/finished_tracker.hpp"
#include "kvlink/health/monitor.hpp"
#include "kvlink/health/registration.hpp"
#include "kvlink/store/keys.hpp"

namespace kvlink::adapter {

// What opens the warmup gate automatically (ready() always does).
enum class GateTrigger : std::uint8_t {
  register_ack,    // REGISTER_KV_CACHE acknowledged
  first_transfer,  // the first store or retrieve
  explicit_ready,  // only ready() (or the monitor's max_warmup)
};

struct WorkerConfig {
  std::string endpoint;
  std::string model;
  std::uint32_t world_size = 1;
  std::uint32_t kv_rank = 0;
  std::string cache_salt;
  // Tokens per chunk; 0 takes the server's from HELLO.
  std::uint32_t chunk_size = 0;
  GateTrigger gate_trigger = GateTrigger::register_ack;
  // Deadline of register/unregister calls.
  Duration call_timeout = std::chrono::seconds(5);
  // Deadline of each STORE/RETRIEVE (they complete when the copy is done).
  // It also fences the copy: the server touches none of the request's
  // blocks after it (less a small margin), and a transfer that ended
  // without the server's answer (lost connection, deadline) is reported by
  // get_finished only once its deadline passed or the server restarted, so
  // the engine never reuses blocks a stopped server may still copy.
  Duration transfer_timeout = std::chrono::seconds(5);
  // Default deadline of the blocking calls.
  Duration blocking_deadline = std::chrono::seconds(10);
  health::Config health;
  // HELLO's shared secret; empty: read from auth_token_file if set, else
  // from $KVLINK_AUTH_TOKEN (none if unset).
  std::string auth_token;
  std::string auth_token_file;
  std::string name = "kvlink-worker";
};

// One store or retrieve of one engine request. Give chunk hashes, or token
// ids (their full chunks are hashed here). block_ids lists, chunk after
// chunk, the engine blocks holding each chunk; blocks past the last full
// chunk are ignored.
struct TransferSpec {
  std::string request_id;
  std::vector<wire::ChunkHash> hashes;
  std::vector<store::Token> tokens;
  std::vector<std::uint32_t> block_ids;
  std::uint32_t skip_first_n_tokens = 0;  // retrieve only
  // CUDA: the handle of the interprocess event the engine recorded on its
  // stream right before this call (transfer::cuda::EngineEvent::handle());
  // the server's copy waits on it. Empty on CPU.
  wire::Bytes engine_event;
};

struct FinishedSets {
  std::vector<std::string> stores;
  std::vector<std::string> retrieves;
};

class WorkerAdapter : public std::enable_shared_from_this<WorkerAdapter> {
 public:
  static std::shared_ptr<WorkerAdapter> create(asio::any_io_executor ex, WorkerConfig config);
  ~WorkerAdapter();

  health::Monitor& monitor() { return *monitor_; }
  std::shared_ptr<health::Monitor> shared_monitor() { return monitor_; }
  asio::any_io_executor get_executor() const { return ex_; }
  const WorkerConfig& config() const { return config_; }
  std::uint64_t namespace_id() const { return ns_; }
  void ready() { monitor_->gate().open("engine ready"); }

  // Registers the engine's KV memory: a cpu_memfd layout with its memfd, or
  // a cuda_ipc layout (transfer::cuda::export_kv_cache) with none. `memfd` is
  // duplicated at once: the adapter keeps its own copy (a server restart
  // needs it again), so the caller may close theirs when this returns.
  // Completes when a server acknowledged it, or with an error: refused (the
  // registration is dropped), unhealthy at once on a link known to be down,
  // or at call_timeout the latest reason it is not acknowledged yet
  // (not_connected, timed_out). Unless refused, the registration is kept and
  // sent (retried with backoff) until a server acknowledges it, then again to
  // any server that loses it. Only a refusal (bad layout; the error names
  // it) drops it, with one error log line and a notice event; registering
  // again tries anew.
  template <class CompletionToken>
  auto async_register_kv_caches(wire::KvLayout layout, int memfd, CompletionToken&& token) {
    return detail::initiate<Done>(ex_, token, [self = shared_from_this(), l = std::move(layout),
                                               fd = duplicate_fd(memfd)](detail::Callback<Done> cb) mutable {
      self->start_register(std::move(l), std::move(fd), std::move(cb));
    });
  }
  Result<Done> register_kv_caches(wire::KvLayout layout, int memfd = -1, Duration deadline = {});

  template <class CompletionToken>
  auto async_unregister_kv_caches(CompletionToken&& token) {
    return detail::initiate<Done>(ex_, token, [self = shared_from_this()](detail::Callback<Done> cb) mutable {
      self->start_unregister(std::move(cb));
    });
  }
  Result<Done> unregister_kv_caches(Duration deadline = {});

  // STORE; completes when the server finished (or refused) it.
  template <class CompletionToken>
  auto async_submit_store(TransferSpec spec, CompletionToken&& token) {
    return detail::initiate<wire::StoreResult>(ex_, token, [self = shared_from_this(), s = std::move(spec)](
                                                               detail::Callback<wire::StoreResult> cb) mutable {
      self->start_store(std::move(s), std::move(cb));
    });
  }
  Result<wire::StoreResult> submit_store(TransferSpec spec, Duration deadline = {});

  // RETRIEVE; on failure its blocks become load errors.
  template <class CompletionToken>
  auto async_submit_retrieve(TransferSpec spec, CompletionToken&& token) {
    return detail::initiate<wire::RetrieveResult>(ex_, token, [self = shared_from_this(), s = std::move(spec)](
                                                                  detail::Callback<wire::RetrieveResult> cb) mutable {
      self->start_retrieve(std::move(s), std::move(cb));
    });
  }
  Result<wire::RetrieveResult> submit_retrieve(TransferSpec spec, Duration deadline = {});

  // Batched: every spec is submitted at once; completes when all are done
  // with the first error (if any) and one error code per spec. The blocking
  // forms return the per-spec codes as their value even when some failed
  // (check each); their Result is an error only when the deadline passed.
  using BatchResult = std::vector<std::error_code>;
  template <class CompletionToken>
  auto async_submit_stores(std::vector<TransferSpec> specs, CompletionToken&& token) {
    return detail::initiate<BatchResult>(ex_, token, [self = shared_from_this(), s = std::move(specs)](
                                                         detail::Callback<BatchResult> cb) mutable {
      self->start_batch(true, std::move(s), std::move(cb));
    });
  }
  Result<BatchResult> submit_stores(std::vector<TransferSpec> specs, Duration deadline = {});
  template <class CompletionToken>
  auto async_submit_retrieves(std::vector<TransferSpec> specs, CompletionToken&& token) {
    return detail::initiate<BatchResult>(ex_, token, [self = shared_from_this(), s = std::move(specs)](
                                                         detail::Callback<BatchResult> cb) mutable {
      self->start_batch(false, std::move(s), std::move(cb));
    });
  }
  Result<BatchResult> submit_retrieves(std::vector<TransferSpec> specs, Duration deadline = {});

  // (finished stores, finished retrieves) given the engine's finished ids.
  template <class CompletionToken>
  auto async_get_finished(std::vector<std::string> engine_finished, CompletionToken&& token) {
    return detail::initiate<FinishedSets>(ex_, token, [self = shared_from_this(), f = std::move(engine_finished)](
                                                          detail::Callback<FinishedSets> cb) mutable {
      self->start_get_finished(std::move(f), std::move(cb));
    });
  }
  Result<FinishedSets> get_finished(std::vector<std::string> engine_finished, Duration deadline = {});

  // Block ids whose load failed since the last call (sorted; cleared).
  template <class CompletionToken>
  auto async_take_load_errors(CompletionToken&& token) {
    using V = std::vector<std::uint32_t>;
    return detail::initiate<V>(ex_, token, [self = shared_from_this()](detail::Callback<V> cb) mutable {
      self->start_take_load_errors(std::move(cb));
    });
  }
  Result<std::vector<std::uint32_t>> take_load_errors(Duration deadline = {});

  // Stops the heartbeat, re-registration and new transfers, then sends
  // UNREGISTER (bounded by call_timeout; a failure is logged as a warning)
  // and closes the connection. Completes within call_timeout.
  template <class CompletionToken>
  auto async_shutdown(CompletionToken&& token) {
    return detail::initiate<Done>(ex_, token, [self = shared_from_this()](detail::Callback<Done> cb) mutable {
      self->start_shutdown(std::move(cb));
    });
  }
  Result<Done> shutdown(Duration deadline = {});

  // On the executor: acknowledged registrations sent again without the
  // engine asking (to a server that had lost it).
  std::uint64_t reregistrations() const { return reregistrations_; }
  // On the executor: where the registration stands, and the server's reason
  // for the latest refusal ("" if none since the last register call).
  health::RegistrationLifecycle::Phase registration_phase() const { return lifecycle_.phase(); }
  const std::string& registration_refusal() const { return refusal_; }

  // A copy of this adapter's counters, latencies, bytes moved, load errors
  // and its link's health (adapter/metrics.hpp; render() makes Prometheus
  // text of it). From any thread, the executor's included: it never waits
  // for the executor.
  AdapterMetrics metrics() const;

 private:
  struct Registration {
    wire::RegisterKvCacheRequest request;
    UniqueFd memfd;  // the adapter's own duplicate: re-registration needs it after the caller's is closed
  };
  WorkerAdapter(asio::any_io_executor ex, WorkerConfig config);

  // Sends REGISTER_KV_CACHE with the memfd attached (SCM_RIGHTS), or
  // without one (cuda_ipc: the handles are in the layout).
  template <class CompletionToken>
  static auto send_register(const std::shared_ptr<net::Connection>& conn, wire::RegisterKvCacheRequest req,
                            const UniqueFd& fd, Duration timeout, CompletionToken&& token) {
    if (!fd) return conn->async_call(std::move(req), timeout, std::forward<CompletionToken>(token));
    return conn->async_call_with_fd(std::move(req), fd.get(), timeout, std::forward<CompletionToken>(token));
  }
  static asio::awaitable<void> do_shutdown(std::shared_ptr<WorkerAdapter> self, detail::Callback<Done> cb);

  // Carries out what the registration lifecycle decided; `unregister_cb`
  // gets the answer of an UNREGISTER the engine asked for.
  void act(health::RegistrationLifecycle::Action a, detail::Callback<Done> unregister_cb = {});
  void on_monitor_event(const health::Event& e);
  void send_registration(std::uint64_t attempt);
  void send_unregister(detail::Callback<Done> cb);
  void complete_register_waiters(std::error_code ec);
  void arm_registration_timer();

  void start_register(wire::KvLayout layout, UniqueFd memfd, detail::Callback<Done> cb);
  void start_unregister(detail::Callback<Done> cb);
  void start_store(TransferSpec spec, detail::Callback<wire::StoreResult> cb);
  void start_retrieve(TransferSpec spec, detail::Callback<wire::RetrieveResult> cb);
  void start_batch(bool store, std::vector<TransferSpec> specs, detail::Callback<BatchResult> cb);
  void start_get_finished(std::vector<std::string> finished, detail::Callback<FinishedSets> cb);
  void start_take_load_errors(detail::Callback<std::vector<std::uint32_t>> cb);
  void start_shutdown(detail::Callback<Done> cb);

  void do_store(TransferSpec spec, detail::Callback<wire::StoreResult> cb);
  void do_retrieve(TransferSpec spec, detail::Callback<wire::RetrieveResult> cb);
  // Fills spec.hashes from tokens and trims block ids; "" or what is wrong.
  std::error_code prepare(TransferSpec& spec) const;
  // Tokens per chunk (0 before the server said), and bytes of one token's
  // KV over every layer and plane of the registered layout (0 if none).
  std::uint32_t chunk_tokens() const;
  std::uint64_t token_bytes() const;
  // Counts the blocks a tracker call added to the load-error set, given its
  // size before the call.
  void count_load_errors(std::size_t before);
  // The connection transfers may use now, or null with why not.
  std::shared_ptr<net::Connection> usable_connection(std::error_code& why) const;
  void note_error(std::error_code ec);
  Duration deadline_or_default(Duration d) const { return d == Duration{} ? config_.blocking_deadline : d; }
  // The blocking form of a call: waits at most `deadline` (the configured
  // one when zero) and reports a missed deadline to the monitor.
  template <class T, class Start>
  Result<T> wait_for(Duration deadline, Start start) {
    return detail::blocking<T>(deadline_or_default(deadline), std::move(start),
                               [m = monitor_] { m->report_deadline_missed(); });
  }
  // A transfer sent now: the tracker's fence is the call's deadline; the
  // server's (wire_fence) comes a margin earlier, so a copy step already
  // under way at the server's fence ends before the engine may reuse blocks.
  GetFinishedTracker::Sent sent_now() const {
    return {Clock::now() + config_.transfer_timeout, monitor_->boot_id()};
  }
  TimePoint wire_fence(const GetFinishedTracker::Sent& s) const {
    return s.fence - std::min<Duration>(config_.transfer_timeout / 10, std::chrono::milliseconds(250));
  }


  asio::any_io_executor ex_;
  WorkerConfig config_;
  std::uint64_t ns_ = 0;
  std::shared_ptr<health::Monitor> monitor_;
  std::optional<Registration> registration_;  // what the engine registered, to send to any server
  health::RegistrationLifecycle lifecycle_;
  asio::steady_timer registration_timer_;    // the lifecycle's next retry
  std::vector<detail::Callback<Done>> register_waiters_;  // register calls not answered yet
  asio::steady_timer register_deadline_;                  // ...answered by call_timeout at the latest
  std::error_code last_register_error_;
  bool acked_since_request_ = false;
  std::string refusal_;
  bool shutting_down_ = false;
  std::uint64_t reregistrations_ = 0;
  GetFinishedTracker tracker_;
  std::shared_ptr<detail::MetricsBox> metrics_ = std::make_shared<detail::MetricsBox>(AdapterRole::worker);
};

}  // namespace kvlink::adapter
