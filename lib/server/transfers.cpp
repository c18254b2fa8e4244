#include "kvlink/server/transfers.hpp"

#include <algorithm>
#include <fmt/format.h>
#include <set>

#include "kvlink/log.hpp"
#include "kvlink/server/request_limits.hpp"
#include "kvlink/store/keys.hpp"

namespace kvlink::server {

using store::ChunkKey;

namespace {
// Finds the first block id outside the registered cache.
Error check_blocks(const std::vector<std::uint32_t>& ids, const transfer::Registration& reg) {
  for (std::size_t i = 0; i < ids.size(); ++i)
    if (ids[i] >= reg.layout.num_blocks)
      return {errc::bad_request, fmt::format("block id {} (position {}) is not below the registered num_blocks {}",
                                             ids[i], i, reg.layout.num_blocks)};
  return {};
}

// Where a completion replies: the sink itself while submit() runs (an
// engine that completes inline), otherwise the session if it still exists.
struct ReplyTarget {
  ReplySink* inline_sink = nullptr;
  std::weak_ptr<ReplySink> weak;
  template <class F>
  void with(F&& f) {
    if (inline_sink) return f(*inline_sink);
    if (auto s = weak.lock()) f(*s);
  }
};
}  // namespace

bool Transfers::refuse_admin(const SessionState& session, const wire::Frame& frame, ReplySink& sink) {
  if (!session.admin()) return false;
  p_.reporter.fail(frame, sink, errc::bad_request,
                   fmt::format("{} from a connection that said HELLO as admin: admin connections (kvlink-cli ping, "
                               "stats, watch) are not instances and cannot register, store or retrieve; say HELLO as "
                               "worker",
                               wire::opcode_name(frame.header.opcode)));
  return true;
}

bool Transfers::refuse_transfer(const SessionState& session, const wire::Frame& frame, ReplySink& sink) {
  if (refuse_admin(session, frame, sink)) return true;
  if (!draining_) return false;
  p_.reporter.fail(frame, sink, errc::shutting_down,
                   fmt::format("{} refused: {}", wire::opcode_name(frame.header.opcode), drain_message));
  return true;
}

// ---- registrations ---------------------------------------------------------------

std::string Transfers::data_path_error(std::uint64_t instance) const {
  auto it = registrations_.find(instance);
  if (it == registrations_.end()) return {};
  Error fault = p_.engine.fault(*it->second);
  return fault ? fault.message() : std::string();
}

std::uint64_t Transfers::data_paths_down() const {
  return static_cast<std::uint64_t>(std::count_if(registrations_.begin(), registrations_.end(), [&](const auto& r) {
    return static_cast<bool>(p_.engine.fault(*r.second));
  }));
}

std::optional<InstanceStatus::Registration> Transfers::registration_status(std::uint64_t instance) const {
  auto r = registrations_.find(instance);
  if (r == registrations_.end()) return std::nullopt;
  const auto& reg = *r->second;
  const auto& l = reg.layout;
  Error fault = p_.engine.fault(reg);
  return InstanceStatus::Registration{
      reg.model, reg.ns, reg.world_size, reg.kv_rank, reg.slot_bytes,
      fmt::format("{} layers, {} planes, blocks of {} tokens x {} heads x {} x {} bytes", l.num_layers, l.num_planes,
                  l.block_size, l.num_kv_heads, l.head_size, l.dtype_size),
      fault ? fault.message() : std::string()};
}

void Transfers::name_models(std::vector<NamespaceStatus>& namespaces) const {
  for (const auto& entry : registrations_) {
    const transfer::Registration& reg = *entry.second;
    auto it = std::find_if(namespaces.begin(), namespaces.end(), [&](const auto& n) { return n.ns == reg.ns; });
    if (it == namespaces.end()) it = namespaces.insert(namespaces.end(), {reg.ns, {}, 0, 0});
    it->model = reg.model;
  }
}

std::uint64_t Transfers::quota_bytes() const {
  if (p_.config.instance_l1_quota_bytes > 0) return p_.config.instance_l1_quota_bytes;
  return static_cast<std::uint64_t>(p_.config.instance_l1_quota_fraction *
                                    static_cast<double>(std::uint64_t{p_.pool.num_slabs()} * p_.pool.slab_bytes()));
}

std::uint32_t Transfers::quota_slots(std::uint64_t slot_bytes) const {
  if (quota_bytes() == 0 || slot_bytes == 0) return 0;
  // The chunks of this size L1 can hold at most, when every slab is theirs.
  const std::uint64_t most = std::uint64_t{p_.pool.num_slabs()} * (p_.pool.slab_bytes() / slot_bytes);
  // A quota smaller than one chunk would refuse everything: one slot at least.
  return static_cast<std::uint32_t>(
      std::clamp<std::uint64_t>(quota_bytes() / slot_bytes, 1, std::max<std::uint64_t>(most, 1)));
}

Error Transfers::check_layout(std::uint64_t instance_id, std::uint64_t slot_bytes) const {
  // Each chunk costs a few hundred bytes of index: below this the index
  // could grow larger than a few percent of L1 itself.
  constexpr std::uint64_t min_chunk_bytes = 4096;
  if (slot_bytes < min_chunk_bytes)
    return {errc::bad_request,
            fmt::format("a chunk of this layout is {} bytes, below the server's minimum of {}: the index would cost "
                        "too much memory next to such small chunks; raise --chunk-size (tokens per chunk)",
                        slot_bytes, min_chunk_bytes)};
  if (auto err = p_.pool.check_layout(slot_bytes)) return err;
  // Each layout in use needs a slab of its own; the other instances'
  // layouts keep theirs.
  std::set<std::uint64_t> layouts;
  for (const auto& [id, reg] : registrations_)
    if (id != instance_id) layouts.insert(reg->slot_bytes);
  if (!layouts.contains(slot_bytes) && layouts.size() >= p_.pool.num_slabs())
    return {errc::bad_request,
            fmt::format("L1 has {} slabs and {} other KV layouts are registered, each needing a slab of its own; "
                        "raise --l1-size or lower --l1-slab-size",
                        p_.pool.num_slabs(), layouts.size())};
  return {};
}

void Transfers::register_cache(SessionState& session, const wire::Frame& frame, ReplySink& sink, UniqueFd fd,
                               TimePoint now) {
  wire::RegisterKvCacheRequest req;
  if (!p_.reporter.parse(frame, sink, req, errc::bad_request)) return;
  // Every refusal is in the server's log too, with who asked: the engine's
  // log is not the only place an operator looks.
  auto refuse = [&](std::string why) {
    p_.reporter.refused(session, now,
                        fmt::format("refused a KV-cache registration from {} ({}): {}", session.peer.text,
                                    session.client_name, why));
    p_.reporter.fail(frame, sink, errc::bad_request, why);
  };
  if (auto err = check_world_size(req.world_size)) return refuse(err.message());
  if (req.ns == 0)
    return refuse(
        "namespace 0 is not a namespace id; compute it with store::namespace_id(model, world size, salt)");
  if (auto err = store::check_chunk_size(p_.config.chunk_size, req.layout.block_size)) return refuse(err.message());
  const std::uint32_t blocks_per_chunk = p_.config.chunk_size / req.layout.block_size;
  std::uint64_t slot = 0;
  if (__builtin_mul_overflow(std::uint64_t{req.layout.num_layers} * req.layout.num_planes * blocks_per_chunk,
                             req.layout.block_bytes(), &slot))
    return refuse("the layout's chunk size in bytes overflows 64 bits");
  if (auto err = check_layout(session.instance_id, slot)) return refuse(err.message());
  auto reg = std::make_shared<transfer::Registration>();
  reg->instance_id = session.instance_id;
  reg->ns = req.ns;
  reg->model = std::move(req.model);
  reg->world_size = req.world_size;
  reg->kv_rank = req.kv_rank;
  reg->layout = std::move(req.layout);
  reg->blocks_per_chunk = blocks_per_chunk;
  reg->slot_bytes = slot;
  const bool had_fd = static_cast<bool>(fd);
  if (auto err = p_.engine.attach(*reg, std::move(fd))) {
    std::string why = err.message();
    // The server collects fds on worker connections only (server.cpp).
    if (!had_fd && session.role != wire::Role::worker)
      why += fmt::format("; fds are received on worker connections only, and this one said HELLO as {}",
                         wire::role_name(session.role));
    return refuse(why);
  }
  if (auto err = p_.engine.use_l1(*reg, p_.pool.region(), p_.pool.region_bytes())) return refuse(err.message());
  p_.reporter.event(ServerEvent::Kind::register_kv_cache, session.instance_id, now,
                    fmt::format("{} ({}) registered a KV cache: model {}, rank {}/{}, {} layers, {} bytes per chunk",
                                session.peer.text, session.client_name, reg->model, reg->kv_rank, reg->world_size,
                                reg->layout.num_layers, slot));
  log::debug("kvlink-server: registration of {} is instance {:016x}", session.peer.text, session.instance_id);
  registrations_[session.instance_id] = std::move(reg);
  p_.liveness.registered(session.instance_id, now);
  reply(sink, frame.header, wire::Empty{});
}

void Transfers::unregister(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  wire::UnregisterKvCacheRequest req;
  if (!p_.reporter.parse(frame, sink, req) || refuse_admin(session, frame, sink)) return;
  if (registrations_.erase(session.instance_id) > 0)  // idempotent
    p_.reporter.event(ServerEvent::Kind::unregister, session.instance_id, now,
                      fmt::format("{} ({}) unregistered its KV cache", session.peer.text, session.client_name));
  p_.liveness.registered(session.instance_id, now, false);
  reply(sink, frame.header, wire::Empty{});
}

std::shared_ptr<const transfer::Registration> Transfers::registration_for(const SessionState& session,
                                                                          std::uint64_t ns, std::uint32_t kv_rank,
                                                                          std::size_t chunks, std::size_t block_ids,
                                                                          const wire::Frame& frame, ReplySink& sink) {
  auto it = registrations_.find(session.instance_id);
  if (it == registrations_.end()) {
    p_.reporter.fail(frame, sink, errc::not_registered,
                     fmt::format("instance {:016x} has no KV cache registered; send REGISTER_KV_CACHE first",
                                 session.instance_id));
    return nullptr;
  }
  const auto& reg = *it->second;
  if (auto fault = p_.engine.fault(reg)) {
    ++refused_data_path_;
    p_.reporter.fail(frame, sink, errc::server_error,
                     fmt::format("the server cannot move this KV cache's data: {}; recompute until it is back",
                                 fault.message()));
    return nullptr;
  }
  if (ns != reg.ns) {
    p_.reporter.fail(frame, sink, errc::bad_request,
                     fmt::format("namespace {:016x} does not match the registered KV cache's namespace {:016x} "
                                 "(model {}); compute keys with the registered model, world size and salt",
                                 ns, reg.ns, reg.model));
    return nullptr;
  }
  if (kv_rank != reg.kv_rank) {
    p_.reporter.fail(frame, sink, errc::bad_request,
                     fmt::format("kv_rank {} does not match the registered KV cache's rank {}", kv_rank, reg.kv_rank));
    return nullptr;
  }
  if (block_ids != chunks * reg.blocks_per_chunk) {
    p_.reporter.fail(frame, sink, errc::bad_request,
                     fmt::format("{} block ids given for {} chunks; need chunks x chunk_size / block_size = {} x {} = "
                                 "{}",
                                 block_ids, chunks, chunks, reg.blocks_per_chunk, chunks * reg.blocks_per_chunk));
    return nullptr;
  }
  return it->second;
}

// ---- copies ----------------------------------------------------------------------

void Transfers::copy_failed(const wire::Header& header, std::error_code ec, ReplySink& sink,
                            std::string_view consequence) {
  ++p_.reporter.counters().ops[header.opcode].errors;
  const char* op = header.opcode == static_cast<std::uint8_t>(wire::Opcode::store) ? "STORE" : "RETRIEVE";
  if (ec == errc::timed_out) {
    ++fenced_;
    return reply_error(sink, header, errc::timed_out,
                       fmt::format("{} was not done before its fence (the worker's transfer deadline), so the server "
                                   "left the engine's blocks alone; {}",
                                   op, consequence));
  }
  ++failures_;
  reply_error(sink, header, errc::server_error, fmt::format("{} copy failed: {}; {}", op, ec.message(), consequence));
}

void Transfers::store(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  wire::StoreRequest req;
  if (!p_.reporter.parse(frame, sink, req)) return;
  auto reg = registration_for(session, req.ns, req.kv_rank, req.hashes.size(), req.block_ids.size(), frame, sink);
  if (!reg) return;
  if (auto err = check_blocks(req.block_ids, *reg)) return p_.reporter.fail(frame, sink, err);
  struct Reserved {
    ChunkKey key;
    std::uint64_t generation;
  };
  std::vector<Reserved> reserved;
  transfer::TransferJob job;
  job.direction = transfer::Direction::store;
  job.registration = reg;
  job.engine_event = std::move(req.engine_event);
  job.fence = wire::fence_from_wire(req.fence_ns);
  if (now >= job.fence) return copy_failed(frame.header, errc::timed_out, sink, "nothing was stored");
  const std::uint32_t bpc = reg->blocks_per_chunk;
  std::uint32_t skipped = 0;
  const store::Writer writer{reg->slot_bytes, session.instance_id, quota_slots(reg->slot_bytes)};
  std::uint32_t other_layout = 0;
  for (std::size_t i = 0; i < req.hashes.size(); ++i) {
    ChunkKey key{req.ns, req.hashes[i], req.kv_rank};
    store::Slot slot = 0;
    std::uint64_t gen = 0;
    const auto got = p_.store.reserve(key, writer, now, slot, gen);
    if (got != store::KvStore::Reserve::reserved) {
      // Present, being written, no room or over quota: not an error.
      ++skipped;
      other_layout += got == store::KvStore::Reserve::other_layout ? 1 : 0;
      continue;
    }
    reserved.push_back({key, gen});
    auto first = req.block_ids.begin() + static_cast<std::ptrdiff_t>(i * bpc);
    job.chunks.push_back({p_.pool.data(slot), std::vector<std::uint32_t>(first, first + bpc)});
  }
  if (other_layout > 0)
    p_.reporter.warn(session, now,
                     fmt::format("kvlink-server: {} ({}) stored {} chunks that are already in L1 with another KV "
                                 "layout: engines sharing a namespace (model, world size, cache salt) must share the "
                                 "layout; give each layout its own cache salt",
                                 session.peer.text, session.client_name, other_layout));
  if (reserved.empty()) return reply(sink, frame.header, wire::StoreResult{0, skipped});
  auto target = std::make_shared<ReplyTarget>(ReplyTarget{&sink, sink.weak_self()});
  const wire::Header header = frame.header;
  std::weak_ptr<bool> alive = alive_;
  const InFlight::Ticket ticket = p_.in_flight.start(session.in_flight, session.instance_id);
  const std::uint64_t bytes = reg->slot_bytes * reserved.size();
  p_.engine.submit(std::move(job), [this, alive, target, header, reserved = std::move(reserved), skipped, ticket,
                                    started = now, bytes](std::error_code ec) {
    auto live = alive.lock();
    InFlight::end(live && *live ? &p_.in_flight : nullptr, ticket);
    if (!live || !*live) return;  // the handler is gone
    const TimePoint done = Clock::now();
    p_.totals.latency[header.opcode].observe(done - started);
    for (const auto& r : reserved) {
      if (ec) {
        p_.store.abort(r.key, r.generation);
        continue;
      }
      p_.store.commit(r.key, r.generation, done);
      if (!tiers_ || !tiers_->writes_through()) continue;  // the hot path stays as without tiers
      if (const auto* e = p_.store.find(r.key)) tiers_->stored(r.key, {p_.pool.data(e->slot), p_.store.slot_bytes(*e)}, done);
    }
    if (!ec) {
      p_.totals.stored_bytes += bytes;
      ++p_.totals.stores_completed;
    }
    if (ec) return target->with([&](ReplySink& s) { copy_failed(header, ec, s, "nothing was stored"); });
    target->with([&](ReplySink& s) {
      reply(s, header, wire::StoreResult{static_cast<std::uint32_t>(reserved.size()), skipped});
    });
  });
  target->inline_sink = nullptr;
}

void Transfers::retrieve(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  wire::RetrieveRequest req;
  if (!p_.reporter.parse(frame, sink, req)) return;
  // Refused, the engine recomputes those blocks: the request's lookups need
  // the chunks no more.
  if (!submit_retrieve(session, frame, sink, req, now))
    p_.lookups.release_retrieved(req.session_id, req.ns, req.kv_rank, req.hashes);
}

bool Transfers::submit_retrieve(SessionState& session, const wire::Frame& frame, ReplySink& sink,
                                wire::RetrieveRequest& req, TimePoint now) {
  auto refuse = [&](const Error& err) {
    p_.reporter.fail(frame, sink, err);
    return false;
  };
  auto reg = registration_for(session, req.ns, req.kv_rank, req.hashes.size(), req.block_ids.size(), frame, sink);
  if (!reg) return false;
  if (auto err = check_blocks(req.block_ids, *reg)) return refuse(err);
  const std::uint64_t tokens = std::uint64_t{req.hashes.size()} * p_.config.chunk_size;
  if (req.skip_first_n_tokens > tokens && !req.hashes.empty())
    return refuse({errc::bad_request, fmt::format("skip_first_n_tokens {} exceeds the {} tokens of the {} chunks "
                                                  "requested",
                                                  req.skip_first_n_tokens, tokens, req.hashes.size())});
  transfer::TransferJob job;
  job.direction = transfer::Direction::retrieve;
  job.registration = reg;
  job.skip_first_n_tokens = req.skip_first_n_tokens;
  job.engine_event = std::move(req.engine_event);
  job.fence = wire::fence_from_wire(req.fence_ns);
  if (now >= job.fence) {
    copy_failed(frame.header, errc::timed_out, sink, "nothing was copied");
    return false;
  }
  const std::uint32_t bpc = reg->blocks_per_chunk;
  std::vector<ChunkKey> keys;
  keys.reserve(req.hashes.size());
  for (std::size_t i = 0; i < req.hashes.size(); ++i) {
    ChunkKey key{req.ns, req.hashes[i], req.kv_rank};
    const auto* e = p_.store.find(key);
    if (!e)
      return refuse({errc::not_found,
                     fmt::format("chunk {} (hash {}, rank {}) is not in the store: evicted or never stored; look the "
                                 "prompt up again and recompute what is missing",
                                 i, store::to_string(key.hash), key.rank)});
    if (p_.store.slot_bytes(*e) != reg->slot_bytes)
      return refuse({errc::bad_request,
                     fmt::format("chunk {} (hash {}) was stored with another KV layout ({} bytes per chunk; this "
                                 "registration's chunks are {} bytes): engines sharing a namespace (model, world "
                                 "size, cache salt) must share the layout; give each layout its own cache salt",
                                 i, store::to_string(key.hash), p_.store.slot_bytes(*e), reg->slot_bytes)});
    auto first = req.block_ids.begin() + static_cast<std::ptrdiff_t>(i * bpc);
    job.chunks.push_back({p_.pool.data(e->slot), std::vector<std::uint32_t>(first, first + bpc)});
    keys.push_back(key);
  }
  // The copy holds its own read lock so the slots cannot be evicted under it.
  for (const auto& k : keys) p_.store.lock(k, store::transfer_holder, now);
  auto target = std::make_shared<ReplyTarget>(ReplyTarget{&sink, sink.weak_self()});
  const wire::Header header = frame.header;
  std::weak_ptr<bool> alive = alive_;
  const InFlight::Ticket ticket = p_.in_flight.start(session.in_flight, session.instance_id);
  const std::uint64_t bytes = reg->slot_bytes * keys.size();
  p_.engine.submit(std::move(job), [this, alive, target, header, keys = std::move(keys),
                                    hashes = std::move(req.hashes), ns = req.ns, rank = req.kv_rank,
                                    session_id = req.session_id, ticket, started = now,
                                    bytes](std::error_code ec) {
    auto live = alive.lock();
    InFlight::end(live && *live ? &p_.in_flight : nullptr, ticket);
    if (!live || !*live) return;
    p_.totals.latency[header.opcode].observe(Clock::now() - started);
    if (!ec) {
      p_.totals.retrieved_bytes += bytes;
      ++p_.totals.retrieves_completed;
    }
    for (const auto& k : keys) p_.store.release_one(k, store::transfer_holder);
    // Loaded or failed (the engine recomputes), the request's lookups need
    // these chunks no more.
    p_.lookups.release_retrieved(session_id, ns, rank, hashes);
    if (ec)
      return target->with(
          [&](ReplySink& s) { copy_failed(header, ec, s, "treat the request's blocks as not loaded"); });
    target->with(
        [&](ReplySink& s) { reply(s, header, wire::RetrieveResult{static_cast<std::uint32_t>(keys.size())}); });
  });
  target->inline_sink = nullptr;
  return true;
}

// ---- planned restart -------------------------------------------------------------

std::uint64_t Transfers::begin_drain(TimePoint now, Duration timeout) {
  if (!draining_) {
    draining_ = true;
    drain_started_ = now;
    drain_deadline_ = now + timeout;
  }
  return p_.in_flight.total();
}

DrainStep Transfers::drain_step(TimePoint now, std::size_t replies_queued) const {
  if (p_.in_flight.drained() && replies_queued == 0) return DrainStep::drained;
  return now >= drain_deadline_ ? DrainStep::timed_out : DrainStep::wait;
}

}  // namespace kvlink::server
