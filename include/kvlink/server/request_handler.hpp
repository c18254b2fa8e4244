// The server's request handling, free of Asio (sans-io): it sees decoded
// frames and writes reply frames into a ReplySink. The Asio session feeds it
// from a socket; tests and the fuzzer feed it bytes directly.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/log_limiter.hpp"
#include "kvlink/server/config.hpp"
#include "kvlink/store/kv_store.hpp"
#include "kvlink/server/peer.hpp"
#include "kvlink/server/sliced_work.hpp"
#include "kvlink/server/status.hpp"
#include "kvlink/store/l1_pool.hpp"
#include "kvlink/transfer/transfer_engine.hpp"
#include "kvlink/unique_fd.hpp"
#include "kvlink/server/liveness.hpp"
#include "kvlink/wire/messages.hpp"

namespace kvlink::server {

// Where a session's replies go: frames are appended to buffer(), then
// flush() hands them to the transport. A reply sent later (when slow work
// completes) holds weak_self() and drops the reply if the session is gone.
class ReplySink {
 public:
  virtual wire::Bytes& buffer() = 0;
  virtual void flush() = 0;
  virtual std::weak_ptr<ReplySink> weak_self() = 0;

 protected:
  ~ReplySink() = default;
};

// Per-connection state the handler keeps.
struct SessionState {
  bool hello_done = false;
  wire::Role role = wire::Role::scheduler;
  std::uint64_t instance_id = 0;
  std::string client_name;
  Peer peer;  // set by the network layer when the connection is accepted
  bool counted = false;  // counted in the handler's per-instance connections (admins never are)
  // An admin connection (kvlink-cli): not an instance, never in the
  // liveness registry, cannot register, store or retrieve.
  bool admin() const { return hello_done && role == wire::Role::admin; }
  // File descriptors received on the connection (SCM_RIGHTS, unix sockets
  // only), oldest first. Each REGISTER_KV_CACHE takes the oldest (the
  // client sends the memfd with the frame's bytes, so it arrives no later
  // than the frame); the rest are closed when the session ends.
  std::deque<UniqueFd> received_fds;
  // Requests of this connection still being worked on (their copies run):
  // shared with the completions, which may outlive the session.
  std::shared_ptr<std::uint32_t> in_flight = std::make_shared<std::uint32_t>(0);
  // A request of this connection left half done after a slice (see
  // sliced_work.hpp): the network layer holds later frames and calls
  // RequestHandler::continue_work until it finishes.
  UnfinishedWork unfinished;
  // Bounds the warnings this connection can cause (malformed one-way
  // requests, refused HELLOs): a client cannot flood the log.
  LogLimiter log_limiter;
};

struct OpCounters {
  std::uint64_t requests = 0;
  std::uint64_t errors = 0;
};

struct ServerCounters {
  std::array<OpCounters, wire::max_opcode + 1> ops{};  // indexed by opcode
  std::uint64_t unknown_opcodes = 0;
  std::uint64_t protocol_errors = 0;  // malformed frames or messages
  std::uint64_t connections_accepted = 0;
  std::uint64_t connections_refused = 0;
  std::uint64_t connections_open = 0;
  // Limits and access control (each refusal is an error reply).
  std::uint64_t in_flight_refused = 0;    // requests beyond max_in_flight
  std::uint64_t instances_refused = 0;    // HELLOs beyond max_instances
  std::uint64_t auth_failures = 0;        // HELLOs with a missing or wrong token
  std::uint64_t instance_claims_refused = 0;  // HELLOs claiming an id bound to another client's secret
  std::uint64_t frames_too_large = 0;     // frames longer than max_payload (the connection is closed)
  // Slow readers (kept by the network layer).
  std::uint64_t reads_paused = 0;         // times a connection's reads stopped for its queued replies
  std::uint64_t connections_paused = 0;   // connections whose reads are stopped now
  std::uint64_t slow_reader_closes = 0;   // connections closed for not reading their replies
  // Frames still arriving (kept by the network layer, --max-inbound-bytes).
  std::uint64_t inbound_buffered_bytes = 0;  // their payloads, over all connections, now
  std::uint64_t inbound_refused = 0;         // frames refused for passing the limit (connection closed)
};

// True if `a` equals `b`; the time taken depends only on their lengths.
bool constant_time_equal(std::string_view a, std::string_view b);

// Appends a reply to request `req` carrying `msg`.
template <class Message>
void reply(ReplySink& sink, const wire::Header& req, const Message& msg) {
  wire::FrameBuilder(sink.buffer()).add(req.opcode, wire::flag::response, req.id,
                                        [&](wire::Writer& w) { wire::encode(w, msg); });
  sink.flush();
}

// Appends an error reply (code + message) to request `req`.
void reply_error(ReplySink& sink, const wire::Header& req, std::error_code code, std::string_view message);

// The transfer engine of handlers built without one (unit tests, fuzzing):
// completes at once and copies nothing (see NullTransferEngine).
transfer::TransferEngine& default_transfer_engine();

// Tensor-parallel sizes beyond this are refused as bad requests.
inline constexpr std::uint32_t max_world_size = 1024;

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

class RequestHandler {
 public:
  RequestHandler(const ServerConfig& config, std::uint64_t boot_id,
                 transfer::TransferEngine& engine = default_transfer_engine());
  ~RequestHandler();
  RequestHandler(const RequestHandler&) = delete;
  RequestHandler& operator=(const RequestHandler&) = delete;

  // Maps (and with l1_lock pins) L1 before the server says ready. Returns
  // "" or why the configured --l1-size cannot be served.
  std::string map_l1() { return pool_.map(config_.l1_lock); }

  // Handles one frame of a session at time `now`. Returns false when the
  // connection must be closed (after the replies already in the sink are sent).
  bool handle(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);

  // Runs the next slice of the session's unfinished request (replies into
  // `sink` when it finishes). Returns true once nothing is left.
  bool continue_work(SessionState& session, ReplySink& sink, TimePoint now);
  // The locks of sessions that ended without END_SESSION (their scheduler
  // disconnected or was reaped, or their TTL passed) are released a slice
  // at a time too: one slice is done at once, release_ended() does the
  // next and returns true once none are left.
  bool release_ended(std::size_t budget = keys_per_slice);
  bool releasing() const { return !ended_.empty(); }

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
  std::uint64_t begin_drain(TimePoint now, Duration timeout);
  // Appends the one-way SERVER_NOTICE{draining} frame to `sink`.
  void send_drain_notice(ReplySink& sink) const;
  // Whether to keep waiting: `replies_queued` is what the network layer
  // still has to write (a finished transfer's reply must leave before its
  // connection closes).
  DrainStep drain_step(TimePoint now, std::size_t replies_queued) const;
  bool draining() const { return draining_; }
  TimePoint drain_started() const { return drain_started_; }
  // STOREs and RETRIEVEs submitted to the engine and not yet completed.
  std::uint64_t transfers_in_flight() const { return transfers_in_flight_; }

  std::uint64_t boot_id() const { return boot_id_; }
  ServerCounters& counters() { return counters_; }
  const ServerCounters& counters() const { return counters_; }
  store::KvStore& store() { return store_; }
  std::size_t jobs() const { return jobs_.size(); }
  std::size_t sessions() const { return sessions_.size(); }
  std::size_t registrations() const { return registrations_.size(); }
  // L1 bytes one instance may hold (0: no quota), and as chunks of
  // `slot_bytes` (0: no quota).
  std::uint64_t quota_bytes() const;
  std::uint32_t quota_slots(std::uint64_t slot_bytes) const;
  // Which instances are alive; the store sets its release hook here.
  LivenessRegistry& liveness() { return liveness_; }

  // ---- admin plane ----
  // Every counter STATS shows, as (name, value).
  std::vector<wire::StatEntry> stats() const;
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
  const EventLog& events() const { return events_; }

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

  bool on_hello(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);
  // Lookup sessions (and their locks) and prefetch jobs of `instance`.
  void release_scheduler_state(std::uint64_t instance);
  // The instance was reaped: its scheduler state and its registration.
  void release_instance(std::uint64_t instance);
  // Refuse (reply with the error, return true) what this connection may not
  // do: an admin connection registers, unregisters, stores and retrieves
  // nothing (it is no instance); a draining server takes no new
  // REGISTER_KV_CACHE, STORE or RETRIEVE.
  bool refuse_admin(const SessionState& session, const wire::Frame& frame, ReplySink& sink);
  bool refuse_transfer(const SessionState& session, const wire::Frame& frame, ReplySink& sink);
  void on_stats(const wire::Frame& frame, ReplySink& sink);
  void on_register(SessionState& session, const wire::Frame& frame, ReplySink& sink, UniqueFd fd, TimePoint now);
  void on_lookup(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now, bool sync);
  void on_query(const wire::Frame& frame, ReplySink& sink);
  void on_free_locks(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);
  void on_end_session(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);
  void on_store(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);
  void on_retrieve(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);
  // Validates and submits a RETRIEVE; false after replying with the refusal.
  bool submit_retrieve(SessionState& session, const wire::Frame& frame, ReplySink& sink, wire::RetrieveRequest& req,
                       TimePoint now);
  template <class M>
  bool parse(const wire::Frame& frame, ReplySink& sink, M& msg, std::error_code code = errc::protocol_error);
  // "" if a registration of `instance_id` with chunks of `slot_bytes` can
  // be served next to the others, or why not.
  std::string check_layout(std::uint64_t instance_id, std::uint64_t slot_bytes) const;
  // The caller's registration, or null after replying with the error.
  std::shared_ptr<const transfer::Registration> registration_for(const SessionState& session, std::uint64_t ns,
                                                                 std::uint32_t kv_rank, std::size_t chunks,
                                                                 std::size_t block_ids, const wire::Frame& frame,
                                                                 ReplySink& sink);
  // Forgets the session; its locks are released by release_ended().
  Sessions::iterator end_session(Sessions::iterator it);
  // Where releasing a session's recorded locks stands.
  struct LockRelease {
    std::size_t record = 0;
    SlicedLoop loop{0, 1};
    bool started = false;
  };
  // Sessions ended by a disconnect, a reap or their TTL, with locks still
  // to release: a slice at a time, like a large request.
  std::deque<std::pair<RequestSession, LockRelease>> ended_;
  // Releases the locks of `s` recorded from `at` on, within `budget`; true once all are.
  bool release_locks(const RequestSession& s, LockRelease& at, std::size_t& budget);
  // Runs the first slice of `work`; what is left becomes session.unfinished.
  void run_sliced(SessionState& session, ReplySink& sink, TimePoint now, UnfinishedWork work);
  // A lookup finished: its locks are remembered for its session (or, if the
  // session ended meanwhile, released). Returns the chunks matched.
  std::uint32_t record_locks(const SessionKey& key, store::Holder holder, std::uint64_t ns,
                             std::uint32_t world_size, std::span<const wire::ChunkHash> hashes, std::uint32_t matched,
                             TimePoint now);
  // The locks the sessions `session_id` hold on (ns, hash, rank) keys: a
  // RETRIEVE of them ended, copied or not.
  void release_retrieved(std::uint64_t session_id, std::uint64_t ns, std::uint32_t rank,
                         std::span<const wire::ChunkHash> hashes);
  void fail(const wire::Frame& frame, ReplySink& sink, std::error_code code, std::string_view message);
  // A warning caused by the session's client, through its log limiter:
  // held back past its share, summarised once its window ended (and at
  // the session's end).
  void warn(SessionState& session, TimePoint now, std::string_view line);
  // A refusal: warned through the session's limiter, and an event.
  void refused(SessionState& session, TimePoint now, std::string line);
  void report_held_back(SessionState& session, TimePoint now, bool final);
  // The session and time of the frame handle() works on (fail() logs with them).
  SessionState* turn_session_ = nullptr;
  TimePoint turn_now_{};
  TimePoint reap_now_{};  // of the tick that reaps (release_instance)

  const ServerConfig& config_;
  std::uint64_t boot_id_;
  ServerCounters counters_;
  LivenessRegistry liveness_;
  transfer::TransferEngine& engine_;
  store::L1Pool pool_;
  store::KvStore store_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);  // completions after destruction are dropped
  std::unordered_map<std::uint64_t, std::shared_ptr<const transfer::Registration>> registrations_;
  std::unordered_map<std::uint64_t, std::uint32_t> connections_;  // per instance id
  // What the server knows of each instance until it is forgotten (left,
  // or reaped).
  struct Instance {
    std::string secret;  // its first HELLO's: other clients cannot claim its id
    std::string label;   // "pid 1234 uid 1000 (client name)", for the log
    wire::Role role = wire::Role::scheduler;
    std::string client;
    Peer peer;
    std::uint32_t transfers_in_flight = 0;
  };
  std::unordered_map<std::uint64_t, Instance> instances_;
  // A STORE or RETRIEVE of `instance` was submitted to the engine / ended.
  void transfer_started(std::uint64_t instance);
  void transfer_ended(std::uint64_t instance, std::uint8_t opcode, Duration took);
  // Logs `line` at info and records it as an event of `instance`.
  void event(ServerEvent::Kind kind, std::uint64_t instance, TimePoint now, std::string line);
  EventLog events_;
  TrafficTotals totals_;
  std::unordered_map<std::uint64_t, Job> jobs_;
  std::deque<std::uint64_t> job_queue_;  // job ids by expiry (the TTL is constant)
  std::uint64_t next_job_ = 1;
  Sessions sessions_;
  store::Holder next_holder_ = store::transfer_holder + 1;
  TimePoint next_session_scan_{};
  std::uint64_t block_reports_ = 0;
  std::uint64_t engine_blocks_allocated_ = 0;
  std::uint64_t engine_blocks_total_ = 0;
  std::uint64_t transfer_failures_ = 0;
  std::uint64_t transfers_fenced_ = 0;  // not done before their fence (timed_out)
  std::uint64_t transfers_refused_data_path_ = 0;  // refused at once: the engine's fault()
  std::uint64_t transfers_in_flight_ = 0;
  bool draining_ = false;
  TimePoint drain_started_{};
  TimePoint drain_deadline_{};
  // Counts a failed copy and replies with what the engine should know.
  void copy_failed(const wire::Header& header, std::error_code ec, ReplySink& sink, std::string_view consequence);
};

}  // namespace kvlink::server
