#include "kvlink/adapter/worker.hpp"

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/error.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <stdexcept>

#include "kvlink/log.hpp"
#include "monitor_options.hpp"

namespace kvlink::adapter {

namespace {
// Whether a transfer's error came from the server, as opposed to ending on
// the client's side while the server may still be copying: the deadline
// passed or the connection went away. (A server's own timed_out comes only
// after its fence, which the tracker then finds passed.)
bool answered(std::error_code ec) {
  return ec != errc::timed_out && ec != errc::connection_lost && ec != asio::error::operation_aborted;
}
}  // namespace

namespace {
constexpr auto as_tuple_awaitable = asio::experimental::as_tuple(asio::use_awaitable);
}  // namespace

namespace {
health::RegistrationLifecycle::Backoff registration_backoff(const health::Config& h) {
  // The reconnect backoff, capped like it at the heartbeat interval.
  return {h.reconnect_initial, h.reconnect_multiplier, std::min(h.reconnect_max, h.interval)};
}

// Whether a failed REGISTER says nothing about the registration itself, so
// that it is worth sending again.
bool transient(std::error_code ec) {
  return ec == errc::timed_out || ec == errc::connection_lost || ec == errc::not_connected ||
         ec == errc::shutting_down || ec == errc::limit_exceeded || ec == errc::unhealthy ||
         ec == asio::error::operation_aborted;
}
}  // namespace

WorkerAdapter::WorkerAdapter(asio::any_io_executor ex, WorkerConfig config)
    : ex_(std::move(ex)),
      config_(std::move(config)),
      lifecycle_(registration_backoff(config_.health)),
      registration_timer_(ex_),
      register_deadline_(ex_) {}

std::shared_ptr<WorkerAdapter> WorkerAdapter::create(asio::any_io_executor ex, WorkerConfig config) {
  store::NamespaceSpec spec{config.model, config.world_size, config.cache_salt};
  std::shared_ptr<WorkerAdapter> self(new WorkerAdapter(ex, std::move(config)));
  self->ns_ = store::namespace_id(spec);  // throws on an invalid namespace
  self->monitor_ = health::Monitor::create(ex, detail::monitor_options(self->config_, wire::Role::worker));
  // Set before start(): nothing runs on the monitor yet.
  self->monitor_->on_event([weak = std::weak_ptr<WorkerAdapter>(self)](const health::Event& e) {
    if (auto s = weak.lock()) s->on_monitor_event(e);
  });
  self->monitor_->start();
  return self;
}

// monitor_ is null when create() threw (a bad endpoint, namespace or token file).
WorkerAdapter::~WorkerAdapter() {
  if (monitor_) monitor_->stop();
}

std::shared_ptr<net::Connection> WorkerAdapter::usable_connection(std::error_code& why) const {
  const health::State s = monitor_->state();
  std::shared_ptr<net::Connection> conn;
  if (shutting_down_) why = errc::shutting_down;
  else if (s == health::State::degraded || s == health::State::stopped) why = errc::unhealthy;
  else if (monitor_->draining()) why = errc::shutting_down;  // the server takes no new transfers
  else if (!(conn = monitor_->connection())) why = errc::not_connected;
  return conn;
}

void WorkerAdapter::note_error(std::error_code ec) {
  if (ec == errc::timed_out) monitor_->report_deadline_missed();
}

AdapterMetrics WorkerAdapter::metrics() const {
  AdapterMetrics m = metrics_->copy();
  m.health = monitor_->metrics();
  return m;
}

void WorkerAdapter::count_load_errors(std::size_t before) {
  const std::size_t added = tracker_.load_errors().size() - before;
  if (added > 0) metrics_->update([added](AdapterMetrics& m) { m.load_error_blocks += added; });
}

// ---- registration -------------------------------------------------------------------

void WorkerAdapter::on_monitor_event(const health::Event& e) {
  const auto now = Clock::now();
  if (e.kind == health::Event::Kind::connected)
    act(lifecycle_.connection_up(now, e.hello.registered != 0, e.hello.draining != 0));
  else if (e.kind == health::Event::Kind::disconnected)
    act(lifecycle_.connection_lost(now));
}

void WorkerAdapter::act(health::RegistrationLifecycle::Action a, detail::Callback<Done> unregister_cb) {
  using Kind = health::RegistrationLifecycle::Action::Kind;
  // Published first: a caller woken by the completions below (another
  // thread, for a blocking register) must already see `registered`.
  metrics_->update([held = lifecycle_.held()](AdapterMetrics& m) { m.registered = held; });
  monitor_->set_registration_pending(lifecycle_.pending());
  switch (a.kind) {
    case Kind::none:
      break;
    case Kind::send_register:
      send_registration(a.attempt);
      break;
    case Kind::send_unregister:
      send_unregister(std::move(unregister_cb));
      unregister_cb = nullptr;
      break;
    case Kind::acknowledged:
      if (acked_since_request_) {
        ++reregistrations_;
        metrics_->update([](AdapterMetrics& m) { ++m.reregistrations; });
        log::info("{}: KV cache registered again with the server", config_.name);
      }
      acked_since_request_ = true;
      if (config_.gate_trigger == GateTrigger::register_ack) monitor_->gate().open("register acknowledged");
      complete_register_waiters({});
      break;
    case Kind::refused:
      log::error("{}: REGISTER_KV_CACHE refused, registration dropped (register again to retry): {}", config_.name,
                 a.reason);
      refusal_ = a.reason;
      metrics_->update([](AdapterMetrics& m) { ++m.registrations_refused; });
      monitor_->notice("registration refused by the server: " + a.reason);
      registration_.reset();
      complete_register_waiters(errc::bad_request);
      break;
  }
  if (unregister_cb) unregister_cb(make_error_code(errc::not_connected), Done{});
  arm_registration_timer();
}

void WorkerAdapter::arm_registration_timer() {
  const TimePoint at = lifecycle_.next_wakeup();
  if (at == TimePoint::max()) {
    registration_timer_.cancel();
    return;
  }
  registration_timer_.expires_at(at);  // cancels the previous wait
  registration_timer_.async_wait([weak = weak_from_this()](std::error_code ec) {
    if (ec) return;
    if (auto self = weak.lock()) self->act(self->lifecycle_.tick(Clock::now()));
  });
}

void WorkerAdapter::complete_register_waiters(std::error_code ec) {
  register_deadline_.cancel();
  auto waiters = std::move(register_waiters_);
  register_waiters_.clear();
  for (auto& cb : waiters) cb(ec, Done{});
}

void WorkerAdapter::send_registration(std::uint64_t attempt) {
  using Outcome = health::RegistrationLifecycle::Outcome;
  auto conn = monitor_->connection();
  if (!conn || !registration_) {
    last_register_error_ = errc::not_connected;
    return act(lifecycle_.answered(Clock::now(), attempt, Outcome::transient, "not connected"));
  }
  // The request is copied now: an unregister or shutdown while it is in
  // flight cannot pull it from under the send.
  send_register(conn, registration_->request, registration_->memfd, config_.call_timeout,
                [weak = weak_from_this(), conn, attempt](std::error_code ec, wire::Empty) {
                  auto self = weak.lock();
                  if (!self) return;
                  self->note_error(ec);
                  if (!self->lifecycle_.awaiting(attempt)) return;  // superseded
                  const Outcome outcome = !ec             ? Outcome::acknowledged
                                          : transient(ec) ? Outcome::transient
                                                          : Outcome::refused;
                  const std::string reason =
                      conn->last_error_message().empty() ? ec.message() : conn->last_error_message();
                  if (outcome == Outcome::transient) {
                    log::info("{}: REGISTER_KV_CACHE not acknowledged ({}); retrying", self->config_.name, reason);
                    self->last_register_error_ = ec;
                  }
                  self->act(self->lifecycle_.answered(Clock::now(), attempt, outcome, reason));
                });
}

void WorkerAdapter::send_unregister(detail::Callback<Done> cb) {
  auto conn = monitor_->connection();
  if (!conn) {
    if (cb) cb(make_error_code(errc::not_connected), Done{});
    return;
  }
  conn->async_call(wire::UnregisterKvCacheRequest{}, config_.call_timeout,
                   [self = shared_from_this(), cb = std::move(cb)](std::error_code ec, wire::Empty) {
                     self->note_error(ec);
                     if (ec) log::warn("{}: UNREGISTER_KV_CACHE failed: {}", self->config_.name, ec.message());
                     if (cb) cb(ec, Done{});
                   });
}

void WorkerAdapter::start_register(wire::KvLayout layout, UniqueFd memfd, detail::Callback<Done> cb) {
  cb = detail::timed(metrics_, Op::register_kv_caches, std::move(cb));
  asio::post(ex_, [self = shared_from_this(), l = std::move(layout), memfd = std::move(memfd), cb = std::move(cb)]() mutable {
    if (self->shutting_down_) return cb(make_error_code(errc::shutting_down), Done{});
    Registration r;
    r.request.ns = self->ns_;
    r.request.model = self->config_.model;
    r.request.world_size = self->config_.world_size;
    r.request.kv_rank = self->config_.kv_rank;
    r.request.layout = std::move(l);
    r.memfd = std::move(memfd);
    self->registration_ = std::move(r);
    self->acked_since_request_ = false;
    self->refusal_.clear();
    self->complete_register_waiters(errc::shutting_down);  // superseded by this one
    self->register_waiters_.push_back(std::move(cb));
    self->last_register_error_ = errc::not_connected;
    self->act(self->lifecycle_.register_requested(Clock::now()));
    const auto s = self->monitor_->state();
    if (!self->lifecycle_.held() && (s == health::State::degraded || s == health::State::stopped)) {
      // A link known to be down: say so at once instead of at the deadline.
      self->complete_register_waiters(errc::unhealthy);
      return;
    }
    // The caller hears the acknowledgement, a refusal, or at call_timeout
    // the latest reason it is not acknowledged yet; the lifecycle goes on.
    self->register_deadline_.expires_after(self->config_.call_timeout);
    self->register_deadline_.async_wait([weak = self->weak_from_this()](std::error_code ec) {
      if (ec) return;
      if (auto me = weak.lock()) me->complete_register_waiters(me->last_register_error_);
    });
  });
}

void WorkerAdapter::start_unregister(detail::Callback<Done> cb) {
  cb = detail::timed(metrics_, Op::unregister_kv_caches, std::move(cb));
  asio::post(ex_, [self = shared_from_this(), cb = std::move(cb)]() mutable {
    self->registration_.reset();
    self->complete_register_waiters(errc::shutting_down);
    self->act(self->lifecycle_.unregister_requested(Clock::now()), std::move(cb));
  });
}

// ---- transfers --------------------------------------------------------------------------

std::error_code WorkerAdapter::prepare(TransferSpec& spec) const {
  if (!registration_ || !lifecycle_.held()) return errc::not_registered;
  const std::uint32_t chunk = chunk_tokens();
  const std::uint32_t block = registration_->request.layout.block_size;
  if (chunk == 0) return errc::not_connected;
  if (block == 0 || chunk % block != 0) return errc::bad_request;
  if (spec.hashes.empty() && !spec.tokens.empty()) spec.hashes = store::chunk_hashes(spec.tokens, chunk);
  const std::size_t needed = spec.hashes.size() * (chunk / block);
  if (spec.block_ids.size() < needed) return errc::bad_request;
  spec.block_ids.resize(needed);  // blocks of the partial tail chunk are not transferred
  return {};
}

std::uint32_t WorkerAdapter::chunk_tokens() const {
  return config_.chunk_size ? config_.chunk_size : monitor_->server_chunk_size();
}

std::uint64_t WorkerAdapter::token_bytes() const {
  if (!registration_) return 0;
  const wire::KvLayout& l = registration_->request.layout;
  return std::uint64_t{l.num_layers} * l.num_planes * l.num_kv_heads * l.head_size * l.dtype_size;
}

void WorkerAdapter::start_store(TransferSpec spec, detail::Callback<wire::StoreResult> cb) {
  cb = detail::timed(metrics_, Op::store, std::move(cb));
  asio::post(ex_, [self = shared_from_this(), s = std::move(spec), cb = std::move(cb)]() mutable {
    self->do_store(std::move(s), std::move(cb));
  });
}

void WorkerAdapter::do_store(TransferSpec spec, detail::Callback<wire::StoreResult> cb) {
  if (config_.gate_trigger == GateTrigger::first_transfer) monitor_->gate().open("first store");
  std::error_code ec;
  auto conn = usable_connection(ec);
  if (conn) ec = prepare(spec);
  if (ec || spec.hashes.empty()) {
    tracker_.store_done(tracker_.store_started(spec.request_id));  // not sent: counts as finished
    return cb(ec, wire::StoreResult{});
  }
  const auto sent = sent_now();
  const auto ticket = tracker_.store_started(spec.request_id, sent);
  const std::uint64_t chunk_bytes = chunk_tokens() * token_bytes();
  wire::StoreRequest req{ns_, config_.kv_rank, std::move(spec.hashes), std::move(spec.block_ids),
                         std::move(spec.engine_event), wire::fence_to_wire(wire_fence(sent))};
  conn->async_call(std::move(req), config_.transfer_timeout,
                   [self = shared_from_this(), ticket, chunk_bytes, cb = std::move(cb)](std::error_code ec,
                                                                                       wire::StoreResult r) {
                     self->note_error(ec);
                     if (!ec)
                       self->metrics_->update([&](AdapterMetrics& m) {
                         m.stored_chunks += r.stored_chunks;
                         m.skipped_chunks += r.skipped_chunks;
                         m.stored_bytes += r.stored_chunks * chunk_bytes;
                       });
                     if (ec == errc::not_registered) self->act(self->lifecycle_.not_registered(Clock::now()));
                     if (answered(ec)) self->tracker_.store_done(ticket);
                     else self->tracker_.store_unanswered(ticket);
                     cb(ec, r);
                   });
}

void WorkerAdapter::start_retrieve(TransferSpec spec, detail::Callback<wire::RetrieveResult> cb) {
  cb = detail::timed(metrics_, Op::retrieve, std::move(cb));
  asio::post(ex_, [self = shared_from_this(), s = std::move(spec), cb = std::move(cb)]() mutable {
    self->do_retrieve(std::move(s), std::move(cb));
  });
}

void WorkerAdapter::do_retrieve(TransferSpec spec, detail::Callback<wire::RetrieveResult> cb) {
  if (config_.gate_trigger == GateTrigger::first_transfer) monitor_->gate().open("first retrieve");
  std::error_code ec;
  auto conn = usable_connection(ec);
  if (conn) ec = prepare(spec);
  // The blocks this retrieve fills: those after the skipped tokens.
  std::size_t first = 0;
  if (registration_ && registration_->request.layout.block_size)
    first = std::min<std::size_t>(spec.skip_first_n_tokens / registration_->request.layout.block_size,
                                  spec.block_ids.size());
  const std::span<const std::uint32_t> blocks(spec.block_ids.data() + first, spec.block_ids.size() - first);
  if (ec || spec.hashes.empty()) {
    // Not sent: on error its blocks failed to load.
    const std::size_t load_errors = tracker_.load_errors().size();
    tracker_.retrieve_done(tracker_.retrieve_started(spec.request_id, blocks), !ec);
    count_load_errors(load_errors);
    return cb(ec, wire::RetrieveResult{});
  }
  const auto sent = sent_now();
  const auto ticket = tracker_.retrieve_started(spec.request_id, blocks, sent);
  const std::uint64_t chunk = chunk_tokens();
  const std::uint64_t bytes_per_token = token_bytes();
  const std::uint64_t skip = spec.skip_first_n_tokens;
  wire::RetrieveRequest req{ns_,
                            config_.kv_rank,
                            std::move(spec.hashes),
                            std::move(spec.block_ids),
                            spec.skip_first_n_tokens,
                            std::move(spec.engine_event),
                            wire::fence_to_wire(wire_fence(sent)),
                            store::session_id_of(spec.request_id)};
  conn->async_call(std::move(req), config_.transfer_timeout,
                   [self = shared_from_this(), ticket, chunk, bytes_per_token, skip, cb = std::move(cb)](
                       std::error_code ec, wire::RetrieveResult r) {
                     self->note_error(ec);
                     if (!ec)
                       self->metrics_->update([&](AdapterMetrics& m) {
                         // The skipped prefix stays in the engine: not copied.
                         const std::uint64_t tokens = r.retrieved_chunks * chunk;
                         m.retrieved_chunks += r.retrieved_chunks;
                         m.retrieved_bytes += (tokens - std::min(skip, tokens)) * bytes_per_token;
                       });
                     if (ec == errc::not_registered) self->act(self->lifecycle_.not_registered(Clock::now()));
                     const std::size_t load_errors = self->tracker_.load_errors().size();
                     if (answered(ec)) self->tracker_.retrieve_done(ticket, !ec);
                     else self->tracker_.retrieve_unanswered(ticket);
                     self->count_load_errors(load_errors);
                     cb(ec, r);
                   });
}

void WorkerAdapter::start_batch(bool store, std::vector<TransferSpec> specs, detail::Callback<BatchResult> cb) {
  const TimePoint start = Clock::now();  // each spec's call is timed from the batch's start
  asio::post(ex_, [self = shared_from_this(), store, specs = std::move(specs), cb = std::move(cb), start]() mutable {
    struct State {
      BatchResult results;
      std::size_t left = 0;
      detail::Callback<BatchResult> cb;
      void done(std::size_t i, std::error_code ec) {
        results[i] = ec;
        if (--left > 0) return;
        std::error_code first;
        for (auto e : results)
          if (e) {
            first = e;
            break;
          }
        cb(first, std::move(results));
      }
    };
    auto st = std::make_shared<State>();
    st->results.resize(specs.size());
    st->left = specs.size();
    st->cb = std::move(cb);
    if (specs.empty()) return st->cb({}, BatchResult{});
    for (std::size_t i = 0; i < specs.size(); ++i) {
      if (store)
        self->do_store(std::move(specs[i]),
                       detail::timed<wire::StoreResult>(
                           self->metrics_, Op::store,
                           [st, i](std::error_code ec, wire::StoreResult) { st->done(i, ec); }, start));
      else
        self->do_retrieve(std::move(specs[i]),
                          detail::timed<wire::RetrieveResult>(
                              self->metrics_, Op::retrieve,
                              [st, i](std::error_code ec, wire::RetrieveResult) { st->done(i, ec); }, start));
    }
  });
}

// ---- bookkeeping and shutdown -----------------------------------------------------------

void WorkerAdapter::start_get_finished(std::vector<std::string> finished, detail::Callback<FinishedSets> cb) {
  cb = detail::timed(metrics_, Op::get_finished, std::move(cb));
  asio::post(ex_, [self = shared_from_this(), f = std::move(finished), cb = std::move(cb)]() mutable {
    const auto s = self->monitor_->state();
    const bool unhealthy = s == health::State::degraded || s == health::State::stopped;
    const std::uint64_t boot_id = s == health::State::healthy ? self->monitor_->boot_id() : 0;
    const std::size_t load_errors = self->tracker_.load_errors().size();
    auto r = self->tracker_.get_finished(f, unhealthy, {Clock::now(), boot_id});
    self->count_load_errors(load_errors);
    cb({}, FinishedSets{std::move(r.stores), std::move(r.retrieves)});
  });
}

void WorkerAdapter::start_take_load_errors(detail::Callback<std::vector<std::uint32_t>> cb) {
  cb = detail::timed(metrics_, Op::take_load_errors, std::move(cb));
  asio::post(ex_, [self = shared_from_this(), cb = std::move(cb)]() mutable { cb({}, self->tracker_.take_load_errors()); });
}

void WorkerAdapter::start_shutdown(detail::Callback<Done> cb) {
  cb = detail::timed(metrics_, Op::shutdown, std::move(cb));
  asio::post(ex_, [self = shared_from_this(), cb = std::move(cb)]() mutable {
    asio::co_spawn(self->ex_, do_shutdown(self, std::move(cb)), asio::detached);
  });
}

asio::awaitable<void> WorkerAdapter::do_shutdown(std::shared_ptr<WorkerAdapter> self, detail::Callback<Done> cb) {
  if (self->shutting_down_) co_return cb({}, Done{});
  // No re-registration and no new transfers from here on, and the heartbeat
  // stops first: nothing judges the link while it is taken down.
  self->shutting_down_ = true;
  const auto action = self->lifecycle_.shutdown_requested(Clock::now());
  self->registration_.reset();
  self->metrics_->update([](AdapterMetrics& m) { m.registered = false; });
  self->registration_timer_.cancel();
  self->complete_register_waiters(errc::shutting_down);  // also stops their deadline
  auto conn = self->monitor_->take_connection_and_stop();
  std::error_code ec;
  if (conn && action.kind == health::RegistrationLifecycle::Action::Kind::send_unregister) {
    auto [uec, reply] =
        co_await conn->async_call(wire::UnregisterKvCacheRequest{}, self->config_.call_timeout, as_tuple_awaitable);
    ec = uec;
    if (ec)
      log::warn("{}: UNREGISTER_KV_CACHE at shutdown failed ({}); the server frees the KV cache when it reaps "
                "this instance",
                self->config_.name, conn->last_error_message().empty() ? ec.message() : conn->last_error_message());
  }
  if (conn) conn->close();
  cb(ec, Done{});
}

// ---- blocking forms ------------------------------------------------------------------------

Result<Done> WorkerAdapter::register_kv_caches(wire::KvLayout layout, int memfd, Duration deadline) {
  // A refusal's reason, read on the executor when it completes (before the
  // result is handed over): the Error then says what the server refused.
  auto refusal = std::make_shared<std::string>();
  auto r = wait_for<Done>(deadline, [&](detail::Callback<Done> cb) {
    start_register(std::move(layout), duplicate_fd(memfd),
                   [self = shared_from_this(), refusal, cb = std::move(cb)](std::error_code ec, Done d) {
                     if (ec == errc::bad_request) *refusal = self->refusal_;
                     cb(ec, d);
                   });
  });
  if (!r && r.error() == errc::bad_request && !refusal->empty())
    return Error(errc::bad_request, "REGISTER_KV_CACHE refused by the server: " + *refusal);
  return r;
}
Result<Done> WorkerAdapter::unregister_kv_caches(Duration deadline) {
  return wait_for<Done>(deadline, [&](detail::Callback<Done> cb) {
    start_unregister(std::move(cb));
  });
}
Result<wire::StoreResult> WorkerAdapter::submit_store(TransferSpec spec, Duration deadline) {
  return wait_for<wire::StoreResult>(deadline, [&](detail::Callback<wire::StoreResult> cb) {
    start_store(std::move(spec), std::move(cb));
  });
}
Result<wire::RetrieveResult> WorkerAdapter::submit_retrieve(TransferSpec spec, Duration deadline) {
  return wait_for<wire::RetrieveResult>(deadline, [&](detail::Callback<wire::RetrieveResult> cb) {
    start_retrieve(std::move(spec), std::move(cb));
  });
}
// A batch that ran returns its per-spec codes as the value, failed specs
// included: a Result cannot hold both a value and an error, and the codes
// say more than the first error the async form adds. Only a batch that did
// not finish (its deadline passed) is an error.
Result<WorkerAdapter::BatchResult> WorkerAdapter::submit_stores(std::vector<TransferSpec> specs, Duration deadline) {
  return wait_for<BatchResult>(deadline, [&](detail::Callback<BatchResult> cb) {
    start_batch(true, std::move(specs),
                [cb = std::move(cb)](std::error_code, BatchResult r) { cb({}, std::move(r)); });
  });
}
Result<WorkerAdapter::BatchResult> WorkerAdapter::submit_retrieves(std::vector<TransferSpec> specs,
                                                                   Duration deadline) {
  return wait_for<BatchResult>(deadline, [&](detail::Callback<BatchResult> cb) {
    start_batch(false, std::move(specs),
                [cb = std::move(cb)](std::error_code, BatchResult r) { cb({}, std::move(r)); });
  });
}
Result<FinishedSets> WorkerAdapter::get_finished(std::vector<std::string> engine_finished, Duration deadline) {
  return wait_for<FinishedSets>(deadline, [&](detail::Callback<FinishedSets> cb) {
    start_get_finished(std::move(engine_finished), std::move(cb));
  });
}
Result<std::vector<std::uint32_t>> WorkerAdapter::take_load_errors(Duration deadline) {
  return wait_for<std::vector<std::uint32_t>>(deadline, [&](detail::Callback<std::vector<std::uint32_t>> cb) {
    start_take_load_errors(std::move(cb));
  });
}
Result<Done> WorkerAdapter::shutdown(Duration deadline) {
  return wait_for<Done>(deadline, [&](detail::Callback<Done> cb) {
    start_shutdown(std::move(cb));
  });
}

}  // namespace kvlink::adapter
