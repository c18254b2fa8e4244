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
#include "kvlink/net/auth_token.hpp"

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

WorkerAdapter::WorkerAdapter(asio::any_io_executor ex, WorkerConfig config)
    : ex_(std::move(ex)), config_(std::move(config)) {}

std::shared_ptr<WorkerAdapter> WorkerAdapter::create(asio::any_io_executor ex, WorkerConfig config) {
  store::NamespaceSpec spec{config.model, config.world_size, config.cache_salt};
  std::shared_ptr<WorkerAdapter> self(new WorkerAdapter(ex, std::move(config)));
  self->ns_ = store::namespace_id(spec);  // throws on an invalid namespace
  health::MonitorOptions o;
  o.health = self->config_.health;
  std::string error;
  if (!net::parse_endpoint(self->config_.endpoint, o.endpoint, error)) throw std::invalid_argument(error);
  o.hello.role = wire::Role::worker;
  if (auto why = net::resolve_auth_token(self->config_.auth_token, self->config_.auth_token_file, o.hello.auth_token);
      !why.empty())
    throw std::invalid_argument(why);
  o.hello.client_name = self->config_.name;
  o.name = self->config_.name;
  o.reregister = [weak = std::weak_ptr<WorkerAdapter>(self)](std::shared_ptr<net::Connection> conn) {
    return reregister(weak, std::move(conn));
  };
  self->monitor_ = health::Monitor::create(ex, std::move(o));
  // Set before start(): nothing runs on the monitor yet.
  self->monitor_->on_event([weak = std::weak_ptr<WorkerAdapter>(self)](const health::Event& e) {
    if (e.kind != health::Event::Kind::transition || e.transition.to != health::State::healthy) return;
    auto s = weak.lock();
    if (s && s->registration_ && !s->registration_acked_ && !s->registration_in_flight_ && !s->shutting_down_)
      asio::co_spawn(s->ex_, resend_registration(s), asio::detached);
  });
  self->monitor_->start();
  return self;
}

// monitor_ is null when create() threw (a bad endpoint, namespace or token file).
WorkerAdapter::~WorkerAdapter() {
  if (monitor_) monitor_->stop();
}

std::shared_ptr<net::Connection> WorkerAdapter::usable_connection() const {
  const health::State s = monitor_->state();
  if (s == health::State::degraded || s == health::State::stopped) return nullptr;
  return monitor_->connection();
}

void WorkerAdapter::note_error(std::error_code ec) {
  if (ec == errc::timed_out) monitor_->report_deadline_missed();
}

// ---- registration -------------------------------------------------------------------

asio::awaitable<std::error_code> WorkerAdapter::reregister(std::weak_ptr<WorkerAdapter> weak,
                                                           std::shared_ptr<net::Connection> conn) {
  auto self = weak.lock();
  if (!self || self->shutting_down_ || !self->registration_) co_return std::error_code{};
  auto [ec, reply] = co_await send_register(conn, self->registration_->request, self->registration_->memfd,
                                            self->config_.call_timeout, as_tuple_awaitable);
  if (!ec) {
    ++self->reregistrations_;
    self->registration_acked_ = true;
  }
  co_return ec;
}

// A registration the server never acknowledged, sent again now that the
// link is healthy (the monitor's hook covers only registrations it lost).
asio::awaitable<void> WorkerAdapter::resend_registration(std::shared_ptr<WorkerAdapter> self) {
  auto conn = self->usable_connection();
  if (!conn || !self->registration_) co_return;
  self->registration_in_flight_ = true;
  auto [ec, reply] = co_await send_register(conn, self->registration_->request, self->registration_->memfd,
                                            self->config_.call_timeout, as_tuple_awaitable);
  self->registration_in_flight_ = false;
  self->note_error(ec);
  if (!self->registration_) co_return;  // unregistered meanwhile
  if (!ec) {
    self->registration_acked_ = true;
    log::info("{}: KV cache registered after the link became healthy", self->config_.name);
    if (self->config_.gate_trigger == GateTrigger::register_ack) self->monitor_->gate().open("register acknowledged");
  } else if (ec != errc::timed_out && ec != errc::connection_lost) {
    log::warn("{}: REGISTER_KV_CACHE refused: {}", self->config_.name, conn->last_error_message());
    self->registration_.reset();
  }
}

void WorkerAdapter::start_register(wire::KvLayout layout, UniqueFd memfd, detail::Callback<Done> cb) {
  asio::post(ex_, [self = shared_from_this(), l = std::move(layout), memfd = std::move(memfd), cb = std::move(cb)]() mutable {
    if (self->shutting_down_) return cb(make_error_code(errc::shutting_down), Done{});
    Registration r;
    r.request.ns = self->ns_;
    r.request.model = self->config_.model;
    r.request.world_size = self->config_.world_size;
    r.request.kv_rank = self->config_.kv_rank;
    r.request.layout = std::move(l);
    r.memfd = std::move(memfd);
    // Kept before sending: a server restart from now on re-sends it.
    self->registration_ = std::move(r);
    self->registration_acked_ = false;
    asio::co_spawn(self->ex_, do_register(self, std::move(cb)), asio::detached);
  });
}

asio::awaitable<void> WorkerAdapter::do_register(std::shared_ptr<WorkerAdapter> self, detail::Callback<Done> cb) {
  // The monitor connects at once; wait for it (bounded) if it has not yet.
  const auto until = Clock::now() + self->config_.call_timeout;
  std::shared_ptr<net::Connection> conn;
  asio::steady_timer timer(self->ex_);
  while (!(conn = self->usable_connection()) && Clock::now() < until) {
    const auto s = self->monitor_->state();
    if (s == health::State::degraded || s == health::State::stopped) break;
    timer.expires_after(std::chrono::milliseconds(5));
    co_await timer.async_wait(as_tuple_awaitable);
  }
  if (!conn) {
    const bool degraded = self->monitor_->state() == health::State::degraded;
    cb(make_error_code(degraded ? errc::unhealthy : errc::not_connected), Done{});
    co_return;
  }
  self->registration_in_flight_ = true;
  auto [ec, reply] = co_await send_register(conn, self->registration_->request, self->registration_->memfd,
                                            self->config_.call_timeout, as_tuple_awaitable);
  self->registration_in_flight_ = false;
  self->note_error(ec);
  if (!ec) self->registration_acked_ = true;
  if (ec && ec != errc::timed_out && ec != errc::connection_lost) {
    log::warn("{}: REGISTER_KV_CACHE refused: {}", self->config_.name, conn->last_error_message());
    self->registration_.reset();  // refused: nothing to re-send
  }
  if (!ec && self->config_.gate_trigger == GateTrigger::register_ack)
    self->monitor_->gate().open("register acknowledged");
  cb(ec, Done{});
}

void WorkerAdapter::start_unregister(detail::Callback<Done> cb) {
  asio::post(ex_, [self = shared_from_this(), cb = std::move(cb)]() mutable {
    self->registration_.reset();
    auto conn = self->usable_connection();
    if (!conn) return cb(make_error_code(errc::unhealthy), Done{});
    conn->async_call(wire::UnregisterKvCacheRequest{}, self->config_.call_timeout,
                     [self, cb = std::move(cb)](std::error_code ec, wire::Empty) {
                       self->note_error(ec);
                       cb(ec, Done{});
                     });
  });
}

// ---- transfers --------------------------------------------------------------------------

std::error_code WorkerAdapter::prepare(TransferSpec& spec) const {
  if (!registration_) return errc::not_registered;
  const std::uint32_t chunk = config_.chunk_size ? config_.chunk_size : monitor_->server_chunk_size();
  const std::uint32_t block = registration_->request.layout.block_size;
  if (chunk == 0) return errc::not_connected;
  if (block == 0 || chunk % block != 0) return errc::bad_request;
  if (spec.hashes.empty() && !spec.tokens.empty()) spec.hashes = store::chunk_hashes(spec.tokens, chunk);
  const std::size_t needed = spec.hashes.size() * (chunk / block);
  if (spec.block_ids.size() < needed) return errc::bad_request;
  spec.block_ids.resize(needed);  // blocks of the partial tail chunk are not transferred
  return {};
}

void WorkerAdapter::start_store(TransferSpec spec, detail::Callback<wire::StoreResult> cb) {
  asio::post(ex_, [self = shared_from_this(), s = std::move(spec), cb = std::move(cb)]() mutable {
    self->do_store(std::move(s), std::move(cb));
  });
}

void WorkerAdapter::do_store(TransferSpec spec, detail::Callback<wire::StoreResult> cb) {
  if (config_.gate_trigger == GateTrigger::first_transfer) monitor_->gate().open("first store");
  auto conn = usable_connection();
  std::error_code ec = shutting_down_ ? make_error_code(errc::shutting_down)
                       : !conn        ? make_error_code(errc::unhealthy)
                                      : prepare(spec);
  if (ec || spec.hashes.empty()) {
    tracker_.store_done(tracker_.store_started(spec.request_id));  // not sent: counts as finished
    return cb(ec, wire::StoreResult{});
  }
  const auto sent = sent_now();
  const auto ticket = tracker_.store_started(spec.request_id, sent);
  wire::StoreRequest req{ns_, config_.kv_rank, std::move(spec.hashes), std::move(spec.block_ids),
                         std::move(spec.engine_event), wire::fence_to_wire(wire_fence(sent))};
  conn->async_call(std::move(req), config_.transfer_timeout,
                   [self = shared_from_this(), ticket, cb = std::move(cb)](std::error_code ec, wire::StoreResult r) {
                     self->note_error(ec);
                     if (answered(ec)) self->tracker_.store_done(ticket);
                     else self->tracker_.store_unanswered(ticket);
                     cb(ec, r);
                   });
}

void WorkerAdapter::start_retrieve(TransferSpec spec, detail::Callback<wire::RetrieveResult> cb) {
  asio::post(ex_, [self = shared_from_this(), s = std::move(spec), cb = std::move(cb)]() mutable {
    self->do_retrieve(std::move(s), std::move(cb));
  });
}

void WorkerAdapter::do_retrieve(TransferSpec spec, detail::Callback<wire::RetrieveResult> cb) {
  if (config_.gate_trigger == GateTrigger::first_transfer) monitor_->gate().open("first retrieve");
  auto conn = usable_connection();
  std::error_code ec = shutting_down_ ? make_error_code(errc::shutting_down)
                       : !conn        ? make_error_code(errc::unhealthy)
                                      : prepare(spec);
  // The blocks this retrieve fills: those after the skipped tokens.
  std::size_t first = 0;
  if (registration_ && registration_->request.layout.block_size)
    first = std::min<std::size_t>(spec.skip_first_n_tokens / registration_->request.layout.block_size,
                                  spec.block_ids.size());
  const std::span<const std::uint32_t> blocks(spec.block_ids.data() + first, spec.block_ids.size() - first);
  if (ec || spec.hashes.empty()) {
    // Not sent: on error its blocks failed to load.
    tracker_.retrieve_done(tracker_.retrieve_started(spec.request_id, blocks), !ec);
    return cb(ec, wire::RetrieveResult{});
  }
  const auto sent = sent_now();
  const auto ticket = tracker_.retrieve_started(spec.request_id, blocks, sent);
  wire::RetrieveRequest req{ns_,         config_.kv_rank, std::move(spec.hashes), std::move(spec.block_ids),
                            spec.skip_first_n_tokens, std::move(spec.engine_event), wire::fence_to_wire(wire_fence(sent))};
  conn->async_call(std::move(req), config_.transfer_timeout,
                   [self = shared_from_this(), ticket, cb = std::move(cb)](std::error_code ec, wire::RetrieveResult r) {
                     self->note_error(ec);
                     if (answered(ec)) self->tracker_.retrieve_done(ticket, !ec);
                     else self->tracker_.retrieve_unanswered(ticket);
                     cb(ec, r);
                   });
}

void WorkerAdapter::start_batch(bool store, std::vector<TransferSpec> specs, detail::Callback<BatchResult> cb) {
  asio::post(ex_, [self = shared_from_this(), store, specs = std::move(specs), cb = std::move(cb)]() mutable {
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
        self->do_store(std::move(specs[i]), [st, i](std::error_code ec, wire::StoreResult) { st->done(i, ec); });
      else
        self->do_retrieve(std::move(specs[i]), [st, i](std::error_code ec, wire::RetrieveResult) { st->done(i, ec); });
    }
  });
}

// ---- bookkeeping and shutdown -----------------------------------------------------------

void WorkerAdapter::start_get_finished(std::vector<std::string> finished, detail::Callback<FinishedSets> cb) {
  asio::post(ex_, [self = shared_from_this(), f = std::move(finished), cb = std::move(cb)]() mutable {
    const auto s = self->monitor_->state();
    const bool unhealthy = s == health::State::degraded || s == health::State::stopped;
    const std::uint64_t boot_id = s == health::State::healthy ? self->monitor_->boot_id() : 0;
    auto r = self->tracker_.get_finished(f, unhealthy, {Clock::now(), boot_id});
    cb({}, FinishedSets{std::move(r.stores), std::move(r.retrieves)});
  });
}

void WorkerAdapter::start_take_load_errors(detail::Callback<std::vector<std::uint32_t>> cb) {
  asio::post(ex_, [self = shared_from_this(), cb = std::move(cb)]() mutable { cb({}, self->tracker_.take_load_errors()); });
}

void WorkerAdapter::start_shutdown(detail::Callback<Done> cb) {
  asio::post(ex_, [self = shared_from_this(), cb = std::move(cb)]() mutable {
    asio::co_spawn(self->ex_, do_shutdown(self, std::move(cb)), asio::detached);
  });
}

asio::awaitable<void> WorkerAdapter::do_shutdown(std::shared_ptr<WorkerAdapter> self, detail::Callback<Done> cb) {
  // No re-registration and no new transfers from here on. The monitor's stop
  // closes the connection, so UNREGISTER goes first on the live one.
  self->shutting_down_ = true;
  std::error_code ec;
  if (self->registration_) {
    self->registration_.reset();
    if (auto conn = self->usable_connection()) {
      auto [uec, reply] =
          co_await conn->async_call(wire::UnregisterKvCacheRequest{}, self->config_.call_timeout, as_tuple_awaitable);
      ec = uec;
    }
  }
  self->monitor_->stop();
  cb(ec, Done{});
}

// ---- blocking forms ------------------------------------------------------------------------

#define KVLINK_BLOCKING(T, deadline, call)                                                   \
  detail::blocking<T>(deadline_or_default(deadline), [&](detail::Callback<T> cb) { call; }, \
                      [m = monitor_] { m->report_deadline_missed(); })

Result<Done> WorkerAdapter::register_kv_caches(wire::KvLayout layout, int memfd, Duration deadline) {
  return KVLINK_BLOCKING(Done, deadline, start_register(std::move(layout), duplicate_fd(memfd), std::move(cb)));
}
Result<Done> WorkerAdapter::unregister_kv_caches(Duration deadline) {
  return KVLINK_BLOCKING(Done, deadline, start_unregister(std::move(cb)));
}
Result<wire::StoreResult> WorkerAdapter::submit_store(TransferSpec spec, Duration deadline) {
  return KVLINK_BLOCKING(wire::StoreResult, deadline, start_store(std::move(spec), std::move(cb)));
}
Result<wire::RetrieveResult> WorkerAdapter::submit_retrieve(TransferSpec spec, Duration deadline) {
  return KVLINK_BLOCKING(wire::RetrieveResult, deadline, start_retrieve(std::move(spec), std::move(cb)));
}
Result<WorkerAdapter::BatchResult> WorkerAdapter::submit_stores(std::vector<TransferSpec> specs, Duration deadline) {
  return KVLINK_BLOCKING(BatchResult, deadline, start_batch(true, std::move(specs), std::move(cb)));
}
Result<WorkerAdapter::BatchResult> WorkerAdapter::submit_retrieves(std::vector<TransferSpec> specs,
                                                                   Duration deadline) {
  return KVLINK_BLOCKING(BatchResult, deadline, start_batch(false, std::move(specs), std::move(cb)));
}
Result<FinishedSets> WorkerAdapter::get_finished(std::vector<std::string> engine_finished, Duration deadline) {
  return KVLINK_BLOCKING(FinishedSets, deadline, start_get_finished(std::move(engine_finished), std::move(cb)));
}
Result<std::vector<std::uint32_t>> WorkerAdapter::take_load_errors(Duration deadline) {
  return KVLINK_BLOCKING(std::vector<std::uint32_t>, deadline, start_take_load_errors(std::move(cb)));
}
Result<Done> WorkerAdapter::shutdown(Duration deadline) {
  return KVLINK_BLOCKING(Done, deadline, start_shutdown(std::move(cb)));
}

#undef KVLINK_BLOCKING

}  // namespace kvlink::adapter
