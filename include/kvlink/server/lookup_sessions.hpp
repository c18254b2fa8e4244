// The lookups of engine requests (LOOKUP, SYNC_LOOKUP), the read locks
// they take on matched chunks and who releases them (FREE_LOOKUP_LOCKS,
// END_SESSION, a RETRIEVE, the scheduler leaving, the session TTL), and
// LOOKUP's prefetch jobs (QUERY_PREFETCH_STATUS).
//
// With a tier below L1, a lookup that misses L1 asks the tier for the
// chunks that follow: those it holds (every rank of a chunk) are fetched
// into L1 (TierFetches), and the lookup answers once they landed or
// config.l2_lookup_wait passed, with the prefix then in L1, locked as
// usual. SYNC_LOOKUP's reply waits for that (the connection's other
// requests do not: it is answered like a transfer, later); LOOKUP's job
// stays pending until then.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/server/config.hpp"
#include "kvlink/server/in_flight.hpp"
#include "kvlink/server/reporter.hpp"
#include "kvlink/server/session.hpp"
#include "kvlink/server/sliced_work.hpp"
#include "kvlink/server/status.hpp"
#include "kvlink/server/tier_fetches.hpp"
#include "kvlink/store/kv_store.hpp"

namespace kvlink::server {

class LookupSessions {
 public:
  LookupSessions(const ServerConfig& config, store::KvStore& store, Reporter& reporter, TrafficTotals& totals,
                 InFlight& in_flight, TierFetches& fetches)
      : config_(config),
        store_(store),
        reporter_(reporter),
        totals_(totals),
        in_flight_(in_flight),
        fetches_(fetches) {}
  ~LookupSessions() { *alive_ = false; }

  // LOOKUP (a job id to poll) or SYNC_LOOKUP (the match), sliced.
  void lookup(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now, bool sync);
  void query(const wire::Frame& frame, ReplySink& sink);
  void free_locks(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);
  void end_session(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);

  // Lookup sessions (and their locks) and prefetch jobs of `instance`: its
  // scheduler left or was reaped.
  void release_instance(std::uint64_t instance);
  // The locks the sessions `session_id` hold on (ns, hash, rank) keys: a
  // RETRIEVE of them ended, copied or not.
  void release_retrieved(std::uint64_t session_id, std::uint64_t ns, std::uint32_t rank,
                         std::span<const wire::ChunkHash> hashes);

  // Expires unpolled jobs and sessions past their TTL.
  void tick(TimePoint now);
  // The locks of sessions that ended without END_SESSION (their scheduler
  // disconnected or was reaped, or their TTL passed) are released a slice
  // at a time: release_ended() does the next slice and returns true once
  // none are left.
  bool release_ended(std::size_t budget = keys_per_slice);
  bool releasing() const { return !ended_.empty(); }

  std::size_t jobs() const { return jobs_.size(); }
  std::size_t sessions() const { return sessions_.size(); }
  // Lookups waiting for chunks from a tier.
  std::size_t tier_waits() const { return tier_waits_.size(); }
  // Chunks lookups matched that were not in L1 when asked (the tier's hits).
  std::uint64_t tier_hits() const { return tier_hits_; }

 private:
  // A prefetch job started by LOOKUP; reported once by QUERY_PREFETCH_STATUS.
  struct Job {
    std::uint64_t instance_id = 0;
    wire::PrefetchState state = wire::PrefetchState::done;
    std::uint32_t matched = 0;
    TimePoint expiry{};
  };
  // The lookups of one engine request on one scheduler instance. Its read
  // locks are held under `holder` (unique per session), so ending it, its
  // scheduler leaving or being reaped, and the worker's RETRIEVE release
  // exactly its locks and never another scheduler's.
  struct RequestSession {
    store::Holder holder = 0;
    TimePoint last_seen{};
    std::uint32_t world_size = 1;
    std::vector<std::pair<std::uint64_t, std::vector<wire::ChunkHash>>> locked;  // (ns, matched hashes)
  };
  // (session id, instance): ordered by session id, so a worker's RETRIEVE,
  // which knows the request but not its scheduler, finds the sessions.
  using SessionKey = std::pair<std::uint64_t, std::uint64_t>;
  using Sessions = std::map<SessionKey, RequestSession>;
  // Where releasing a session's recorded locks stands.
  struct LockRelease {
    std::size_t record = 0;
    SlicedLoop loop{0, 1};
    bool started = false;
  };

  // One LOOKUP or SYNC_LOOKUP, from its parse to its answer.
  struct Lookup {
    wire::LookupRequest req;
    SessionKey key;
    store::Holder holder = 0;
    wire::Header header;
    bool sync = true;
    std::uint64_t job_id = 0;  // LOOKUP's
  };
  // A lookup waiting for chunks from a tier (see the top of this file).
  struct TierWait {
    Lookup lookup;
    std::uint32_t first = 0;   // chunks matched (and locked) in L1 before the wait
    std::uint32_t end = 0;     // chunks past the last one asked of the tier
    std::size_t waiting = 0;   // fetches not landed yet
    TimePoint deadline{};
    std::weak_ptr<ReplySink> sink;
    InFlight::Ticket ticket;
  };

  // A lookup missed L1 at chunk `first`: asks the tier what it holds from
  // there (find), then fetches that. False when the tier takes nothing now
  // (answer at once); true when `w` was taken (it may be answered already).
  bool wait_for_tier(TierWait& w, const InFlight::ConnectionCount& conn, TimePoint now);
  // The tier's answer to the find: fetches the prefix it holds whole.
  void found(std::uint64_t wait_id, std::span<const store::ChunkKey> keys,
             const std::vector<std::optional<std::uint64_t>>& sizes, TimePoint now);
  void fetch_landed(std::uint64_t wait_id);
  // Matches from w.first on (locking), records and answers.
  void finish_tier_wait(std::uint64_t wait_id, TimePoint now);
  // The end of a lookup that matched `matched` chunks: counts, remembers
  // the locks, and answers SYNC_LOOKUP (into `sink`, if it still exists)
  // or completes LOOKUP's job.
  void answer(const Lookup& l, std::uint32_t matched, ReplySink* sink, TimePoint now);

  // Forgets the session; its locks are released by release_ended().
  Sessions::iterator forget(Sessions::iterator it);
  // Releases the locks of `s` recorded from `at` on, within `budget`; true once all are.
  bool release_locks(const RequestSession& s, LockRelease& at, std::size_t& budget);
  // A lookup finished: its locks are remembered for its session (or, if the
  // session ended meanwhile, released). Returns the chunks matched.
  std::uint32_t record_locks(const SessionKey& key, store::Holder holder, std::uint64_t ns,
                             std::uint32_t world_size, std::span<const wire::ChunkHash> hashes, std::uint32_t matched,
                             TimePoint now);

  const ServerConfig& config_;
  store::KvStore& store_;
  Reporter& reporter_;
  TrafficTotals& totals_;
  InFlight& in_flight_;
  TierFetches& fetches_;
  std::map<std::uint64_t, TierWait> tier_waits_;  // by id
  std::uint64_t next_wait_ = 1;
  std::uint64_t tier_hits_ = 0;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);  // fetch completions after destruction are dropped
  std::unordered_map<std::uint64_t, Job> jobs_;
  std::deque<std::uint64_t> job_queue_;  // job ids by expiry (the TTL is constant)
  std::uint64_t next_job_ = 1;
  Sessions sessions_;
  store::Holder next_holder_ = store::transfer_holder + 1;
  TimePoint next_session_scan_{};
  // Sessions ended by a disconnect, a reap or their TTL, with locks still
  // to release: a slice at a time, like a large request.
  std::deque<std::pair<RequestSession, LockRelease>> ended_;
};

}  // namespace kvlink::server
