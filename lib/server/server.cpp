#include "kvlink/server/server.hpp"

#include <grp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/steady_timer.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <cstring>
#include <functional>
#include <list>
#include <optional>
#include <random>
#include <stdexcept>

#include "kvlink/clock.hpp"
#include "kvlink/log.hpp"
#include "kvlink/net/endpoint.hpp"
#include "kvlink/server/admin_http.hpp"
#include "kvlink/server/inbound_budget.hpp"
#include "net/frame_stream.hpp"
#include "store/cluster_tier.hpp"
#include "store/disk_tier.hpp"

namespace kvlink::server {

namespace {

// One client connection.
struct Session final : ReplySink, std::enable_shared_from_this<Session> {
  explicit Session(net::Socket socket, std::uint32_t max_payload) : stream(std::move(socket), max_payload) {}
  wire::Bytes& buffer() override { return stream.out_buffer(); }
  void flush() override { stream.schedule_flush(shared_from_this()); }
  std::weak_ptr<ReplySink> weak_self() override { return std::static_pointer_cast<ReplySink>(shared_from_this()); }

  net::FrameStream stream;
  SessionState state;
  bool unix_socket = false;
  bool fd_reads = false;
  bool handler_closed = false;  // the handler asked to close (its error reply is queued)
  // The request left unfinished (sliced): its opcode and when it came.
  std::uint8_t unfinished_opcode = 0;
  TimePoint unfinished_since{};
  InboundBudget::Claim inbound;  // of the server's --max-inbound-bytes
  bool inbound_refused = false;  // a frame was refused for it (the stream ended)

  // Workers pass their KV cache's memfd with REGISTER_KV_CACHE, so once a
  // worker's HELLO is handled its reads collect fds (recvmsg). Schedulers
  // and admins keep Asio's plain reads: their PINGs and lookups are the
  // latency-critical path. A worker sends REGISTER only after HELLO's reply
  // (net::connect awaits it), so no fd can reach a plain read.
  void after_frame() {
    if (unix_socket && !fd_reads && state.hello_done && state.role == wire::Role::worker) {
      fd_reads = true;
      stream.receive_fds_into(&state.received_fds);
    }
  }
};

// True if something accepts connections on the unix socket at `path`.
bool unix_socket_in_use(const std::string& path) {
  asio::io_context probe;
  asio::local::stream_protocol::socket s(probe);
  std::error_code ec;
  s.connect(asio::local::stream_protocol::endpoint(path), ec);
  return !ec;
}

// The group id of `name`; throws with a clear message if there is none.
gid_t group_id(const std::string& name) {
  std::vector<char> buf(16384);
  group g{};
  group* found = nullptr;
  const int rc = ::getgrnam_r(name.c_str(), &g, buf.data(), buf.size(), &found);
  if (rc != 0 || found == nullptr)
    throw std::runtime_error(fmt::format("--unix-group '{}': no such group{}; create it (groupadd) or name an "
                                         "existing one",
                                         name, rc != 0 ? fmt::format(" ({})", std::strerror(rc)) : ""));
  return g.gr_gid;
}

}  // namespace

Error check_access(const ServerConfig& config) {
  if (!config.auth_token.empty()) return {};
  for (const auto& text : config.listen) {
    auto ep = net::parse_endpoint(text);
    if (!ep) continue;  // start() reports it
    if (!ep->is_loopback())
      return Error(errc::unauthorized,
                   fmt::format("{} is not a loopback address: anyone who can reach it could connect, so it needs a "
                               "shared secret; give --auth-token-file PATH or set KVLINK_AUTH_TOKEN",
                               text));
  }
  return {};
}

struct Server::Impl {
  Impl(asio::io_context& io, ServerConfig cfg, transfer::TransferEngine& engine)
      : io(io), config(std::move(cfg)), handler(config, random_boot_id(), engine), inbound(inbound_limit(config)) {}

  asio::io_context& io;
  ServerConfig config;
  RequestHandler handler;
  // The disk tier (--l2-disk), after the handler: it goes first, and no
  // completion reaches the handler after. Its completions wake disk_loop.
  std::unique_ptr<store::DiskTier> disk;
  std::optional<asio::posix::stream_descriptor> disk_events;
  void open_disk_tier();
  // The shared tier (--l2-redis-cluster), after the disk: it answers lookups
  // for what the disk does not hold.
  std::unique_ptr<store::ClusterTier> cluster;
  void open_cluster_tier();
  asio::awaitable<void> disk_loop();
  InboundBudget inbound;
  std::list<net::Acceptor> acceptors;
  std::vector<std::string> bound;  // the endpoints actually bound (Server::endpoints())
  std::vector<std::string> unix_paths;
  std::list<std::weak_ptr<Session>> sessions;
  bool stopped = false;
  // The admin plane (--http): a snapshot published every publish_interval.
  std::unique_ptr<AdminHttp> admin;
  StatusHistory history;
  WallClock::time_point started_at = WallClock::now();
  TimePoint next_publish{};
  static constexpr std::chrono::milliseconds publish_interval{250};
  void publish(TimePoint now);

  asio::awaitable<void> accept_loop(net::Acceptor& acceptor, std::string name);
  asio::awaitable<void> serve(std::shared_ptr<Session> session);
  void continue_work(std::shared_ptr<Session> session);
  void continue_releasing();
  bool releasing_posted = false;
  Error admit_inbound(Session& session, std::uint32_t pending_payload);
  void release_inbound(Session& session) {
    inbound.release(session.inbound);
    handler.counters().inbound_buffered_bytes = inbound.held();
  }
  asio::awaitable<void> tick_loop();
  asio::awaitable<void> drain_loop(std::function<void(const DrainReport&)> done);
  void stop_accepting();
  void stop();
  // Reply bytes the sessions still have to write.
  std::size_t replies_queued() const {
    std::size_t n = 0;
    for (const auto& w : sessions)
      if (auto s = w.lock(); s && s->stream.is_open()) n += s->stream.queued_bytes();
    return n;
  }
  std::size_t open_sessions() const {
    std::size_t n = 0;
    for (const auto& w : sessions)
      if (auto s = w.lock(); s && s->stream.is_open()) ++n;
    return n;
  }
};

void Server::Impl::open_disk_tier() {
  if (config.l2_disk.empty()) return;
  store::DiskTierConfig d;
  d.dir = config.l2_disk;
  d.capacity_bytes = config.l2_disk_size;
  d.layouts = config.l2_disk_layouts;
  d.max_write_bytes_in_flight = config.l2_max_write_bytes;
  d.max_read_bytes_in_flight = config.l2_max_read_bytes;
  d.health.op_deadline = config.l2_io_deadline;
  auto opened = store::DiskTier::open(d, std::random_device{}(), Clock::now());
  if (!opened) throw std::runtime_error(fmt::format("--l2-disk {}: {}", config.l2_disk, opened.error().message()));
  disk = std::move(*opened);
  const auto& st = disk->startup();
  log::info("kvlink-server: disk tier {}: {} chunks found again in {} ms ({} torn or corrupt journal records, {} "
            "unfinished writes, {} past a file's end dropped){}; {} I/O",
            config.l2_disk, disk->index().present(),
            std::chrono::duration_cast<std::chrono::milliseconds>(st.took).count(), st.recovery.corrupt_records,
            st.recovery.incomplete_writes, st.truncated_dropped,
            st.journal_unusable ? "; its journal did not fit --l2-disk-size, so it started empty" : "",
            disk->direct() ? "O_DIRECT" : "buffered (the filesystem refuses O_DIRECT)");
  handler.attach_tier({disk.get(), "disk", true, config.l2_write_through});
  const int fd = ::dup(disk->event_fd());
  if (fd < 0) throw std::runtime_error(fmt::format("--l2-disk {}: dup: {}", config.l2_disk, std::strerror(errno)));
  disk_events.emplace(io, fd);
  asio::co_spawn(io, disk_loop(), asio::detached);
}

void Server::Impl::open_cluster_tier() {
  if (config.l2_redis_cluster.empty()) return;
  store::ClusterTierConfig c;
  for (const auto& text : config.l2_redis_cluster) {
    auto node = store::parse_cluster_node(text);
    if (!node) throw std::runtime_error("--l2-redis-cluster: " + node.error().message());
    c.cluster.seeds.push_back(std::move(*node));
  }
  c.cluster.password = config.l2_redis_password;
  c.command_deadline = config.l2_redis_deadline;
  c.cluster.health.interval = config.l2_redis_ping;
  c.cluster.health.ping_timeout = config.l2_redis_ping;
  c.ttl = config.l2_redis_ttl;
  c.max_write_bytes_in_flight = config.l2_max_write_bytes;
  c.max_read_bytes_in_flight = config.l2_max_read_bytes;
  cluster = std::make_unique<store::ClusterTier>(io.get_executor(), c);
  // Not waited for: the server serves from L1 (and disk) until the cluster
  // answers, and tick() keeps asking.
  const std::string seeds = fmt::format("{}", fmt::join(config.l2_redis_cluster, ","));
  cluster->start([this, seeds](const Error& err) {
    if (err) log::warn("kvlink-server: redis cluster {}: {}; serving without it, asking again every second", seeds,
                       err.message());
    else log::info("kvlink-server: redis cluster {}: {} masters serve its slots", seeds,
                   cluster->client().slots().masters().size());
  });
  handler.attach_tier({cluster.get(), "cluster", config.l2_redis_write_back, true});
}

asio::awaitable<void> Server::Impl::disk_loop() {
  while (!stopped) {
    auto [ec] = co_await disk_events->async_wait(asio::posix::descriptor_base::wait_read,
                                                 asio::experimental::as_tuple(asio::use_awaitable));
    if (ec || stopped) co_return;
    disk->on_ready(Clock::now());
  }
}

// Drives the handler's timed housekeeping (TTLs, reaping) on the io thread.
asio::awaitable<void> Server::Impl::tick_loop() {
  asio::steady_timer timer(io);
  while (!stopped) {
    timer.expires_after(RequestHandler::tick_interval);
    auto [ec] = co_await timer.async_wait(asio::experimental::as_tuple(asio::use_awaitable));
    if (ec || stopped) co_return;
    const TimePoint now = Clock::now();
    handler.tick(now);
    continue_releasing();
    if (admin && now >= next_publish) publish(now);
  }
}

void Server::Impl::publish(TimePoint now) {
  next_publish = now + publish_interval;
  auto s = std::make_shared<ServerStatus>();
  s->boot_id = handler.boot_id();
  s->listeners = bound;
  s->transfer_engine = config.transfer_engine_summary;
  s->ready = !stopped;
  s->started_at = started_at;
  s->taken_at = WallClock::now();
  s->taken_steady = now;
  handler.status(*s, now);
  history.update(*s, now);
  admin->publish(std::move(s));
}

asio::awaitable<void> Server::Impl::accept_loop(net::Acceptor& acceptor, std::string name) {
  for (;;) {
    auto [ec, socket] = co_await acceptor.async_accept(asio::experimental::as_tuple(asio::use_awaitable));
    if (ec) {
      if (ec == asio::error::operation_aborted || stopped) co_return;
      // Transient (EMFILE, ECONNABORTED): log and keep accepting.
      log::warn("kvlink-server: accept on {} failed: {}", name, ec.message());
      continue;
    }
    auto session = std::make_shared<Session>(std::move(socket), config.max_payload);
    session->stream.limit_outbound(config.max_outbound_bytes, config.outbound_stall_timeout, [this](bool paused) {
      auto& c = handler.counters();
      if (paused) {
        ++c.reads_paused;
        ++c.connections_paused;
      } else {
        --c.connections_paused;
      }
    });
    // The stream (and this callback) belongs to the session: the raw pointer cannot outlive it.
    session->stream.limit_inbound(
        [this, s = session.get()](std::uint32_t pending) { return admit_inbound(*s, pending); });
    if (handler.counters().connections_open >= config.max_connections) {
      ++handler.counters().connections_refused;
      wire::Header h{};
      h.opcode = static_cast<std::uint8_t>(wire::Opcode::hello);
      reply_error(*session, h, errc::limit_exceeded,
                  fmt::format("connection refused: the server is at its limit of {} connections (--max-connections)",
                              config.max_connections));
      // Let the error reach the client, then drop the connection.
      asio::post(io, [session] { session->stream.close(); });
      continue;
    }
    if (acceptor.local_endpoint().protocol().family() != AF_UNIX) {
      std::error_code ignored;
      session->stream.socket().set_option(asio::ip::tcp::no_delay(true), ignored);
    } else {
      session->unix_socket = true;
    }
    session->state.peer = peer_of(session->stream.socket().native_handle());
    ++handler.counters().connections_accepted;
    ++handler.counters().connections_open;
    sessions.push_back(session);
    asio::co_spawn(io, serve(std::move(session)), asio::detached);
  }
}

// A frame still arriving on `session` will make its buffer hold
// `pending_payload` bytes. Refused, the connection is closed (serve): not
// paused until room frees up, because the room is held by other clients
// that may never finish their frames, and a paused half-sent frame would
// hang its sender with no reason given; refused, it gets one at once and
// can send again later.
Error Server::Impl::admit_inbound(Session& session, std::uint32_t pending_payload) {
  Error err = inbound.hold(session.inbound, pending_payload);
  handler.counters().inbound_buffered_bytes = inbound.held();
  if (err) {
    ++handler.counters().inbound_refused;
    session.inbound_refused = true;
  }
  return err;
}

// The next slice of a request handle() left unfinished, after the other
// connections' ready work (posted): their PINGs wait for one slice at most.
void Server::Impl::continue_work(std::shared_ptr<Session> session) {
  asio::post(io, [this, session = std::move(session)]() mutable {
    const TimePoint now = Clock::now();
    if (!handler.continue_work(session->state, *session, now)) return continue_work(std::move(session));
    handler.observe_latency(session->unfinished_opcode, now - session->unfinished_since);
    session->stream.release_hold();
  });
}

// The next slice of the locks of sessions that ended without END_SESSION
// (a scheduler gone, reaped, or a TTL), after the connections' ready work.
void Server::Impl::continue_releasing() {
  if (releasing_posted || !handler.releasing()) return;
  releasing_posted = true;
  asio::post(io, [this] {
    releasing_posted = false;
    handler.release_ended();
    continue_releasing();
  });
}

asio::awaitable<void> Server::Impl::serve(std::shared_ptr<Session> session) {
  Error end = co_await session->stream.read_frames(
      [&](const wire::Frame& frame) {
        const TimePoint received = Clock::now();
        const bool go_on = handler.handle(session->state, frame, *session, received);
        session->after_frame();
        session->handler_closed = !go_on;
        if (go_on && session->state.unfinished) {
          // A large request goes on in slices: its later frames wait.
          session->unfinished_opcode = frame.header.opcode;
          session->unfinished_since = received;
          session->stream.hold();
          continue_work(session);
        } else if (!RequestHandler::replies_later(frame.header.opcode)) {
          handler.observe_latency(frame.header.opcode, Clock::now() - received);
        }
        return go_on;
      });
  release_inbound(*session);
  if (session->handler_closed) {
    // The handler's error reply is queued: let it leave, then close.
    asio::post(io, [session] { session->stream.close(); });
  } else if (session->inbound_refused) {
    // Answer the refused request (its header is in; a one-way one as the
    // connection's error, id 0), then close.
    log::warn("kvlink-server: closing the connection of {}: {}", session->state.peer.text, end.detail());
    wire::Header h = session->stream.parser().peek().value_or(wire::Header{});
    if (h.is_one_way()) h = wire::Header{};
    reply_error(*session, h, errc::limit_exceeded, end.detail());
    asio::post(io, [session] { session->stream.close(); });
  } else if (end == errc::limit_exceeded) {
    // A slow reader: its queue is full, so no error reply could reach it.
    ++handler.counters().slow_reader_closes;
    log::warn("kvlink-server: closing the connection of {}: {}", session->state.peer.text, end.detail());
    session->stream.close();
  } else if (end == errc::protocol_error || end == errc::version_mismatch) {
    // Say why before closing: the bytes were not a frame we could answer.
    ++handler.counters().protocol_errors;
    std::error_code code = end.code();
    std::string why = end.detail();
    if (session->stream.parser().too_large()) {
      ++handler.counters().frames_too_large;
      code = errc::frame_too_large;
      why += " (the server's --max-payload, announced in HELLO); split the request or raise --max-payload";
    }
    log::warn("kvlink-server: closing the connection of {}: {}", session->state.peer.text, why);
    wire::Header h{};
    reply_error(*session, h, code, why);
    asio::post(io, [session] { session->stream.close(); });
  } else {
    session->stream.close();
  }
  handler.on_session_end(session->state, Clock::now());
  continue_releasing();
  --handler.counters().connections_open;
  std::erase_if(sessions, [](const std::weak_ptr<Session>& w) { return w.expired(); });
}

Server::Server(asio::io_context& io, ServerConfig config, transfer::TransferEngine& engine)
    : impl_(std::make_unique<Impl>(io, std::move(config), engine)) {}

Server::~Server() {
  for (const auto& path : impl_->unix_paths) ::unlink(path.c_str());
}

std::uint64_t Server::boot_id() const { return impl_->handler.boot_id(); }
RequestHandler& Server::handler() { return impl_->handler; }
const std::vector<std::string>& Server::endpoints() const { return impl_->bound; }

void Server::start() {
  auto& cfg = impl_->config;
  if (cfg.listen.empty()) cfg.listen.push_back(net::default_endpoint());
  if (auto err = check_access(cfg)) throw std::runtime_error(err.message());
  std::string warning;  // kvlink-server prints it; embedders get the error only
  if (auto err = check_reaper(cfg, warning)) throw std::runtime_error(err.message());
  if (auto err = check_inbound(cfg)) throw std::runtime_error(err.message());
  if (auto err = impl_->handler.map_l1()) throw std::runtime_error(err.message());
  impl_->open_disk_tier();  // a warm restart's chunks are indexed before ready
  impl_->open_cluster_tier();
  const std::optional<gid_t> group = cfg.unix_group.empty() ? std::nullopt : std::optional(group_id(cfg.unix_group));
  for (const auto& text : cfg.listen) {
    auto parsed = net::parse_endpoint(text);
    if (!parsed) throw std::runtime_error(parsed.error().message());
    net::Endpoint ep = *parsed;
    if (ep.is_unix()) {
      struct stat st {};
      if (::lstat(ep.path.c_str(), &st) == 0) {
        if (!S_ISSOCK(st.st_mode))
          throw std::runtime_error(fmt::format("{}: {} exists and is not a socket; choose another path", text, ep.path));
        if (unix_socket_in_use(ep.path))
          throw std::runtime_error(
              fmt::format("{}: another server is already listening there; stop it or choose another path", text));
        ::unlink(ep.path.c_str());  // stale socket of a dead server
      }
    }
    auto& acceptor = impl_->acceptors.emplace_back(impl_->io);
    try {
      auto asio_ep = ep.asio_endpoint();
      acceptor.open(asio_ep.protocol());
      if (!ep.is_unix()) acceptor.set_option(asio::socket_base::reuse_address(true));
      // Create the unix socket with no permissions beyond the owner's, then
      // widen to the configured mode: no window where others can connect.
      const mode_t old_mask = ep.is_unix() ? ::umask(0177) : 0;
      std::error_code bind_ec;
      acceptor.bind(asio_ep, bind_ec);
      if (ep.is_unix()) ::umask(old_mask);
      if (bind_ec) throw std::system_error(bind_ec);
      acceptor.listen(asio::socket_base::max_listen_connections);
    } catch (const std::system_error& e) {
      throw std::runtime_error(fmt::format("cannot listen on {}: {}", text, e.code().message()));
    }
    if (ep.is_unix()) {
      impl_->unix_paths.push_back(ep.path);
      // Group first, then the mode: a group-readable socket of the wrong group is never visible.
      if (group && ::chown(ep.path.c_str(), static_cast<uid_t>(-1), *group) != 0)
        throw std::runtime_error(fmt::format("{}: cannot give the socket to group '{}' (--unix-group): {}", text,
                                             cfg.unix_group, std::strerror(errno)));
      if (::chmod(ep.path.c_str(), static_cast<mode_t>(cfg.unix_socket_mode)) != 0)
        throw std::runtime_error(fmt::format("{}: cannot set the socket's mode {:o}: {}", text, cfg.unix_socket_mode,
                                             std::strerror(errno)));
    } else {
      asio::ip::tcp::endpoint bound;
      bound.resize(acceptor.local_endpoint().size());
      std::memcpy(bound.data(), acceptor.local_endpoint().data(), acceptor.local_endpoint().size());
      ep.port = bound.port();
    }
    impl_->bound.push_back(ep.to_string());
    asio::co_spawn(impl_->io, impl_->accept_loop(acceptor, ep.to_string()), asio::detached);
  }
  if (!cfg.http.empty()) {
    AdminHttpConfig admin;
    admin.address = cfg.http;
    admin.auth_token = cfg.auth_token;
    impl_->admin = std::make_unique<AdminHttp>(std::move(admin));
    admin_url_ = impl_->admin->url();
    impl_->publish(Clock::now());  // ready: L1 is mapped and every listener accepts
  }
  asio::co_spawn(impl_->io, impl_->tick_loop(), asio::detached);
}

void Server::stop() { impl_->stop(); }

void Server::Impl::stop_accepting() {
  // Unlink first, then close: once the path is free a replacement may bind
  // it, and nothing of ours may remove its file after that.
  for (const auto& path : unix_paths) ::unlink(path.c_str());
  unix_paths.clear();
  for (auto& a : acceptors) {
    std::error_code ignored;
    a.close(ignored);
  }
}

void Server::Impl::stop() {
  if (stopped) return;
  stopped = true;
  stop_accepting();
  if (disk_events) {
    std::error_code ignored;
    disk_events->cancel(ignored);
  }
  if (cluster) cluster->client().close();
  for (auto& w : sessions) {
    if (auto s = w.lock()) s->stream.close();
  }
}

void Server::drain(Duration timeout, std::function<void(const DrainReport&)> done) {
  auto& i = *impl_;
  if (i.stopped || i.handler.draining()) return;
  i.stop_accepting();
  const std::uint64_t in_flight = i.handler.begin_drain(Clock::now(), timeout);
  log::info("kvlink-server: draining for a planned restart: {} transfers in flight", in_flight);
  for (auto& w : i.sessions)
    if (auto s = w.lock(); s && s->stream.is_open()) i.handler.send_drain_notice(*s);
  asio::co_spawn(i.io, i.drain_loop(std::move(done)), asio::detached);
}

// Waits for the handler's drain to end, then closes every connection. The
// first look comes after a turn, so the notices' flushes (posted) ran.
asio::awaitable<void> Server::Impl::drain_loop(std::function<void(const DrainReport&)> done) {
  asio::steady_timer timer(io);
  DrainStep step = DrainStep::wait;
  while (step == DrainStep::wait) {
    // Polling: a completion may come from any session, and the queued
    // replies drain in the streams; a few ms is cheap and bounds the delay.
    timer.expires_after(std::chrono::milliseconds(5));
    co_await timer.async_wait(asio::experimental::as_tuple(asio::use_awaitable));
    if (stopped) co_return;  // stop() came first
    step = handler.drain_step(Clock::now(), replies_queued());
  }
  DrainReport report;
  report.timed_out = step == DrainStep::timed_out;
  report.elapsed = Clock::now() - handler.drain_started();
  report.transfers_cut = handler.transfers_in_flight();
  report.connections = open_sessions();
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(report.elapsed).count();
  if (report.timed_out)
    log::warn("kvlink-server: drain timeout (--drain-timeout-s) passed after {} ms with {} transfers still in "
              "flight; closing {} connections",
              ms, report.transfers_cut, report.connections);
  else
    log::info("kvlink-server: drained in {} ms; closing {} connections", ms, report.connections);
  stop();
  if (done) done(report);
}

std::uint64_t random_boot_id() {
  std::random_device rd;
  std::uint64_t id = 0;
  while (id == 0) id = (std::uint64_t{rd()} << 32) | rd();
  return id;
}

}  // namespace kvlink::server
