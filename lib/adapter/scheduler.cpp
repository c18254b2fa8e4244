#include "kvlink/adapter/scheduler.hpp"

#include <asio/post.hpp>
#include <stdexcept>

#include "kvlink/log.hpp"
#include "monitor_options.hpp"

namespace kvlink::adapter {

SchedulerAdapter::SchedulerAdapter(asio::any_io_executor ex, SchedulerConfig config)
    : ex_(std::move(ex)), config_(std::move(config)) {}

std::shared_ptr<SchedulerAdapter> SchedulerAdapter::create(asio::any_io_executor ex, SchedulerConfig config) {
  store::NamespaceSpec spec{config.model, config.world_size, config.cache_salt};
  std::shared_ptr<SchedulerAdapter> self(new SchedulerAdapter(ex, std::move(config)));
  self->ns_ = store::namespace_id(spec);  // throws on an invalid namespace
  if (self->config_.monitor) {
    self->monitor_ = self->config_.monitor;
  } else {
    self->monitor_ = health::Monitor::create(ex, detail::monitor_options(self->config_, wire::Role::scheduler));
    self->owns_monitor_ = true;
    self->monitor_->start();
  }
  return self;
}

SchedulerAdapter::~SchedulerAdapter() {
  if (owns_monitor_) monitor_->stop();
}

void SchedulerAdapter::stop() {
  if (owns_monitor_) monitor_->stop();
}

std::shared_ptr<net::Connection> SchedulerAdapter::usable_connection() const {
  const health::State s = monitor_->state();
  if (s == health::State::degraded || s == health::State::stopped) return nullptr;
  return monitor_->connection();
}

void SchedulerAdapter::note_error(std::error_code ec) {
  if (ec == errc::timed_out) monitor_->report_deadline_missed();
}

AdapterMetrics SchedulerAdapter::metrics() const {
  AdapterMetrics m = metrics_->copy();
  m.health = monitor_->metrics();
  return m;
}

void SchedulerAdapter::start_submit(std::string id, std::vector<store::Token> tokens, detail::Callback<Done> cb,
                                    detail::CancelSignal cancel) {
  cb = detail::timed(metrics_, Op::lookup, std::move(cb));
  asio::post(ex_, [self = shared_from_this(), id = std::move(id), tokens = std::move(tokens), cb = std::move(cb),
                   cancel = std::move(cancel)]() mutable {
    if (self->lookups_.contains(id)) return cb({}, Done{});  // duplicate submit: ignored
    if (self->config_.open_gate_on_first_lookup) self->monitor_->gate().open("first lookup");
    auto l = std::make_shared<Lookup>();
    l->session_id = store::session_id_of(id);
    self->lookups_.emplace(id, l);
    auto conn = self->usable_connection();
    l->chunk_size = self->config_.chunk_size ? self->config_.chunk_size : self->monitor_->server_chunk_size();
    if (!conn || l->chunk_size == 0) {
      // Degraded (or never connected): not sent, 0 matched tokens.
      l->final = true;
      const auto st = self->monitor_->state();
      const bool unhealthy = st == health::State::degraded || st == health::State::stopped;
      return cb(make_error_code(unhealthy ? errc::unhealthy : errc::not_connected), Done{});
    }
    l->hashes = store::chunk_hashes(tokens, l->chunk_size);
    if (l->hashes.empty()) {
      l->final = true;
      return cb({}, Done{});
    }
    self->metrics_->update([&](AdapterMetrics& m) { m.lookup_tokens += l->hashes.size() * l->chunk_size; });
    if (self->config_.lookup_mode == LookupMode::sync) {
      wire::SyncLookupRequest req{self->ns_, self->config_.world_size, l->session_id, l->hashes};
      conn->async_call(std::move(req), self->config_.call_timeout,
                       detail::with_cancel(std::move(cancel), [self, l, cb = std::move(cb)](std::error_code ec,
                                                                                            wire::LookupResult r) {
                         self->note_error(ec);
                         l->final = true;
                         l->matched_tokens = ec ? 0 : r.matched_chunks * l->chunk_size;
                         if (!ec)
                           self->metrics_->update([&](AdapterMetrics& m) { m.lookup_hit_tokens += l->matched_tokens; });
                         cb(ec, Done{});
                       }));
      return;
    }
    wire::LookupRequest req{self->ns_, self->config_.world_size, l->session_id, l->hashes};
    conn->async_call(std::move(req), self->config_.call_timeout,
                     detail::with_cancel(std::move(cancel), [self, l, cb = std::move(cb)](std::error_code ec,
                                                                                          wire::LookupAccepted r) {
                       self->note_error(ec);
                       if (ec) {
                         l->final = true;  // the lookup is lost: nothing matched
                       } else {
                         l->job_id = r.job_id;
                         l->job_known = true;
                       }
                       cb(ec, Done{});
                     }));
  });
}

void SchedulerAdapter::start_check(std::string id, detail::Callback<LookupStatus> cb, detail::CancelSignal cancel) {
  cb = detail::timed(metrics_, Op::check_lookup, std::move(cb));
  asio::post(ex_, [self = shared_from_this(), id = std::move(id), cb = std::move(cb),
                   cancel = std::move(cancel)]() mutable {
    auto it = self->lookups_.find(id);
    if (it == self->lookups_.end()) return cb(make_error_code(errc::not_found), LookupStatus{});
    auto l = it->second;
    if (l->final) return cb({}, LookupStatus{true, l->matched_tokens});
    auto conn = self->usable_connection();
    if (!conn) {
      l->final = true;  // degraded: 0 matched tokens
      const auto st = self->monitor_->state();
      if (st == health::State::degraded || st == health::State::stopped)
        self->metrics_->update([](AdapterMetrics& m) { ++m.call(Op::check_lookup).degraded; });
      return cb({}, LookupStatus{true, 0});
    }
    if (!l->job_known || l->query_in_flight) return cb({}, LookupStatus{});  // pending
    l->query_in_flight = true;
    conn->async_call(wire::QueryPrefetchStatusRequest{l->job_id}, self->config_.call_timeout,
                     detail::with_cancel(std::move(cancel), [self, l, cb = std::move(cb)](std::error_code ec,
                                                                                          wire::PrefetchStatus st) {
                       self->note_error(ec);
                       l->query_in_flight = false;
                       if (!l->final) {
                         // A failed query makes the lookup final with no hit. So does a
                         // cancelled one: the server may have reported the job's result
                         // to it, and it reports a result once.
                         if (ec) {
                           l->final = true;
                           l->matched_tokens = 0;
                         } else if (st.state == wire::PrefetchState::done) {
                           l->final = true;
                           l->matched_tokens = st.matched_chunks * l->chunk_size;
                           self->metrics_->update(
                               [&](AdapterMetrics& m) { m.lookup_hit_tokens += l->matched_tokens; });
                         }
                       }
                       // Counted as cancelled; other errors count as an answer (no hit).
                       const std::error_code counted = ec == asio::error::operation_aborted ? ec : std::error_code{};
                       cb(counted, LookupStatus{l->final, l->matched_tokens});
                     }));
  });
}

void SchedulerAdapter::start_free_locks(std::string id, std::uint32_t start, std::uint32_t end,
                                        detail::Callback<Done> cb) {
  cb = detail::timed(metrics_, Op::free_lookup_locks, std::move(cb));
  asio::post(ex_, [self = shared_from_this(), id = std::move(id), start, end, cb = std::move(cb)]() mutable {
    auto it = self->lookups_.find(id);
    if (it == self->lookups_.end()) return cb(make_error_code(errc::not_found), Done{});
    const auto& l = *it->second;
    const auto n = static_cast<std::uint32_t>(l.hashes.size());
    end = std::min(end, n);
    if (start >= end) return cb({}, Done{});
    auto conn = self->usable_connection();
    if (!conn) return cb(make_error_code(errc::unhealthy), Done{});  // dropped
    conn->send(wire::FreeLookupLocksRequest{self->ns_, self->config_.world_size, l.session_id, l.hashes, start, end});
    cb({}, Done{});
  });
}

void SchedulerAdapter::start_end_session(std::string id, detail::Callback<Done> cb) {
  cb = detail::timed(metrics_, Op::end_session, std::move(cb));
  asio::post(ex_, [self = shared_from_this(), id = std::move(id), cb = std::move(cb)]() mutable {
    auto it = self->lookups_.find(id);
    if (it == self->lookups_.end()) return cb(make_error_code(errc::not_found), Done{});
    auto l = std::move(it->second);
    self->lookups_.erase(it);
    auto conn = self->usable_connection();
    if (!conn) return cb(make_error_code(errc::unhealthy), Done{});  // dropped
    conn->send(wire::EndSessionRequest{self->ns_, l->session_id, l->hashes});
    cb({}, Done{});
  });
}

void SchedulerAdapter::start_report(std::string id, std::uint32_t allocated, std::uint32_t total,
                                    detail::Callback<Done> cb) {
  cb = detail::timed(metrics_, Op::report_block_allocation, std::move(cb));
  asio::post(ex_, [self = shared_from_this(), id = std::move(id), allocated, total, cb = std::move(cb)]() mutable {
    auto conn = self->usable_connection();
    if (!conn) return cb(make_error_code(errc::unhealthy), Done{});  // dropped
    conn->send(wire::ReportBlockAllocationRequest{store::session_id_of(id), allocated, total});
    cb({}, Done{});
  });
}

void SchedulerAdapter::start_cleanup(std::string id, detail::Callback<Done> cb) {
  cb = detail::timed(metrics_, Op::cleanup, std::move(cb));
  asio::post(ex_, [self = shared_from_this(), id = std::move(id), cb = std::move(cb)]() mutable {
    self->lookups_.erase(id);
    cb({}, Done{});
  });
}

// ---- blocking forms ---------------------------------------------------------------

Result<Done> SchedulerAdapter::submit_lookup(std::string request_id, std::vector<store::Token> tokens,
                                             Duration deadline) {
  return wait_for<Done>(deadline, [&](detail::Callback<Done> cb) {
    start_submit(std::move(request_id), std::move(tokens), std::move(cb));
  });
}

Result<LookupStatus> SchedulerAdapter::check_lookup(std::string request_id, Duration deadline) {
  return wait_for<LookupStatus>(deadline, [&](detail::Callback<LookupStatus> cb) {
    start_check(std::move(request_id), std::move(cb));
  });
}

Result<Done> SchedulerAdapter::free_lookup_locks(std::string request_id, std::uint32_t start_chunk,
                                                 std::uint32_t end_chunk, Duration deadline) {
  return wait_for<Done>(deadline, [&](detail::Callback<Done> cb) {
    start_free_locks(std::move(request_id), start_chunk, end_chunk, std::move(cb));
  });
}

Result<Done> SchedulerAdapter::end_session(std::string request_id, Duration deadline) {
  return wait_for<Done>(deadline, [&](detail::Callback<Done> cb) {
    start_end_session(std::move(request_id), std::move(cb));
  });
}

Result<Done> SchedulerAdapter::report_block_allocation(std::string request_id, std::uint32_t allocated_blocks,
                                                       std::uint32_t total_blocks, Duration deadline) {
  return wait_for<Done>(deadline, [&](detail::Callback<Done> cb) {
    start_report(std::move(request_id), allocated_blocks, total_blocks, std::move(cb));
  });
}

Result<Done> SchedulerAdapter::cleanup(std::string request_id, Duration deadline) {
  return wait_for<Done>(deadline, [&](detail::Callback<Done> cb) {
    start_cleanup(std::move(request_id), std::move(cb));
  });
}

}  // namespace kvlink::adapter
