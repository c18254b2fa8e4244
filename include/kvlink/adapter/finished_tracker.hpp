// get_finished bookkeeping of the worker adapter as pure logic (no Asio, no
// clock): which engine requests finished storing or retrieving, and which
// engine blocks failed to load.
//
// Rules (SPEC section 7). Reports are deduplicated, transfers are not: an
// id's transfers in one direction form a round, from the first one started
// after the id's previous report in that direction to the report that ends
// it. A new store or retrieve of an id that was already reported (vLLM loads
// a preempted request again under its id) opens a new round, reported again.
// - A store round is reported when the server finished every store of it
//   AND the engine reported the id finished after those stores started AND
//   no retrieve of the id is pending (the engine frees the request's blocks
//   on that report). A store started after the engine's report waits for a
//   new report: the earlier one was about the request's previous life.
// - A retrieve round is reported when the server finished (or failed) every
//   retrieve of it; a failed retrieve's blocks go to the load-error set.
// - The engine repeating a finished id with no new transfer since changes
//   nothing: no round of the id is open.
// - Unhealthy drain: every pending store counts as finished by the server;
//   every pending retrieve is reported finished with its blocks in the
//   load-error set; an id reported as a finished retrieve in that call has
//   its store round ended there too, unreported (the engine must not see
//   both for one id in one call).
// - Server completions of drained operations are ignored (tickets).
// - Fences: a transfer that was sent may still be copied by the server until
//   its fence (the server checks it, see wire::StoreRequest). A transfer that
//   ended without the server's answer (deadline, lost connection) and
//   pending transfers in a drain are finished only once that cannot happen
//   any more: the fence passed, or the server answering now is a different
//   process (boot id) from the one the transfer was sent to. Reporting them
//   earlier would let the engine reuse blocks that a stopped server, once
//   resumed, still reads (storing wrong KV under the request's keys) or
//   writes.
//
// Memory is bounded by the ids with a transfer in flight or a round not yet
// reported: an id's record is dropped as soon as neither holds, and nothing
// is remembered after that (a repeated engine report finds no open round, so
// no history is needed to ignore it). forget(id) drops every record of an id
// at once.
#pragma once

#include <cstdint>
#include "kvlink/clock.hpp"
#include <set>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

namespace kvlink::adapter {

// Where a sent transfer went: until when the server may touch its blocks,
// and the boot id of that server. The default: not sent.
struct SentTransfer {
  TimePoint fence = TimePoint::min();
  std::uint64_t boot_id = 0;
};

// What get_finished knows of the present: the time, and the boot id of the
// server the adapter is healthily connected to (0: none).
struct LinkNow {
  TimePoint now;
  std::uint64_t boot_id = 0;
};

class GetFinishedTracker {
 public:
  using Ticket = std::uint64_t;
  struct Finished {
    std::vector<std::string> stores;
    std::vector<std::string> retrieves;
  };

  using Sent = SentTransfer;
  using Present = LinkNow;

  // A store of `id` was started (sent, or decided without sending).
  Ticket store_started(const std::string& id, Sent sent = {});
  // The server answered it (success or error), or it was never sent.
  void store_done(Ticket t);
  // It ended without the server's answer: finished once its fence is safe.
  void store_unanswered(Ticket t);

  // A retrieve of `id` into `blocks` was started.
  Ticket retrieve_started(const std::string& id, std::span<const std::uint32_t> blocks, Sent sent = {});
  // The server answered it, or it was never sent; on failure its blocks
  // become load errors.
  void retrieve_done(Ticket t, bool ok);
  // It ended without the server's answer: failed, finished once safe.
  void retrieve_unanswered(Ticket t);

  // The engine's finished request ids for this step; `unhealthy` drains.
  Finished get_finished(std::span<const std::string> engine_finished, bool unhealthy, Present present);

  // Block ids whose load failed since the last call (sorted, unique).
  std::vector<std::uint32_t> take_load_errors();
  // Load errors so far, without clearing them.
  const std::set<std::uint32_t>& load_errors() const { return load_errors_; }

  std::size_t pending_stores() const { return stores_.size(); }
  std::size_t pending_retrieves() const { return retrieves_.size(); }
  // Ids with a transfer in flight or a round not reported yet.
  std::size_t live_requests() const { return requests_.size(); }
  // Drops every record of `id` (it will never be reported).
  void forget(const std::string& id);

 private:
  struct PendingStore {
    std::string id;
    Sent sent;
    bool unanswered = false;
  };
  struct PendingRetrieve {
    std::string id;
    std::vector<std::uint32_t> blocks;
    Sent sent;
    bool unanswered = false;
  };
  // The server can no longer touch this transfer's blocks.
  static bool safe(const Sent& s, const Present& p) {
    return s.fence <= p.now || (s.boot_id != 0 && p.boot_id != 0 && s.boot_id != p.boot_id);
  }
  struct Request {
    int stores_in_flight = 0;
    int retrieves_in_flight = 0;
    bool store_round = false;      // a store started since the id's last store report
    bool engine_finished = false;  // the engine reported the id after the round's last store started
    bool retrieve_round = false;   // a retrieve started since the id's last retrieve report
    bool idle() const { return stores_in_flight == 0 && retrieves_in_flight == 0 && !store_round && !retrieve_round; }
  };

  Ticket next_ = 1;
  std::unordered_map<Ticket, PendingStore> stores_;
  std::unordered_map<Ticket, PendingRetrieve> retrieves_;
  std::unordered_map<std::string, Request> requests_;  // only non-idle ones
  std::set<std::uint32_t> load_errors_;
};

}  // namespace kvlink::adapter
