// The data path's requests: KV-cache registrations (REGISTER_KV_CACHE,
// UNREGISTER_KV_CACHE), the copies between L1 and an engine's KV cache
// (STORE, RETRIEVE) and a planned restart's drain, which refuses new
// transfers and waits for those in flight.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/server/config.hpp"
#include "kvlink/server/in_flight.hpp"
#include "kvlink/server/liveness.hpp"
#include "kvlink/server/lookup_sessions.hpp"
#include "kvlink/server/reporter.hpp"
#include "kvlink/server/session.hpp"
#include "kvlink/server/status.hpp"
#include "kvlink/server/tier_chain.hpp"
#include "kvlink/store/kv_store.hpp"
#include "kvlink/store/l1_pool.hpp"
#include "kvlink/transfer/transfer_engine.hpp"
#include "kvlink/unique_fd.hpp"

namespace kvlink::server {

// Where a planned restart's drain stands (RequestHandler::drain_step).
enum class DrainStep : std::uint8_t {
  wait,       // transfers in flight or replies queued, and time left
  drained,    // nothing in flight, every reply sent: close the connections
  timed_out,  // the drain timeout passed first: close them anyway
};

// What draining clients are told (SERVER_NOTICE), and the refusals' reason.
inline constexpr std::string_view drain_message =
    "the server is draining for a planned restart: it takes no new STORE, RETRIEVE or REGISTER_KV_CACHE, "
    "transfers in flight finish; reconnect to its replacement (the same endpoint) and register there";

class Transfers {
 public:
  // What the transfers need of the rest of the server; all outlive it.
  struct Parts {
    const ServerConfig& config;
    transfer::TransferEngine& engine;
    store::L1Pool& pool;
    store::KvStore& store;
    LivenessRegistry& liveness;
    Reporter& reporter;
    InFlight& in_flight;
    LookupSessions& lookups;  // a RETRIEVE ends its lookups' locks
    TrafficTotals& totals;
  };
  explicit Transfers(Parts parts) : p_(parts) {}
  ~Transfers() { *alive_ = false; }
  Transfers(const Transfers&) = delete;
  Transfers& operator=(const Transfers&) = delete;

  // Refuse (reply with the error, return true) what this connection may not
  // do: an admin connection registers, unregisters, stores and retrieves
  // nothing (it is no instance); a draining server takes no new
  // REGISTER_KV_CACHE, STORE or RETRIEVE.
  bool refuse_admin(const SessionState& session, const wire::Frame& frame, ReplySink& sink);
  bool refuse_transfer(const SessionState& session, const wire::Frame& frame, ReplySink& sink);

  // `fd`: the memfd received with the frame, if any.
  void register_cache(SessionState& session, const wire::Frame& frame, ReplySink& sink, UniqueFd fd, TimePoint now);
  void unregister(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);
  // Submit the copy; the reply goes out when it completes.
  void store(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);
  void retrieve(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);

  // The tiers below L1: every chunk a STORE committed is offered to them
  // (those that write through take it).
  void set_tiers(TierChain* tiers) { tiers_ = tiers; }

  // ---- registrations ----
  bool registered(std::uint64_t instance) const { return registrations_.contains(instance); }
  // The instance is forgotten: its registration goes (a no-op if none).
  void drop(std::uint64_t instance) { registrations_.erase(instance); }
  std::size_t registrations() const { return registrations_.size(); }
  // Why the instance's data path is down; "" if it works or it has no registration.
  std::string data_path_error(std::uint64_t instance) const;
  // Registrations whose data path is down (their transfers are refused).
  std::uint64_t data_paths_down() const;
  // The instance's registration as the status page shows it.
  std::optional<InstanceStatus::Registration> registration_status(std::uint64_t instance) const;
  // Each namespace's model, from the registrations in it, into `namespaces`.
  void name_models(std::vector<NamespaceStatus>& namespaces) const;

  // L1 bytes one instance may hold (0: no quota), and as chunks of
  // `slot_bytes` (0: no quota).
  std::uint64_t quota_bytes() const;
  std::uint32_t quota_slots(std::uint64_t slot_bytes) const;

  // ---- planned restart ----
  // From now on STORE, RETRIEVE and REGISTER_KV_CACHE are refused; the
  // drain ends when nothing is in flight or `timeout` passed. Returns the
  // transfers in flight. Idempotent.
  std::uint64_t begin_drain(TimePoint now, Duration timeout);
  DrainStep drain_step(TimePoint now, std::size_t replies_queued) const;
  bool draining() const { return draining_; }
  TimePoint drain_started() const { return drain_started_; }

  // ---- counters for STATS ----
  std::uint64_t failures() const { return failures_; }
  std::uint64_t fenced() const { return fenced_; }
  std::uint64_t refused_data_path() const { return refused_data_path_; }

 private:
  // bad_request unless a registration of `instance_id` with chunks of
  // `slot_bytes` can be served next to the others.
  Error check_layout(std::uint64_t instance_id, std::uint64_t slot_bytes) const;
  // The caller's registration, or null after replying with the error.
  std::shared_ptr<const transfer::Registration> registration_for(const SessionState& session, std::uint64_t ns,
                                                                 std::uint32_t kv_rank, std::size_t chunks,
                                                                 std::size_t block_ids, const wire::Frame& frame,
                                                                 ReplySink& sink);
  // Validates and submits a RETRIEVE; false after replying with the refusal.
  bool submit_retrieve(SessionState& session, const wire::Frame& frame, ReplySink& sink, wire::RetrieveRequest& req,
                       TimePoint now);
  // Counts a failed copy and replies with what the engine should know.
  void copy_failed(const wire::Header& header, std::error_code ec, ReplySink& sink, std::string_view consequence);

  Parts p_;
  TierChain* tiers_ = nullptr;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);  // completions after destruction are dropped
  std::unordered_map<std::uint64_t, std::shared_ptr<const transfer::Registration>> registrations_;
  std::uint64_t failures_ = 0;
  std::uint64_t fenced_ = 0;             // not done before their fence (timed_out)
  std::uint64_t refused_data_path_ = 0;  // refused at once: the engine's fault()
  bool draining_ = false;
  TimePoint drain_started_{};
  TimePoint drain_deadline_{};
};

}  // namespace kvlink::server
