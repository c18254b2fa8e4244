// The server's request handling, free of Asio (sans-io): it sees decoded
// frames and writes reply frames into a ReplySink. The Asio session feeds it
// from a socket; tests and the fuzzer feed it bytes directly.
//
// RequestHandler is the dispatcher: it checks what every request must pass
// (HELLO first, --max-in-flight, liveness) and routes each frame by opcode
// to the part that does the job: Handshake (HELLO, instances, reaping),
// LookupSessions (lookups, their locks, prefetch jobs), Transfers
// (registrations, STORE, RETRIEVE, the drain); STATS reads a StatsTable.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/server/config.hpp"
#include "kvlink/server/handshake.hpp"
#include "kvlink/server/in_flight.hpp"
#include "kvlink/server/liveness.hpp"
#include "kvlink/server/lookup_sessions.hpp"
#include "kvlink/server/reporter.hpp"
#include "kvlink/server/request_limits.hpp"
#include "kvlink/server/server_counters.hpp"
#include "kvlink/server/session.hpp"
#include "kvlink/server/sliced_work.hpp"
#include "kvlink/server/stats_table.hpp"
#include "kvlink/server/status.hpp"
#include "kvlink/server/tier_chain.hpp"
#include "kvlink/server/tier_fetches.hpp"
#include "kvlink/server/transfers.hpp"
#include "kvlink/store/kv_store.hpp"
#include "kvlink/store/l1_pool.hpp"
#include "kvlink/transfer/transfer_engine.hpp"
#include "kvlink/wire/messages.hpp"

namespace kvlink::server {

// The transfer engine of handlers built without one (unit tests, fuzzing):
// completes at once and copies nothing (see NullTransferEngine).
transfer::TransferEngine& default_transfer_engine();

class RequestHandler {
 public:
  RequestHandler(const ServerConfig& config, std::uint64_t boot_id,
                 transfer::TransferEngine& engine = default_transfer_engine());
  RequestHandler(const RequestHandler&) = delete;
  RequestHandler& operator=(const RequestHandler&) = delete;

  // Maps (and with l1_lock pins) L1 before the server says ready, or says
  // why the configured --l1-size cannot be served.
  Error map_l1() { return pool_.map(config_.l1_lock); }

  // A tier below L1, after those attached before (the disk, then a
  // cluster), set before the first request; it must outlive the handler's
  // use of it. L1's evictions and/or every store are written to it (its
  // write_back / write_through), lookups that miss L1 fetch from it, and
  // STATS shows it as NAME_* rows.
  void attach_tier(TierChain::Member tier);

  // Handles one frame of a session at time `now`. Returns false when the
  // connection must be closed (after the replies already in the sink are sent).
  bool handle(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);

  // Runs the next slice of the session's unfinished request (replies into
  // `sink` when it finishes). Returns true once nothing is left.
  bool continue_work(SessionState& session, ReplySink& sink, TimePoint now) {
    return server::continue_work(session, sink, now);
  }
  // The locks of sessions that ended without END_SESSION (their scheduler
  // disconnected or was reaped, or their TTL passed) are released a slice
  // at a time too: one slice is done at once, release_ended() does the
  // next and returns true once none are left.
  bool release_ended(std::size_t budget = keys_per_slice) { return lookups_.release_ended(budget); }
  bool releasing() const { return lookups_.releasing(); }

  // The session's connection ended (closed by either side).
  void on_session_end(SessionState& session, TimePoint now);

  // Called periodically (every tick_interval) for timed housekeeping.
  void tick(TimePoint now);
  static constexpr std::chrono::milliseconds tick_interval{100};

  // ---- planned restart ----
  // The network layer stopped accepting: from now on STORE, RETRIEVE and
  // REGISTER_KV_CACHE are refused (shutting_down), HELLO says draining.
  // The drain ends when nothing is in flight or `timeout` passed.
  // Returns the transfers in flight. Idempotent.
  std::uint64_t begin_drain(TimePoint now, Duration timeout) { return transfers_.begin_drain(now, timeout); }
  // Appends the one-way SERVER_NOTICE{draining} frame to `sink`.
  void send_drain_notice(ReplySink& sink) const;
  // Whether to keep waiting: `replies_queued` is what the network layer
  // still has to write (a finished transfer's reply must leave before its
  // connection closes).
  DrainStep drain_step(TimePoint now, std::size_t replies_queued) const {
    return transfers_.drain_step(now, replies_queued);
  }
  bool draining() const { return transfers_.draining(); }
  TimePoint drain_started() const { return transfers_.drain_started(); }
  // STOREs and RETRIEVEs submitted to the engine and not yet completed.
  std::uint64_t transfers_in_flight() const { return in_flight_.total(); }

  std::uint64_t boot_id() const { return handshake_.boot_id(); }
  ServerCounters& counters() { return counters_; }
  const ServerCounters& counters() const { return counters_; }
  store::KvStore& store() { return store_; }
  std::size_t jobs() const { return lookups_.jobs(); }
  std::size_t sessions() const { return lookups_.sessions(); }
  std::size_t registrations() const { return transfers_.registrations(); }
  // L1 bytes one instance may hold (0: no quota), and as chunks of
  // `slot_bytes` (0: no quota).
  std::uint64_t quota_bytes() const { return transfers_.quota_bytes(); }
  std::uint32_t quota_slots(std::uint64_t slot_bytes) const { return transfers_.quota_slots(slot_bytes); }
  // Which instances are alive; the store sets its release hook here.
  LivenessRegistry& liveness() { return liveness_; }

  // ---- admin plane ----
  // Every counter STATS shows, as (name, value).
  std::vector<wire::StatEntry> stats() const { return stats_.read(); }
  // Fills the handler's part of `out` (see ServerStatus) at `now`.
  void status(ServerStatus& out, TimePoint now) const;
  // A request of `opcode` took `d` from receipt to reply. The network
  // layer reports the requests answered inline; the handler itself those
  // answered when their copy completes (STORE, RETRIEVE).
  void observe_latency(std::uint8_t opcode, Duration d) {
    if (opcode <= wire::max_opcode) totals_.latency[opcode].observe(d);
  }
  // Whether a request of `opcode` is answered when its copy completes.
  static bool replies_later(std::uint8_t opcode) {
    return opcode == static_cast<std::uint8_t>(wire::Opcode::store) ||
           opcode == static_cast<std::uint8_t>(wire::Opcode::retrieve);
  }
  const EventLog& events() const { return reporter_.events(); }

 private:
  // The requests no part owns: small, and about the server as a whole.
  bool on_ping(SessionState& session, const wire::Frame& frame, ReplySink& sink, bool known);
  void on_report_block_allocation(const wire::Frame& frame, ReplySink& sink);
  void on_clear(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);
  // The rows of STATS, in the order they are shown.
  void fill_stats_table();
  void add_tier_stats(const std::string& name, const store::LowerTier& tier);

  const ServerConfig& config_;
  ServerCounters counters_;
  TrafficTotals totals_;
  Reporter reporter_{counters_};
  LivenessRegistry liveness_;
  store::L1Pool pool_;
  store::KvStore store_;
  InFlight in_flight_;
  TierChain tiers_;
  TierFetches fetches_{store_};
  LookupSessions lookups_;
  Transfers transfers_;
  Handshake handshake_;
  StatsTable stats_;
  // What engines last said of their own KV cache (REPORT_BLOCK_ALLOCATION).
  std::uint64_t block_reports_ = 0;
  std::uint64_t engine_blocks_allocated_ = 0;
  std::uint64_t engine_blocks_total_ = 0;
};

}  // namespace kvlink::server
