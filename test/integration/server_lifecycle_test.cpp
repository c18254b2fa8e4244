// The server's side of self-healing (issue 12) against the real
// kvlink-server: registrations outlive connections, admin connections are
// not instances, the reaper flags, and the planned restart (SIGTERM/SIGINT:
// stop accepting, notify, refuse new transfers, let the ones in flight
// finish, exit 0). Clients here are raw sockets, so what is checked is the
// server's bytes, not a client library's reading of them.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kvlink/net/connection.hpp"
#include "kvlink/store/keys.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "kvlink/unique_fd.hpp"
#include "kvlink/wire/messages.hpp"
#include "server_process.hpp"
#include "test_support.hpp"

using namespace kvlink;
using namespace std::chrono_literals;
using kvlink::test::ServerProcess;
using kvlink::test::TempDir;

namespace {

using Frame = std::pair<wire::Header, wire::Bytes>;

std::string server_bin() { return ServerProcess::binary("KVLINK_SERVER"); }
std::string cli_bin() { return ServerProcess::binary("KVLINK_CLI"); }
std::string path_of(const std::string& endpoint) { return endpoint.substr(5); }  // unix:

// kvlink-server with its output in a file, so a test can read the log lines
// it prints after "ready" and wait for its exit status.
class LoggedServer {
 public:
  LoggedServer(const TempDir& dir, std::vector<std::string> args, std::string log_name = "server.log")
      : log_path_(dir.path() + "/" + log_name) {
    const std::string exe = server_bin();
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(exe.c_str()));
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const int out = ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    REQUIRE(out >= 0);
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      ::dup2(out, STDOUT_FILENO);
      ::dup2(out, STDERR_FILENO);
      ::execv(exe.c_str(), argv.data());
      ::_exit(127);
    }
    ::close(out);
    REQUIRE_MESSAGE(wait_log("kvlink-server ready", 10s), "no ready line; output: " << log());
  }
  ~LoggedServer() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  std::string log() const {
    std::ifstream f(log_path_);
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
  }
  bool wait_log(const std::string& text, std::chrono::milliseconds limit) const {
    return test::eventually([&] { return log().find(text) != std::string::npos; }, limit);
  }
  void signal(int sig) { ::kill(pid_, sig); }
  // The exit status once it exits within `limit` (-1: killed by a signal).
  std::optional<int> wait_exit(std::chrono::milliseconds limit) {
    int status = 0;
    const bool done = test::eventually([&] { return ::waitpid(pid_, &status, WNOHANG) == pid_; }, limit);
    if (!done) return std::nullopt;
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

 private:
  std::string log_path_;
  pid_t pid_ = -1;
};

// A unix socket speaking raw frames. Frames that are not the reply a call
// waits for (a SERVER_NOTICE, replies to requests sent without waiting)
// are kept in `others`.
struct RawClient {
  int fd = -1;
  wire::FrameParser parser;
  std::deque<Frame> others;
  std::uint64_t next_id = 1;
  bool eof = false;

  explicit RawClient(const std::string& endpoint) {
    fd = test::connect_unix(endpoint);
  }
  ~RawClient() { close(); }
  void close() {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }

  // Sends one request frame (with `pass_fd` attached, SCM_RIGHTS); returns its id.
  template <class M>
  std::uint64_t send(const M& m, int pass_fd = -1) {
    const std::uint64_t id = next_id++;
    wire::Bytes b;
    wire::FrameBuilder(b).add(static_cast<std::uint8_t>(M::opcode), 0, id, [&](wire::Writer& w) { wire::encode(w, m); });
    iovec iov{b.data(), b.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    if (pass_fd >= 0) {
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
    }
    REQUIRE(::sendmsg(fd, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(b.size()));
    return id;
  }

  // The next frame from the socket, or nullopt at EOF (sets eof) or after `limit`.
  std::optional<Frame> read_frame(std::chrono::milliseconds limit = 10s) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
      if (auto f = parser.next()) return Frame{f->header, wire::Bytes(f->payload.begin(), f->payload.end())};
      REQUIRE_FALSE(parser.failed());
      if (eof) return std::nullopt;
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      auto space = parser.prepare(65536);
      const ssize_t n = ::recv(fd, space.data(), space.size(), 0);
      if (n <= 0) {
        eof = true;
        continue;
      }
      parser.commit(static_cast<std::size_t>(n));
    }
  }
  // The reply to request `id`; other frames go to `others`.
  Frame reply(std::uint64_t id) {
    for (;;) {
      auto f = read_frame();
      REQUIRE_MESSAGE(f.has_value(), "no reply to request " << id << (eof ? " (the server closed)" : " (timeout)"));
      if (f->first.is_response() && f->first.id == id) return *f;
      others.push_back(std::move(*f));
    }
  }
  template <class M>
  Frame call(const M& m, int pass_fd = -1) {
    return reply(send(m, pass_fd));
  }
  template <class M>
  typename M::reply_type ok(const M& m, int pass_fd = -1) {
    auto f = call(m, pass_fd);
    if (f.first.is_error()) {
      wire::ErrorReply e;
      (void)wire::decode(f.second, e, "error");  // best effort: the message, if any, for FAIL
      FAIL("unexpected error " << e.code << ": " << e.message);
    }
    typename M::reply_type r;
    REQUIRE_FALSE(wire::decode(f.second, r, "reply"));
    return r;
  }
  wire::HelloReply hello(wire::Role role, std::uint64_t instance_id, std::string secret = {}) {
    wire::HelloRequest h;
    h.role = role;
    h.instance_id = instance_id;
    h.client_name = "server_lifecycle_test";
    h.instance_secret = std::move(secret);
    return ok(h);
  }
  std::int64_t stat(const std::string& name) {
    for (auto& e : ok(wire::StatsRequest{}).entries)
      if (e.name == name) return e.value;
    FAIL("no stat named " << name);
    return -1;
  }
  // Waits for the SERVER_NOTICE (it may already sit in `others`).
  std::optional<wire::ServerNotice> notice(std::chrono::milliseconds limit = 10s) {
    auto is_notice = [](const Frame& f) {
      return f.first.opcode == static_cast<std::uint8_t>(wire::Opcode::server_notice);
    };
    auto decode = [](const Frame& f) {
      CHECK(f.first.is_one_way());
      CHECK_FALSE(f.first.is_response());
      CHECK(f.first.id == 0);
      wire::ServerNotice n;
      REQUIRE_FALSE(wire::decode(f.second, n, "notice"));
      return n;
    };
    for (auto it = others.begin(); it != others.end(); ++it)
      if (is_notice(*it)) {
        auto n = decode(*it);
        others.erase(it);
        return n;
      }
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
      auto f = read_frame(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()));
      if (!f) return std::nullopt;
      if (is_notice(*f)) return decode(*f);
      others.push_back(std::move(*f));
    }
    return std::nullopt;
  }
  // Reads (and drops) everything until the server closes; true on EOF.
  bool read_to_eof(std::chrono::milliseconds limit = 10s) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (!eof && std::chrono::steady_clock::now() < deadline)
      if (auto f = read_frame(100ms)) others.push_back(std::move(*f));
    return eof;
  }
};

wire::ErrorReply error_of(const Frame& f) {
  REQUIRE(f.first.is_error());
  wire::ErrorReply e;
  REQUIRE_FALSE(wire::decode(f.second, e, "error"));
  return e;
}

const std::uint64_t ns = store::namespace_id({"lifecycle-model", 1, ""});

// 4 layers x 2 planes x `blocks` blocks of 16 tokens x 32 KiB: a chunk
// (256 tokens, 16 blocks) is 4 MiB.
wire::KvLayout big_layout(std::uint32_t blocks) { return wire::paged_layout(4, blocks, 16, 8, 128, 2); }

// An engine's KV cache: a sealed memfd filled with a pattern (so copies
// move real pages).
struct KvMemory {
  UniqueFd fd;
  explicit KvMemory(const wire::KvLayout& l) {
    auto kv = transfer::create_kv_memfd(l, {.name = "kvlink-lifecycle"});
    REQUIRE_MESSAGE(kv, kv.error().message());
    std::memset(kv->memory.get(), 0x5a, l.region_bytes);
    fd = std::move(kv->fd);  // kv unmaps; the pages stay in the memfd
  }
};

wire::RegisterKvCacheRequest registration(const wire::KvLayout& l) {
  wire::RegisterKvCacheRequest r;
  r.ns = ns;
  r.model = "lifecycle-model";
  r.layout = l;
  return r;
}

std::vector<wire::ChunkHash> prompt(std::size_t chunks, std::uint32_t salt) {
  std::vector<store::Token> t(chunks * 256);
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<store::Token>(i * 13 + salt);
  return store::chunk_hashes(t, 256);
}

wire::StoreRequest store_req(std::size_t chunks, std::uint32_t salt, std::uint32_t first_block = 0) {
  wire::StoreRequest s;
  s.ns = ns;
  s.hashes = prompt(chunks, salt);
  s.block_ids.resize(chunks * 16);
  for (std::size_t i = 0; i < s.block_ids.size(); ++i) s.block_ids[i] = first_block + static_cast<std::uint32_t>(i);
  return s;
}

// A connection that does not read its replies: the server stops reading it
// (--max-outbound-bytes) with replies queued, which holds a drain open
// until they leave (the client reads) or the drain timeout passes.
struct Staller {
  RawClient raw;
  Staller(const std::string& endpoint, RawClient& observer) : raw(endpoint) {
    raw.hello(wire::Role::admin, 0x5a11);
    const std::int64_t paused = observer.stat("reads_paused");
    // One write: a thousand small ones would fill the socket's buffer with
    // per-message overhead before the server ever pauses.
    wire::Bytes many;
    for (std::uint64_t i = 0; i < 1000; ++i)
      wire::FrameBuilder(many).add(static_cast<std::uint8_t>(wire::Opcode::stats), 0, 1000 + i, [](wire::Writer&) {});
    REQUIRE(::send(raw.fd, many.data(), many.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(many.size()));
    REQUIRE(test::eventually([&] { return observer.stat("reads_paused") > paused; }, 10s));
  }
};

std::vector<std::string> drain_args(const TempDir& dir, const std::string& drain_timeout) {
  return {"--listen", dir.socket(), "--max-outbound-bytes", "64KiB", "--outbound-stall-timeout-s", "300",
          "--drain-timeout-s", drain_timeout, "--l1-size", "16MiB"};
}

}  // namespace

TEST_CASE("lifecycle: phantom instances: 20 kvlink-cli ping runs leave instances_live 0") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--max-instances", "5", "--log-level", "warn"});
  server.start();
  std::string out;
  for (int i = 0; i < 20; ++i) {
    CAPTURE(i);
    REQUIRE_MESSAGE(test::run_command(cli_bin() + " ping -c 1 --server " + server.endpoint(), out) == 0, out);
  }
  // More admin runs than --max-instances, none refused, none left behind.
  CHECK(test::run_command(cli_bin() + " stats --server " + server.endpoint(), out) == 0);
  CHECK(out.find("\"instances_live\":0") != std::string::npos);
  CHECK(out.find("\"instances_refused\":0") != std::string::npos);
  CHECK(out.find("\"op_ping_errors\":0") != std::string::npos);
  CHECK(out.find("\"draining\":0") != std::string::npos);
  CHECK(out.find("\"transfers_in_flight\":0") != std::string::npos);
  RawClient admin(server.endpoint());
  admin.hello(wire::Role::admin, 77);
  CHECK(admin.stat("instances_live") == 0);
  CHECK(admin.stat("op_ping_requests") == 20);
  // An admin connection cannot store: it is not an instance.
  auto e = error_of(admin.call(store_req(1, 1)));
  CHECK(e.code == to_wire(errc::bad_request));
  CHECK(e.message.find("said HELLO as admin") != std::string::npos);
}

TEST_CASE("lifecycle: a registration survives its connection; the re-HELLO says registered and STORE works") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "64MiB", "--log-level", "warn"});
  server.start();
  const auto layout = big_layout(64);  // 16 MiB
  KvMemory kv(layout);
  RawClient admin(server.endpoint());
  admin.hello(wire::Role::admin, 1);
  const std::uint64_t id = 0x1234567;
  {
    RawClient worker(server.endpoint());
    auto h = worker.hello(wire::Role::worker, id);
    CHECK(h.registered == 0);
    CHECK(h.draining == 0);
    worker.ok(registration(layout), kv.fd.get());
    CHECK(worker.ok(store_req(1, 1)).stored_chunks == 1);
  }  // closed: no UNREGISTER
  REQUIRE(test::eventually([&] { return admin.stat("connections_open") == 1; }));
  CHECK(admin.stat("registrations") == 1);
  CHECK(admin.stat("instances_live") == 1);
  {
    RawClient worker(server.endpoint());
    auto h = worker.hello(wire::Role::worker, id);
    CHECK(h.registered == 1);
    // No REGISTER: the kept registration serves STORE and RETRIEVE.
    CHECK(worker.ok(store_req(1, 2, 16)).stored_chunks == 1);
    wire::RetrieveRequest rt;
    rt.ns = ns;
    rt.hashes = prompt(1, 1);
    rt.block_ids = store_req(1, 1, 32).block_ids;
    CHECK(worker.ok(rt).retrieved_chunks == 1);
    // UNREGISTER while connected drops it; closing then forgets the instance.
    worker.ok(wire::UnregisterKvCacheRequest{});
    CHECK(admin.stat("registrations") == 0);
    CHECK(admin.stat("instances_live") == 1);
  }
  REQUIRE(test::eventually([&] { return admin.stat("instances_live") == 0; }));
  RawClient again(server.endpoint());
  CHECK(again.hello(wire::Role::worker, id).registered == 0);
  CHECK(error_of(again.call(store_req(1, 3))).code == to_wire(errc::not_registered));
}

TEST_CASE("lifecycle: reaper flags: 0 disables it, a grace below the timeout is refused, below 3 s warns") {
  TempDir dir;
  std::string out;
  CHECK(test::run_command(server_bin() + " --listen " + dir.socket("a.sock") +
                              " --reap-timeout-s 100 --registration-grace-s 50",
                          out) == 2);
  CHECK(out.find("--registration-grace-s 50 is shorter than --reap-timeout-s 100") != std::string::npos);
  CHECK(out.find("ready") == std::string::npos);

  LoggedServer reaping(dir, {"--listen", dir.socket("r.sock"), "--reap-timeout-s", "1"}, "r.log");
  CHECK(reaping.log().find("warn  kvlink-server: --reap-timeout-s 1 is below 3 s (3 x the clients' default 1 s "
                           "heartbeat interval)") != std::string::npos);
  LoggedServer never(dir, {"--listen", dir.socket("n.sock"), "--reap-timeout-s", "0"}, "n.log");
  CHECK(never.log().find("is below 3 s") == std::string::npos);
  CHECK(never.log().find("--reap-timeout-s 0: no reaper") != std::string::npos);
  // The same silence on both: reaped on one, kept on the other.
  RawClient a(dir.socket("r.sock")), b(dir.socket("n.sock"));
  a.hello(wire::Role::scheduler, 5);
  b.hello(wire::Role::scheduler, 5);
  std::this_thread::sleep_for(2500ms);  // asserting that nothing happens on `never`
  CHECK(error_of(a.call(wire::PingRequest{})).code == to_wire(errc::unknown_instance));
  CHECK_FALSE(b.call(wire::PingRequest{}).first.is_error());
  CHECK(b.stat("instances_reaped") == 0);
  CHECK(a.stat("instances_reaped") == 1);
}

TEST_CASE("lifecycle: SIGTERM drains: notice, refusals, the in-flight STORE completes, the path is free, exit 0") {
  TempDir dir;
  LoggedServer server(dir, {"--listen", dir.socket(), "--l1-size", "512MiB", "--transfer-threads", "1",
                            "--max-outbound-bytes", "64KiB", "--outbound-stall-timeout-s", "300",
                            "--drain-timeout-s", "30"});
  const std::string ep = dir.socket();
  const auto layout = big_layout(1024);  // 256 MiB, 64 chunks of 4 MiB
  KvMemory kv(layout);
  RawClient admin(ep);
  admin.hello(wire::Role::admin, 1);
  RawClient worker(ep);
  const std::uint64_t id = 0xabcdef;
  worker.hello(wire::Role::worker, id);
  worker.ok(registration(layout), kv.fd.get());
  // Holds the drain open until this test lets it end.
  Staller staller(ep, admin);

  // A STORE of 256 MiB copied by one thread: in flight for a while.
  const std::uint64_t big = worker.send(store_req(64, 1));
  REQUIRE(test::eventually([&] { return admin.stat("transfers_in_flight") == 1; }, 10s));
  server.signal(SIGTERM);
  auto notice = worker.notice();
  REQUIRE(notice.has_value());
  CHECK(notice->kind == wire::NoticeKind::draining);
  CHECK(notice->message.find("planned restart") != std::string::npos);
  CHECK(admin.notice().has_value());
  // Listeners are closed and the path removed before the notice went out.
  CHECK_FALSE(std::filesystem::exists(path_of(ep)));
  CHECK(server.log().find("draining for a planned restart: 1 transfers in flight") != std::string::npos);

  // New transfers are refused; the rest is served; HELLO says draining.
  auto e = error_of(worker.call(store_req(1, 2, 1000)));
  CHECK(e.code == to_wire(errc::shutting_down));
  CHECK(e.message.find("draining for a planned restart") != std::string::npos);
  CHECK(e.message.find("reconnect to its replacement") != std::string::npos);
  CHECK(error_of(worker.call(registration(layout))).code == to_wire(errc::shutting_down));
  CHECK_FALSE(worker.call(wire::PingRequest{}).first.is_error());
  auto h = worker.hello(wire::Role::worker, id);
  CHECK(h.draining == 1);
  CHECK(h.registered == 1);
  CHECK(admin.stat("draining") == 1);

  // A replacement binds the same path while the first server drains.
  ServerProcess replacement({"--listen", ep, "--log-level", "off"});
  replacement.start();
  RawClient fresh(ep);
  CHECK(fresh.hello(wire::Role::admin, 2).draining == 0);

  // The STORE that was in flight completes and is answered.
  auto r = worker.reply(big);
  REQUIRE_FALSE(r.first.is_error());
  wire::StoreResult sr;
  REQUIRE_FALSE(wire::decode(r.second, sr, "store"));
  CHECK(sr.stored_chunks == 64);
  CHECK(server.log().find("drained in") == std::string::npos);  // the staller's replies still wait

  // Once the stalled replies are read, the drain ends: connections close, exit 0.
  CHECK(staller.raw.read_to_eof());
  CHECK(worker.read_to_eof());
  auto status = server.wait_exit(10s);
  REQUIRE(status.has_value());
  CHECK(*status == 0);
  CHECK(server.log().find("drained in") != std::string::npos);
  // The first server left the replacement's socket alone.
  CHECK(std::filesystem::exists(path_of(ep)));
  RawClient after(ep);
  CHECK(after.hello(wire::Role::admin, 3).draining == 0);
}

TEST_CASE("lifecycle: a drain ends at --drain-timeout-s, at once with 0, or at a second signal") {
  TempDir dir;
  SUBCASE("the timeout cuts it; exit 0") {
    LoggedServer server(dir, drain_args(dir, "1"));
    RawClient admin(dir.socket());
    admin.hello(wire::Role::admin, 1);
    Staller staller(dir.socket(), admin);
    const auto t0 = std::chrono::steady_clock::now();
    server.signal(SIGINT);  // SIGINT alike
    auto status = server.wait_exit(10s);
    const auto took = std::chrono::steady_clock::now() - t0;
    REQUIRE(status.has_value());
    CHECK(*status == 0);
    CHECK(took >= 900ms);
    CHECK(server.log().find("drain timeout (--drain-timeout-s) passed after") != std::string::npos);
    CHECK(admin.read_to_eof());
  }
  SUBCASE("0: no wait") {
    LoggedServer server(dir, drain_args(dir, "0"));
    RawClient admin(dir.socket());
    admin.hello(wire::Role::admin, 1);
    Staller staller(dir.socket(), admin);
    server.signal(SIGTERM);
    auto status = server.wait_exit(5s);
    REQUIRE(status.has_value());
    CHECK(*status == 0);
    CHECK(server.log().find("drain timeout (--drain-timeout-s) passed after") != std::string::npos);
  }
  SUBCASE("a second signal exits at once") {
    LoggedServer server(dir, drain_args(dir, "60"));
    RawClient admin(dir.socket());
    admin.hello(wire::Role::admin, 1);
    Staller staller(dir.socket(), admin);
    server.signal(SIGTERM);
    REQUIRE(admin.notice().has_value());
    CHECK(admin.stat("draining") == 1);
    server.signal(SIGTERM);
    auto status = server.wait_exit(5s);
    REQUIRE(status.has_value());
    CHECK(*status == 0);
    CHECK(server.log().find("during the drain: exiting now") != std::string::npos);
    CHECK(server.log().find("drained in") == std::string::npos);
  }
}

TEST_CASE("lifecycle: an L1 it cannot serve is a startup error naming --l1-size, before any ready line") {
  TempDir dir;
  for (const char* size : {"0", "100TiB"}) {
    CAPTURE(size);
    std::string out;
    CHECK(test::run_command(server_bin() + " --listen " + dir.socket("l1.sock") + " --l1-size " + size, out) == 1);
    CHECK(out.find("--l1-size") != std::string::npos);
    CHECK(out.find("ready") == std::string::npos);
  }
  std::string out;
  CHECK(test::run_command(server_bin() + " --listen " + dir.socket("l1.sock") + " --l1-size 100TiB", out) == 1);
  CHECK(out.find("more than this machine's memory") != std::string::npos);
}

TEST_CASE("lifecycle: every refused registration is in the server's log with the reason and the peer") {
  TempDir dir;
  LoggedServer server(dir, {"--listen", dir.socket(), "--l1-size", "2MiB", "--log-level", "warn"});
  const auto layout = big_layout(64);  // 4 MiB a chunk: larger than L1
  KvMemory kv(layout);
  RawClient worker(dir.socket());
  worker.hello(wire::Role::worker, 0x77);
  auto bad = registration(layout);
  bad.ns = 0;
  CHECK(error_of(worker.call(bad, kv.fd.get())).message.find("namespace 0") != std::string::npos);
  CHECK(error_of(worker.call(registration(layout), kv.fd.get())).message.find("raise --l1-size") !=
        std::string::npos);
  const std::string who = fmt::format("refused a KV-cache registration from pid {} uid {}", ::getpid(), ::getuid());
  REQUIRE(test::eventually([&] { return server.log().find("raise --l1-size") != std::string::npos; }));
  const std::string log = server.log();
  CHECK(log.find(who + " (") != std::string::npos);
  CHECK(log.find("namespace 0 is not a namespace id") != std::string::npos);
  CHECK(log.find("0000000000000077") == std::string::npos);  // instance ids only at debug level
}

TEST_CASE("lifecycle: another client cannot claim a worker's instance id; the owner reconnects and keeps it") {
  TempDir dir;
  LoggedServer server(dir, {"--listen", dir.socket(), "--l1-size", "64MiB", "--log-level", "warn"});
  const auto layout = big_layout(64);
  KvMemory kv(layout);
  const std::uint64_t id = 0x4242;
  const std::string secret = net::random_instance_secret();
  {
    RawClient owner(dir.socket());
    owner.hello(wire::Role::worker, id, secret);
    owner.ok(registration(layout), kv.fd.get());
    CHECK(owner.ok(store_req(1, 1)).stored_chunks == 1);
    // While the owner is connected, and after it left (its registration
    // keeps the id bound), a HELLO with its id but not its secret is
    // refused: no STORE from its memory, no RETRIEVE into it, no UNREGISTER.
    RawClient spoof(dir.socket());
    wire::HelloRequest h;
    h.role = wire::Role::worker;
    h.instance_id = id;
    CHECK(error_of(spoof.call(h)).code == to_wire(errc::unauthorized));
    CHECK_FALSE(spoof.read_frame(2s).has_value());  // and closed
    CHECK(spoof.eof);
  }
  RawClient spoof(dir.socket());
  wire::HelloRequest h;
  h.role = wire::Role::scheduler;
  h.instance_id = id;
  h.instance_secret = net::random_instance_secret();
  CHECK(error_of(spoof.call(h)).code == to_wire(errc::unauthorized));
  RawClient owner(dir.socket());
  CHECK(owner.hello(wire::Role::worker, id, secret).registered == 1);
  CHECK(owner.ok(store_req(1, 2, 16)).stored_chunks == 1);
  CHECK(owner.stat("instance_claims_refused") == 2);
  CHECK(owner.stat("registrations") == 1);
  const std::string log = server.log();
  CHECK(log.find(fmt::format("HELLO from pid {} uid {} () refused: it claims the instance id of another client",
                             ::getpid(), ::getuid())) != std::string::npos);
  CHECK(log.find("0000000000004242") == std::string::npos);  // instance ids only at debug level
}

TEST_CASE("lifecycle: a flood of malformed one-way messages is logged in summary; the counters count every one") {
  TempDir dir;
  LoggedServer server(dir, {"--listen", dir.socket(), "--log-level", "warn"});
  RawClient flooder(dir.socket());
  flooder.hello(wire::Role::scheduler, 0x51);
  constexpr int flood = 500;
  const wire::Bytes garbage(3, std::byte{0xee});
  wire::Bytes frames;
  for (int i = 0; i < flood; ++i)
    wire::FrameBuilder(frames).add(static_cast<std::uint8_t>(wire::Opcode::end_session), wire::flag::one_way,
                                   1000 + static_cast<std::uint64_t>(i),
                                   [&](wire::Writer& w) { w.raw(garbage.data(), garbage.size()); });
  REQUIRE(::send(flooder.fd, frames.data(), frames.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(frames.size()));
  // One-way messages are handled in order: STATS after them sees them all.
  RawClient admin(dir.socket());
  admin.hello(wire::Role::admin, 77);
  auto stat = [&](RawClient& c, const std::string& name) {
    for (auto& e : c.ok(wire::StatsRequest{}).entries)
      if (e.name == name) return e.value;
    FAIL("no stat " << name);
    return std::int64_t{-1};
  };
  CHECK(stat(flooder, "op_end_session_errors") == flood);
  // The rest of the flood is summarised once the connection goes.
  flooder.close();
  REQUIRE(server.wait_log("more like this from", 5s));
  const std::string log = server.log();
  std::size_t lines = 0;
  for (std::size_t at = log.find("dropped one-way END_SESSION"); at != std::string::npos;
       at = log.find("dropped one-way END_SESSION", at + 1))
    ++lines;
  MESSAGE(lines << " of " << flood << " malformed messages logged one by one");
  CHECK(lines >= 1);
  CHECK(lines <= 20);
  // Every message is either logged or counted in a summary line.
  std::size_t summarised = 0;
  for (std::size_t at = log.find("... and "); at != std::string::npos; at = log.find("... and ", at + 1))
    summarised += std::stoul(log.substr(at + 8));
  CHECK(lines + summarised == flood);
  CHECK(stat(admin, "op_end_session_errors") == flood);
}

TEST_CASE("lifecycle: engines' connects, disconnects and reaps are logged with the peer; admin connections are not") {
  TempDir dir;
  LoggedServer server(dir, {"--listen", dir.socket(), "--log-level", "info", "--reap-timeout-s", "1",
                            "--registration-grace-s", "1"});
  const std::string peer = fmt::format("pid {} uid {} (server_lifecycle_test)", ::getpid(), ::getuid());
  {
    RawClient scheduler(dir.socket());
    scheduler.hello(wire::Role::scheduler, 0x6101);
    CHECK(server.wait_log(peer + " connected as scheduler", 5s));
  }
  CHECK(server.wait_log(peer + " disconnected", 5s));
  {
    RawClient admin(dir.socket());
    admin.hello(wire::Role::admin, 0x6102);
    admin.stat("connections_open");
  }
  // A silent worker: connected, then reaped after 1 s without traffic.
  RawClient worker(dir.socket());
  worker.hello(wire::Role::worker, 0x6103);
  CHECK(server.wait_log(peer + " connected as worker", 5s));
  CHECK(server.wait_log("reaped " + peer + ": silent past its reap timeout", 5s));
  const std::string log = server.log();
  CHECK(log.find("connected as admin") == std::string::npos);  // kvlink-cli polls would flood the log
  CHECK(log.find("6101") == std::string::npos);                // instance ids only at debug level
}
