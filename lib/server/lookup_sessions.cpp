#include "kvlink/server/lookup_sessions.hpp"

#include <algorithm>
#include <fmt/format.h>

#include "kvlink/server/request_limits.hpp"

namespace kvlink::server {

using store::ChunkKey;

bool LookupSessions::release_locks(const RequestSession& s, LockRelease& at, std::size_t& budget) {
  for (; at.record < s.locked.size(); ++at.record, at.started = false) {
    const std::uint64_t ns = s.locked[at.record].first;
    const auto& hashes = s.locked[at.record].second;
    if (!at.started) {
      at.loop = SlicedLoop(hashes.size(), s.world_size);
      at.started = true;
    }
    const bool done = at.loop.run(budget, [&](std::size_t i, std::uint32_t r) {
      store_.release_all(ChunkKey{ns, hashes[i], r}, s.holder);
    });
    if (!done) return false;
  }
  return true;
}

LookupSessions::Sessions::iterator LookupSessions::forget(Sessions::iterator it) {
  if (!it->second.locked.empty()) ended_.emplace_back(std::move(it->second), LockRelease{});
  return sessions_.erase(it);
}

bool LookupSessions::release_ended(std::size_t budget) {
  while (!ended_.empty()) {
    auto& front = ended_.front();
    if (!release_locks(front.first, front.second, budget)) return false;
    ended_.pop_front();
  }
  return true;
}

void LookupSessions::release_retrieved(std::uint64_t session_id, std::uint64_t ns, std::uint32_t rank,
                                       std::span<const wire::ChunkHash> hashes) {
  if (session_id == 0) return;
  for (auto it = sessions_.lower_bound({session_id, 0}); it != sessions_.end() && it->first.first == session_id; ++it)
    for (const auto& h : hashes) store_.release_all(ChunkKey{ns, h, rank}, it->second.holder);
}

void LookupSessions::release_instance(std::uint64_t instance) {
  for (auto it = sessions_.begin(); it != sessions_.end();) it = it->first.second == instance ? forget(it) : std::next(it);
  release_ended();
  std::erase_if(jobs_, [&](const auto& j) { return j.second.instance_id == instance; });
}

void LookupSessions::tick(TimePoint now) {
  // Lookups whose tier fetches did not all land in time answer with what did.
  for (auto it = tier_waits_.begin(); it != tier_waits_.end();) {
    const std::uint64_t id = it->first;
    const bool expired = it->second.deadline <= now;
    ++it;
    if (expired) finish_tier_wait(id, now);
  }
  while (!job_queue_.empty()) {
    auto it = jobs_.find(job_queue_.front());
    if (it != jobs_.end() && it->second.expiry > now) break;
    if (it != jobs_.end()) jobs_.erase(it);  // never polled
    job_queue_.pop_front();
  }
  if (now >= next_session_scan_) {
    next_session_scan_ = now + std::chrono::seconds(1);
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      it = it->second.last_seen + config_.session_ttl <= now ? forget(it) : std::next(it);
    }
  }
  release_ended();
}

std::uint32_t LookupSessions::record_locks(const SessionKey& key, store::Holder holder, std::uint64_t ns,
                                           std::uint32_t world_size, std::span<const wire::ChunkHash> hashes,
                                           std::uint32_t matched, TimePoint now) {
  auto it = sessions_.find(key);
  if (it == sessions_.end() || it->second.holder != holder) {
    // The session ended (or was reaped) while the lookup ran: nobody will
    // release these locks, so the lookup counts as a miss.
    for (std::uint32_t i = 0; i < matched; ++i)
      for (std::uint32_t r = 0; r < world_size; ++r) store_.release_all(ChunkKey{ns, hashes[i], r}, holder);
    return 0;
  }
  RequestSession& s = it->second;
  s.last_seen = now;
  s.world_size = std::max(s.world_size, world_size);
  if (matched == 0) return matched;
  // Remember which keys this session locked, once each (release_all drops
  // all of a holder's locks on a key): a repeated or growing lookup of the
  // same prompt replaces its earlier record instead of adding one.
  const std::span<const wire::ChunkHash> now_locked(hashes.data(), matched);
  for (auto& [rec_ns, rec] : s.locked) {
    if (rec_ns != ns) continue;
    const std::size_t common = std::min(rec.size(), now_locked.size());
    if (!std::equal(rec.begin(), rec.begin() + static_cast<std::ptrdiff_t>(common), now_locked.begin())) continue;
    if (now_locked.size() > rec.size()) rec.assign(now_locked.begin(), now_locked.end());
    return matched;
  }
  // Bounded: past the cap the oldest record's locks are left to their TTL.
  constexpr std::size_t max_records = 64;
  if (s.locked.size() >= max_records) s.locked.erase(s.locked.begin());
  s.locked.emplace_back(ns, std::vector<wire::ChunkHash>(now_locked.begin(), now_locked.end()));
  return matched;
}

void LookupSessions::lookup(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now,
                            bool sync) {
  // SYNC_LOOKUP answers the match; LOOKUP a job id to poll, done once the
  // match is known (at once, unless chunks come up from a tier).
  wire::LookupRequest req;
  if (sync) {
    wire::SyncLookupRequest s;
    if (!reporter_.parse(frame, sink, s)) return;
    req = {s.ns, s.world_size, s.session_id, std::move(s.hashes)};
  } else if (!reporter_.parse(frame, sink, req)) {
    return;
  }
  if (auto err = check_world_size(req.world_size)) return reporter_.fail(frame, sink, err);
  if (auto err = check_keys(req.hashes.size(), req.world_size)) return reporter_.fail(frame, sink, err);
  Lookup l;
  l.key = {req.session_id, session.instance_id};
  auto& s = sessions_[l.key];
  if (s.holder == 0) s.holder = next_holder_++;
  s.last_seen = now;
  l.req = std::move(req);
  l.holder = s.holder;
  l.header = frame.header;
  l.sync = sync;
  run_sliced(session, sink, now,
             [this, l = std::move(l), conn = session.in_flight, next = std::uint32_t{0}](
                 ReplySink& out, TimePoint at, std::size_t& budget) mutable {
               const wire::LookupRequest& req = l.req;
               const auto n = static_cast<std::uint32_t>(req.hashes.size());
               bool missed = false;
               while (next < n && budget > 0) {
                 if (!store_.match_chunk(req.ns, req.world_size, req.hashes[next], at, l.holder)) {
                   missed = true;
                   break;
                 }
                 ++next;
                 budget -= std::min<std::size_t>(budget, req.world_size);
               }
               if (!missed && next < n) return false;
               if (!l.sync) {
                 l.job_id = next_job_++;
                 Job job;
                 job.instance_id = l.key.second;
                 job.state = wire::PrefetchState::pending;
                 job.expiry = at + config_.job_ttl;
                 jobs_.emplace(l.job_id, job);
                 job_queue_.push_back(l.job_id);
                 reply(out, l.header, wire::LookupAccepted{l.job_id});
               }
               if (missed && fetches_.enabled()) {
                 TierWait w;
                 w.lookup = std::move(l);
                 w.first = next;
                 w.sink = out.weak_self();
                 if (wait_for_tier(w, conn, at)) return true;
                 l = std::move(w.lookup);
               }
               answer(l, next, &out, at);
               return true;
             });
}

void LookupSessions::answer(const Lookup& l, std::uint32_t matched, ReplySink* sink, TimePoint now) {
  const wire::LookupRequest& req = l.req;
  const auto n = static_cast<std::uint32_t>(req.hashes.size());
  store_.record_lookup(matched, n - matched);
  matched = record_locks(l.key, l.holder, req.ns, req.world_size, req.hashes, matched, now);
  totals_.lookup_requested_tokens += std::uint64_t{n} * config_.chunk_size;
  totals_.lookup_hit_tokens += std::uint64_t{matched} * config_.chunk_size;
  if (l.sync) {
    if (sink) reply(*sink, l.header, wire::LookupResult{matched});
    return;
  }
  // A job whose scheduler left meanwhile is gone: nobody polls it.
  if (auto it = jobs_.find(l.job_id); it != jobs_.end()) {
    it->second.state = wire::PrefetchState::done;
    it->second.matched = matched;
  }
}

bool LookupSessions::wait_for_tier(TierWait& w, const InFlight::ConnectionCount& conn, TimePoint now) {
  store::LowerTier* tier = fetches_.tier();
  if (!tier->accepting()) return false;
  // The tier is asked about the chunks from the first miss on (every rank
  // of each, a slice's worth of keys at most); found() fetches the prefix
  // it holds whole.
  const wire::LookupRequest& req = w.lookup.req;
  const auto n = static_cast<std::uint32_t>(req.hashes.size());
  const std::uint32_t ranks = req.world_size;
  const std::uint32_t chunks =
      std::min<std::uint32_t>(n - w.first, std::max<std::uint32_t>(1, static_cast<std::uint32_t>(keys_per_slice / ranks)));
  std::vector<ChunkKey> keys;
  keys.reserve(std::size_t{chunks} * ranks);
  for (std::uint32_t i = 0; i < chunks; ++i)
    for (std::uint32_t r = 0; r < ranks; ++r) keys.push_back(ChunkKey{req.ns, req.hashes[w.first + i], r});
  const std::uint64_t id = next_wait_++;
  w.end = w.first;
  w.waiting = 1;  // the find
  w.deadline = now + config_.l2_lookup_wait;
  w.ticket = in_flight_.start(conn, w.lookup.key.second);
  tier_waits_.emplace(id, std::move(w));
  // The fetches are stamped with the time of the ask (the find is quick,
  // and a remote tier's answer carries no clock).
  tier->find(keys, [this, alive = std::weak_ptr<bool>(alive_), id, keys,
                    now](std::vector<std::optional<std::uint64_t>> sizes) {
    if (auto a = alive.lock(); a && *a) found(id, keys, sizes, now);
  });
  return true;
}

void LookupSessions::found(std::uint64_t wait_id, std::span<const ChunkKey> keys,
                           const std::vector<std::optional<std::uint64_t>>& sizes, TimePoint now) {
  auto it = tier_waits_.find(wait_id);
  if (it == tier_waits_.end()) return;  // answered already: its deadline passed
  TierWait& w = it->second;
  const auto landed = [this, alive = std::weak_ptr<bool>(alive_), wait_id] {
    if (auto a = alive.lock(); a && *a) fetch_landed(wait_id);
  };
  const std::uint32_t ranks = w.lookup.req.world_size;
  std::size_t pending = 0;
  for (std::size_t k = 0; k + ranks <= keys.size(); k += ranks) {
    bool whole = true;
    for (std::uint32_t r = 0; r < ranks && whole; ++r) {
      const ChunkKey& key = keys[k + r];
      const auto size = k + r < sizes.size() ? sizes[k + r] : std::nullopt;
      if (!size && !store_.find(key) && !fetches_.pending(key)) {
        whole = false;
        break;
      }
      switch (fetches_.fetch(key, size.value_or(0), now, landed)) {
        case TierFetches::Fetch::in_l1: break;
        case TierFetches::Fetch::pending: ++pending; break;
        case TierFetches::Fetch::unavailable: whole = false; break;
      }
    }
    if (!whole) break;
    ++w.end;
  }
  w.waiting = pending;
  if (pending == 0) finish_tier_wait(wait_id, now);
}

void LookupSessions::fetch_landed(std::uint64_t wait_id) {
  auto it = tier_waits_.find(wait_id);
  if (it == tier_waits_.end() || --it->second.waiting > 0) return;
  finish_tier_wait(wait_id, Clock::now());
}

void LookupSessions::finish_tier_wait(std::uint64_t wait_id, TimePoint now) {
  auto it = tier_waits_.find(wait_id);
  if (it == tier_waits_.end()) return;
  TierWait w = std::move(it->second);
  tier_waits_.erase(it);
  InFlight::end(&in_flight_, w.ticket);
  // What landed is in L1 now (what did not is a miss): match and lock it.
  const wire::LookupRequest& req = w.lookup.req;
  std::uint32_t matched = w.first;
  while (matched < w.end && store_.match_chunk(req.ns, req.world_size, req.hashes[matched], now, w.lookup.holder))
    ++matched;
  tier_hits_ += matched - w.first;
  auto sink = w.sink.lock();
  answer(w.lookup, matched, sink.get(), now);
}

void LookupSessions::query(const wire::Frame& frame, ReplySink& sink) {
  wire::QueryPrefetchStatusRequest req;
  if (!reporter_.parse(frame, sink, req)) return;
  auto it = jobs_.find(req.job_id);
  if (it == jobs_.end())
    return reporter_.fail(frame, sink, errc::not_found,
                          fmt::format("prefetch job {} is unknown: its result was already reported, it expired after "
                                      "{} s without a poll, or it never existed; start a new LOOKUP",
                                      req.job_id, config_.job_ttl.count()));
  wire::PrefetchStatus st{it->second.state, it->second.matched};
  if (st.state == wire::PrefetchState::done) jobs_.erase(it);  // reported exactly once
  reply(sink, frame.header, st);
}

void LookupSessions::free_locks(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  wire::FreeLookupLocksRequest req;
  if (!reporter_.parse(frame, sink, req)) return;
  if (auto err = check_world_size(req.world_size)) return reporter_.fail(frame, sink, err);
  if (auto err = check_keys(req.hashes.size(), req.world_size)) return reporter_.fail(frame, sink, err);
  if (req.start > req.end || req.end > req.hashes.size())
    return reporter_.fail(frame, sink, errc::bad_request,
                          fmt::format("FREE_LOOKUP_LOCKS range [{}, {}) is not within the {} hashes given", req.start,
                                      req.end, req.hashes.size()));
  const SessionKey key{req.session_id, session.instance_id};
  const SlicedLoop range(req.end - req.start, req.world_size);
  run_sliced(session, sink, now,
             [this, req = std::move(req), key, header = frame.header, loop = range](
                 ReplySink& out, TimePoint, std::size_t& budget) mutable {
               auto it = sessions_.find(key);
               if (it != sessions_.end()) {
                 const store::Holder holder = it->second.holder;
                 if (!loop.run(budget, [&](std::size_t i, std::uint32_t r) {
                       store_.release_all(ChunkKey{req.ns, req.hashes[req.start + i], r}, holder);
                     }))
                   return false;
               }
               if (!header.is_one_way()) reply(out, header, wire::Empty{});
               return true;
             });
}

void LookupSessions::end_session(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now) {
  wire::EndSessionRequest req;
  if (!reporter_.parse(frame, sink, req)) return;
  // The session ends now (its locks are released slice by slice: an
  // aborted request's hits pin nothing); then its chunks are made most
  // recently used, at most max_keys_per_request of them.
  RequestSession ended;
  if (auto it = sessions_.find({req.session_id, session.instance_id}); it != sessions_.end()) {
    ended = std::move(it->second);
    sessions_.erase(it);
  }
  const std::uint32_t ws = ended.world_size;
  const std::size_t touched = std::min<std::size_t>(req.hashes.size(), max_keys_per_request / ws);
  run_sliced(session, sink, now,
             [this, req = std::move(req), ended = std::move(ended), header = frame.header, at = LockRelease{},
              touch = SlicedLoop(touched, ws)](ReplySink& out, TimePoint, std::size_t& budget) mutable {
               if (!release_locks(ended, at, budget)) return false;
               if (!touch.run(budget, [&](std::size_t i, std::uint32_t r) {
                     store_.touch(ChunkKey{req.ns, req.hashes[i], r});
                   }))
                 return false;
               if (!header.is_one_way()) reply(out, header, wire::Empty{});
               return true;
             });
}

}  // namespace kvlink::server
