// The store operations against the real kvlink-server process over a unix
// socket, with the CPU transfer engine moving the data between a memfd KV
// cache (passed with REGISTER_KV_CACHE) and L1.
#include <doctest/doctest.h>

#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <thread>

#include "kvlink/net/connection.hpp"
#include "kvlink/store/keys.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "client.hpp"
#include "server_process.hpp"
#include "test_support.hpp"

using namespace kvlink;
using namespace std::chrono_literals;
using kvlink::test::ServerProcess;
using kvlink::test::TempDir;
using kvlink::test::run;

namespace {

// A client whose REGISTER_KV_CACHE passes the worker's KV cache memfd
// (sealed, created here for the first layout, again for a larger one: a
// sealed memfd cannot grow); everything else is a plain call.
struct Client : test::Client {
  Client(asio::io_context& io, const std::string& endpoint, wire::Role role)
      : test::Client(io, endpoint, role, "store_test") {}

  template <class M>
  test::Reply<typename M::reply_type> call(M m) {
    if constexpr (std::is_same_v<M, wire::RegisterKvCacheRequest>) {
      if (memfd) {
        struct stat st {};
        REQUIRE(::fstat(memfd.get(), &st) == 0);
        if (static_cast<std::uint64_t>(st.st_size) < m.layout.region_bytes) memfd.reset();
      }
      if (!memfd) {
        auto kv = transfer::create_kv_memfd(m.layout, {.name = "store_test-kv", .map = false});
        REQUIRE_MESSAGE(kv, kv.error().message());
        memfd = std::move(kv->fd);
      }
      return test::Client::call(std::move(m), memfd.get());
    }
    return test::Client::call(std::move(m));
  }
  template <class M>
  test::Reply<typename M::reply_type> call_with_fd(M m, int fd) {
    return test::Client::call(std::move(m), fd);
  }
  template <class M>
  typename M::reply_type ok(M m) {
    auto r = call(std::move(m));
    REQUIRE_MESSAGE(!r.ec, r.ec.message() << ": " << r.message);
    return r.reply;
  }
  UniqueFd memfd;  // the worker's KV cache
};

const std::uint64_t ns = store::namespace_id({"integration-model", 1, ""});

wire::KvLayout layout(std::uint32_t block_size = 16) { return wire::paged_layout(4, 4096, block_size, 2, 64, 2); }

std::vector<wire::ChunkHash> prompt(std::size_t chunks, std::uint32_t salt = 0) {
  std::vector<store::Token> t(chunks * 256 + 100);  // plus a partial tail chunk
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<store::Token>(i ^ salt);
  auto h = store::chunk_hashes(t, 256);
  REQUIRE(h.size() == chunks);
  return h;
}

std::vector<std::uint32_t> blocks(std::size_t chunks) {
  std::vector<std::uint32_t> v(chunks * 16);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::uint32_t>(i);
  return v;
}

wire::RegisterKvCacheRequest registration() {
  wire::RegisterKvCacheRequest r;
  r.ns = ns;
  r.model = "integration-model";
  r.layout = layout();
  return r;
}

std::string run_cli(const std::string& args, int& status) {
  std::string out;
  status = kvlink::test::run_command(ServerProcess::binary("KVLINK_CLI") + " " + args, out);
  return out;
}

}  // namespace

TEST_CASE("store flow over the socket: STORE, SYNC_LOOKUP, LOOKUP, RETRIEVE, FREE, END_SESSION, CLEAR, STATS") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "64MiB", "--log-level", "warn"});
  server.start();
  asio::io_context io;
  Client worker(io, server.endpoint(), wire::Role::worker);
  Client scheduler(io, server.endpoint(), wire::Role::scheduler);

  worker.ok(registration());
  const auto h = prompt(6);
  wire::StoreRequest st;
  st.ns = ns;
  st.hashes = {h.begin(), h.begin() + 4};
  st.block_ids = blocks(4);
  auto stored = worker.ok(st);
  CHECK(stored.stored_chunks == 4);
  CHECK(stored.skipped_chunks == 0);
  st.hashes = h;
  st.block_ids = blocks(6);
  stored = worker.ok(st);
  CHECK(stored.stored_chunks == 2);
  CHECK(stored.skipped_chunks == 4);

  wire::SyncLookupRequest sl;
  sl.ns = ns;
  sl.session_id = 1;
  sl.hashes = prompt(8);  // 6 stored + 2 unknown
  CHECK(scheduler.ok(sl).matched_chunks == 6);
  CHECK(scheduler.stat("read_locks_held") == 6);

  // Two-phase lookup: reported once, then not_found with a clear message.
  wire::LookupRequest lk;
  lk.ns = ns;
  lk.session_id = 2;
  lk.hashes = {h[0], h[1]};
  const auto job = scheduler.ok(lk).job_id;
  auto status = scheduler.ok(wire::QueryPrefetchStatusRequest{job});
  CHECK(status.state == wire::PrefetchState::done);
  CHECK(status.matched_chunks == 2);
  auto again = scheduler.call(wire::QueryPrefetchStatusRequest{job});
  CHECK(again.ec == errc::not_found);
  CHECK(again.message.find("already reported") != std::string::npos);
  CHECK(scheduler.stat("read_locks_held") == 8);

  wire::RetrieveRequest rt;
  rt.ns = ns;
  rt.hashes = h;
  rt.block_ids = blocks(6);
  rt.skip_first_n_tokens = 32;
  rt.session_id = 1;
  CHECK(worker.ok(rt).retrieved_chunks == 6);
  CHECK(scheduler.stat("read_locks_held") == 2);  // session 2's locks stay

  wire::FreeLookupLocksRequest fr;
  fr.ns = ns;
  fr.session_id = 2;
  fr.hashes = {h[0], h[1]};
  fr.start = 0;
  fr.end = 2;
  scheduler.conn->send(fr);
  wire::EndSessionRequest es;
  es.ns = ns;
  es.session_id = 1;
  es.hashes = h;
  scheduler.conn->send(es);
  wire::ReportBlockAllocationRequest rb;
  rb.allocated_blocks = 12;
  rb.total_blocks = 4096;
  scheduler.conn->send(rb);
  // One-way requests are handled in order: STATS after them sees their effect.
  CHECK(scheduler.stat("read_locks_held") == 0);
  CHECK(scheduler.stat("sessions") == 1);  // session 2 remains
  CHECK(scheduler.stat("engine_blocks_allocated") == 12);
  CHECK(scheduler.stat("lookup_hits") == 8);
  CHECK(scheduler.stat("lookup_misses") == 2);
  CHECK(scheduler.stat("l1_bytes_used") == 6 * 4 * 2 * 16 * (16 * 2 * 64 * 2));

  int rc = 0;
  auto json = run_cli("stats --server " + server.endpoint(), rc);
  CHECK(rc == 0);
  CHECK(json.find('\n') == json.size() - 1);  // one line
  CHECK(json.front() == '{');
  CHECK(json.find("\"store_entries\":6") != std::string::npos);
  CHECK(json.find("\"l1_capacity_bytes\":") != std::string::npos);

  CHECK(scheduler.ok(wire::ClearRequest{}).dropped_entries == 6);
  CHECK(scheduler.stat("store_entries") == 0);
  CHECK(scheduler.ok(sl).matched_chunks == 0);
}

TEST_CASE("bad store requests are answered with clear errors and the connection stays") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--log-level", "error"});
  server.start();
  asio::io_context io;
  Client worker(io, server.endpoint(), wire::Role::worker);
  const auto h = prompt(2);
  wire::StoreRequest st;
  st.ns = ns;
  st.hashes = h;
  st.block_ids = blocks(2);

  auto r = worker.call(st);
  CHECK(r.ec == errc::not_registered);
  CHECK(r.message.find("REGISTER_KV_CACHE first") != std::string::npos);

  auto bad = registration();
  bad.layout = layout(48);  // 256 is not a multiple of 48
  auto reg = worker.call(bad);
  CHECK(reg.ec == errc::bad_request);
  CHECK(reg.message.find("not a multiple") != std::string::npos);
  bad = registration();
  bad.model = "";
  CHECK(worker.call(bad).message.find("model name is empty") != std::string::npos);
  worker.ok(registration());

  st.ns = ns ^ 1;
  r = worker.call(st);
  CHECK(r.ec == errc::bad_request);
  CHECK(r.message.find("namespace") != std::string::npos);
  st.ns = ns;
  st.block_ids = blocks(1);
  r = worker.call(st);
  CHECK(r.ec == errc::bad_request);
  CHECK(r.message.find("16 block ids given for 2 chunks") != std::string::npos);

  wire::RetrieveRequest rt;
  rt.ns = ns;
  rt.hashes = h;
  rt.block_ids = blocks(2);
  auto rr = worker.call(rt);
  CHECK(rr.ec == errc::not_found);
  CHECK(rr.message.find("chunk 0 ") != std::string::npos);

  auto q = worker.call(wire::QueryPrefetchStatusRequest{999});
  CHECK(q.ec == errc::not_found);
  CHECK(q.message.find("prefetch job 999") != std::string::npos);

  wire::SyncLookupRequest sl;
  sl.ns = ns;
  sl.world_size = 5000;
  auto lk = worker.call(sl);
  CHECK(lk.ec == errc::bad_request);
  CHECK(lk.message.find("world_size 5000") != std::string::npos);

  // Memory short: stores as many as fit (16 MiB holds 32 chunks of 512 KiB), no error.
  st.hashes = prompt(100, 7);
  st.block_ids = blocks(100);
  auto many = worker.ok(st);
  CHECK(many.stored_chunks == 32);
  CHECK(many.skipped_chunks == 68);

  CHECK_FALSE(worker.call(wire::PingRequest{}).ec);  // still connected
  CHECK(worker.stat("op_store_errors") == 3);
}

TEST_CASE("kvlink-cli stats fails clearly without a server") {
  TempDir dir;
  int rc = 0;
  auto out = run_cli("stats --server " + dir.socket("absent.sock"), rc);
  CHECK(rc != 0);
  CHECK(out.find("cannot connect") != std::string::npos);
}

TEST_CASE("the server's tick expires lookup locks after --read-lock-ttl-s") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--read-lock-ttl-s", "1", "--log-level",
                        "warn"});
  server.start();
  asio::io_context io;
  Client worker(io, server.endpoint(), wire::Role::worker);
  worker.ok(registration());
  const auto h = prompt(3);
  wire::StoreRequest st;
  st.ns = ns;
  st.hashes = h;
  st.block_ids = blocks(3);
  CHECK(worker.ok(st).stored_chunks == 3);
  Client scheduler(io, server.endpoint(), wire::Role::scheduler);
  wire::SyncLookupRequest sl;
  sl.ns = ns;
  sl.hashes = h;
  CHECK(scheduler.ok(sl).matched_chunks == 3);
  CHECK(scheduler.stat("read_locks_held") == 3);
  // Wait for the expiry with a deadline (a hang guard, not a speed check).
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  std::int64_t held = 3;
  while (held != 0 && std::chrono::steady_clock::now() < deadline) {
    held = scheduler.stat("read_locks_held");
    if (held != 0) std::this_thread::sleep_for(50ms);
  }
  CHECK(held == 0);
  CHECK(scheduler.stat("read_locks_expired") == 3);
}

TEST_CASE("a scheduler that disconnects leaves no locks behind") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--log-level", "warn"});
  server.start();
  asio::io_context io;
  Client worker(io, server.endpoint(), wire::Role::worker);
  worker.ok(registration());
  const auto h = prompt(2);
  wire::StoreRequest st;
  st.ns = ns;
  st.hashes = h;
  st.block_ids = blocks(2);
  worker.ok(st);
  {
    Client scheduler(io, server.endpoint(), wire::Role::scheduler);
    wire::LookupRequest lk;
    lk.ns = ns;
    lk.hashes = h;
    scheduler.ok(lk);
    CHECK(worker.stat("read_locks_held") == 2);
    CHECK(worker.stat("prefetch_jobs") == 1);
  }
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (worker.stat("read_locks_held") != 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(20ms);
  CHECK(worker.stat("read_locks_held") == 0);
  CHECK(worker.stat("prefetch_jobs") == 0);
}

TEST_CASE("kvlink-server refuses a malformed --l1-size clearly") {
  FILE* p = ::popen((ServerProcess::binary("KVLINK_SERVER") + " --l1-size 12parsecs 2>&1").c_str(), "r");
  REQUIRE(p);
  std::string out;
  char buf[1024];
  while (std::size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  const int status = ::pclose(p);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 2);
  CHECK(out.find("--l1-size") != std::string::npos);
  CHECK(out.find("unknown unit 'parsecs'") != std::string::npos);
}

// ---- the CPU data path: memfd KV cache, real copies -----------------------------

namespace {

// 4 layers at distinct offsets, 64 blocks of 16 tokens, 2 heads x 64 x 2
// bytes (256 bytes per token, 4 KiB per block); a chunk is 16 blocks.
wire::KvLayout data_layout(bool block_first) {
  return wire::paged_layout(4, 64, 16, 2, 64, 2, block_first ? wire::PagedOrder::blocks_first : wire::PagedOrder::planes_first);
}

// The engine's view of its memfd KV cache: sealed, region_bytes of `l`.
struct EngineMemory {
  UniqueFd fd;
  std::unique_ptr<std::byte, transfer::Unmap> mapping;
  std::byte* base = nullptr;
  std::size_t size = 0;
  explicit EngineMemory(const wire::KvLayout& l) : size(l.region_bytes) {
    auto kv = transfer::create_kv_memfd(l, {.name = "kv-cache"});
    REQUIRE_MESSAGE(kv, kv.error().message());
    fd = std::move(kv->fd);
    mapping = std::move(kv->memory);
    base = mapping.get();
  }
  std::byte* block(const wire::KvLayout& l, std::uint32_t layer, std::uint32_t plane, std::uint32_t id) const {
    return base + l.layers[layer].offset + plane * l.plane_stride + id * l.block_stride;
  }
};

// A deterministic byte for token `token` of the prompt (byte i of its K or V
// row in `layer`).
std::byte token_byte(std::uint32_t layer, std::uint32_t plane, std::uint32_t token, std::uint32_t i) {
  return static_cast<std::byte>((token * 131 + layer * 17 + plane * 7 + i) % 251);
}

// Writes tokens [0, blocks.size() x 16) of the prompt into `blocks`.
void fill_tokens(const EngineMemory& m, const wire::KvLayout& l, const std::vector<std::uint32_t>& blocks) {
  const std::uint32_t tb = static_cast<std::uint32_t>(l.block_bytes() / l.block_size);
  for (std::uint32_t layer = 0; layer < l.num_layers; ++layer)
    for (std::uint32_t plane = 0; plane < 2; ++plane)
      for (std::uint32_t j = 0; j < blocks.size(); ++j)
        for (std::uint32_t t = 0; t < l.block_size; ++t)
          for (std::uint32_t i = 0; i < tb; ++i)
            m.block(l, layer, plane, blocks[j])[t * tb + i] = token_byte(layer, plane, j * l.block_size + t, i);
}

// True if `blocks` hold tokens [0, blocks.size() x 16) of the prompt, except
// that tokens before `skip` must be zero.
bool tokens_match(const EngineMemory& m, const wire::KvLayout& l, const std::vector<std::uint32_t>& blocks,
                  std::uint32_t skip = 0) {
  const std::uint32_t tb = static_cast<std::uint32_t>(l.block_bytes() / l.block_size);
  for (std::uint32_t layer = 0; layer < l.num_layers; ++layer)
    for (std::uint32_t plane = 0; plane < 2; ++plane)
      for (std::uint32_t j = 0; j < blocks.size(); ++j)
        for (std::uint32_t t = 0; t < l.block_size; ++t) {
          const std::uint32_t token = j * l.block_size + t;
          for (std::uint32_t i = 0; i < tb; ++i) {
            const std::byte want = token < skip ? std::byte{0} : token_byte(layer, plane, token, i);
            if (m.block(l, layer, plane, blocks[j])[t * tb + i] != want) return false;
          }
        }
  return true;
}

std::vector<std::uint32_t> range_ids(std::uint32_t first, std::uint32_t n) {
  std::vector<std::uint32_t> v(n);
  for (std::uint32_t i = 0; i < n; ++i) v[i] = first + i;
  return v;
}

std::size_t open_fds(pid_t pid) {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd")) ++n;
  return n;
}

}  // namespace

TEST_CASE("CPU data path: STORE from a memfd, wipe, SYNC_LOOKUP, RETRIEVE into other blocks gives the same bytes") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--log-level", "warn"});
  server.start();
  asio::io_context io;
  Client worker(io, server.endpoint(), wire::Role::worker);
  Client scheduler(io, server.endpoint(), wire::Role::scheduler);
  std::uint32_t salt = 100;
  for (bool block_first : {false, true}) {
    CAPTURE(block_first);
    const auto l = data_layout(block_first);
    EngineMemory mem(l);
    auto reg = registration();
    reg.layout = l;
    auto r = worker.call_with_fd(reg, mem.fd.get());
    REQUIRE_MESSAGE(!r.ec, r.message);

    const auto h = prompt(2, salt++);
    const auto src = range_ids(0, 32);  // tokens 0..511 in blocks 0..31
    fill_tokens(mem, l, src);
    wire::StoreRequest st;
    st.ns = ns;
    st.hashes = h;
    st.block_ids = src;
    CHECK(worker.ok(st).stored_chunks == 2);

    std::memset(mem.base, 0, mem.size);  // the engine's blocks are reused
    wire::SyncLookupRequest sl;
    sl.ns = ns;
    sl.session_id = 7;
    sl.hashes = h;
    CHECK(scheduler.ok(sl).matched_chunks == 2);

    wire::RetrieveRequest rt;
    rt.ns = ns;
    rt.hashes = h;
    rt.block_ids = range_ids(32, 32);
    CHECK(worker.ok(rt).retrieved_chunks == 2);
    CHECK(tokens_match(mem, l, range_ids(32, 32)));
    CHECK(tokens_match(mem, l, src, ~0u));  // the source blocks stay wiped

    // skip_first_n_tokens: 280 = chunk 0 whole plus 24 tokens (a block and a
    // half) of chunk 1 stay untouched.
    std::memset(mem.base, 0, mem.size);
    rt.skip_first_n_tokens = 280;
    CHECK(worker.ok(rt).retrieved_chunks == 2);
    CHECK(tokens_match(mem, l, range_ids(32, 32), 280));
  }
}

TEST_CASE("KV cache registration over TCP is refused with a clear error") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--listen", "tcp:127.0.0.1:0", "--l1-size", "16MiB",
                        "--log-level", "error"});
  server.start();
  asio::io_context io;
  Client worker(io, server.endpoint(1), wire::Role::worker);
  EngineMemory mem(data_layout(false));
  auto reg = registration();
  reg.layout = data_layout(false);
  auto r = worker.call_with_fd(reg, mem.fd.get());
  CHECK(r.ec == errc::bad_request);
  CHECK(r.message == "KV cache registration needs a unix: endpoint (memfd is passed with SCM_RIGHTS)");
  // Sent without an fd anyway: the server says what is missing.
  auto plain = run(io, Client::call_co(worker.conn, reg));
  CHECK(plain.ec == errc::bad_request);
  CHECK(plain.message.find("no memfd received with REGISTER_KV_CACHE") == 0);
  CHECK_FALSE(worker.call(wire::PingRequest{}).ec);
}

TEST_CASE("failed registrations leak no fds in the server, which keeps serving") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--log-level", "error"});
  server.start();
  asio::io_context io;
  Client worker(io, server.endpoint(), wire::Role::worker);
  const auto l = data_layout(false);
  auto reg = registration();
  reg.layout = l;
  const std::size_t before = open_fds(server.pid());

  // memfd smaller than the layout's region (sealed at that size).
  auto half = l;
  half.region_bytes /= 2;
  EngineMemory small(half);
  auto r = worker.call_with_fd(reg, small.fd.get());
  CHECK(r.ec == errc::bad_request);
  CHECK(r.message.find(fmt::format("memfd is {} bytes, layout needs {}", l.region_bytes / 2, l.region_bytes)) == 0);
  // No fd at all.
  auto none = run(io, Client::call_co(worker.conn, reg));
  CHECK(none.message.find("no memfd received") == 0);
  // An fd with a request the handler refuses before looking at it.
  EngineMemory mem(l);
  auto bad = reg;
  bad.model = "";
  CHECK(worker.call_with_fd(bad, mem.fd.get()).ec == errc::bad_request);
  for (int i = 0; i < 20; ++i) CHECK(worker.call_with_fd(reg, small.fd.get()).ec == errc::bad_request);
  CHECK(open_fds(server.pid()) == before);

  // A good registration keeps the mapping, not the fd; a client that sends
  // an fd and disconnects leaves none behind either.
  CHECK_FALSE(worker.call_with_fd(reg, mem.fd.get()).ec);
  CHECK(open_fds(server.pid()) == before);
  {
    Client other(io, server.endpoint(), wire::Role::worker);
    CHECK(other.call_with_fd(reg, small.fd.get()).ec == errc::bad_request);
  }
  {
    // Fds are collected on worker connections only: a scheduler's is
    // dropped by the kernel, and the error says why.
    Client scheduler(io, server.endpoint(), wire::Role::scheduler);
    auto s = scheduler.call_with_fd(reg, mem.fd.get());
    CHECK(s.ec == errc::bad_request);
    CHECK(s.message.find("no memfd received") == 0);
    CHECK(s.message.find("worker connections only") != std::string::npos);
  }
  CHECK_FALSE(worker.call(wire::PingRequest{}).ec);
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (open_fds(server.pid()) != before && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(10ms);
  CHECK(open_fds(server.pid()) == before);
  CHECK(worker.stat("registrations") == 1);
}

TEST_CASE("two engines of different KV shapes share one server: byte-exact at the same time, L1 split between them") {
  TempDir dir;
  // 16 MiB of L1 in 8 slabs of 2 MiB.
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--log-level", "error"});
  server.start();
  asio::io_context io;
  Client scheduler(io, server.endpoint(), wire::Role::scheduler);

  // A: 4 layers, 4 KiB blocks, planes first: 512 KiB chunks.
  // B: another model, 2 layers, 16 KiB blocks, blocks first: 1 MiB chunks.
  struct Engine {
    wire::KvLayout layout;
    std::uint64_t ns;
    Client worker;
    EngineMemory mem;
  };
  const auto la = data_layout(false);
  const auto lb = wire::paged_layout(2, 64, 16, 4, 128, 2, wire::PagedOrder::blocks_first);
  const std::uint64_t ns_b = store::namespace_id({"second-model", 1, ""});
  Engine a{la, ns, Client(io, server.endpoint(), wire::Role::worker), EngineMemory(la)};
  Engine b{lb, ns_b, Client(io, server.endpoint(), wire::Role::worker), EngineMemory(lb)};
  REQUIRE(la.block_bytes() * la.num_layers * 2 * 16 == 512 * 1024);
  REQUIRE(lb.block_bytes() * lb.num_layers * 2 * 16 == 1024 * 1024);
  for (Engine* e : {&a, &b}) {
    auto reg = registration();
    reg.layout = e->layout;
    reg.ns = e->ns;
    reg.model = e == &a ? "integration-model" : "second-model";
    auto r = e->worker.call_with_fd(reg, e->mem.fd.get());
    REQUIRE_MESSAGE(!r.ec, r.message);
  }

  // Stores and retrieves of both, interleaved: each gets its own bytes back.
  auto store = [&](Engine& e, const std::vector<wire::ChunkHash>& h) {
    const auto src = range_ids(0, static_cast<std::uint32_t>(h.size() * 16));
    fill_tokens(e.mem, e.layout, src);
    wire::StoreRequest st;
    st.ns = e.ns;
    st.hashes = h;
    st.block_ids = src;
    return e.worker.ok(st).stored_chunks;
  };
  auto retrieve_matches = [&](Engine& e, const std::vector<wire::ChunkHash>& h) {
    std::memset(e.mem.base, 0, e.mem.size);
    wire::SyncLookupRequest sl;
    sl.ns = e.ns;
    sl.session_id = 9;
    sl.hashes = h;
    REQUIRE(scheduler.ok(sl).matched_chunks == h.size());
    wire::RetrieveRequest rt;
    rt.ns = e.ns;
    rt.session_id = 9;
    rt.hashes = h;
    rt.block_ids = range_ids(32, static_cast<std::uint32_t>(h.size() * 16));
    REQUIRE(e.worker.ok(rt).retrieved_chunks == h.size());
    return tokens_match(e.mem, e.layout, rt.block_ids);
  };
  const auto ha = prompt(2, 1), hb = prompt(2, 2);
  CHECK(store(a, ha) == 2);
  CHECK(store(b, hb) == 2);
  CHECK(retrieve_matches(a, ha));
  CHECK(retrieve_matches(b, hb));
  CHECK(scheduler.stat("l1_layouts") == 2);
  CHECK(scheduler.stat("l1_bytes_used") == 2 * 512 * 1024 + 2 * 1024 * 1024);

  // A fills L1 on its own (48 chunks of 512 KiB > 16 MiB); B's next stores
  // take slabs back from A, up to half of L1, and B's data stays exact.
  for (std::uint32_t salt = 100; salt < 124; ++salt) store(a, prompt(2, salt));
  CHECK(scheduler.stat("l1_slabs_free") == 0);
  for (std::uint32_t salt = 200; salt < 204; ++salt) {
    const auto h = prompt(2, salt);
    CHECK(store(b, h) == 2);
    CHECK(retrieve_matches(b, h));
  }
  CHECK(scheduler.stat("l1_slabs_moved") >= 2);
  const auto newest_a = prompt(2, 123);
  CHECK(retrieve_matches(a, newest_a));

  // A third engine of A's model but B's shape: it cannot overwrite A's
  // chunks nor read them as its own; it is told why.
  Engine c{lb, ns, Client(io, server.endpoint(), wire::Role::worker), EngineMemory(lb)};
  auto reg = registration();
  reg.layout = lb;
  REQUIRE_FALSE(c.worker.call_with_fd(reg, c.mem.fd.get()).ec);
  CHECK(store(c, newest_a) == 0);
  wire::RetrieveRequest rt;
  rt.ns = ns;
  rt.hashes = newest_a;
  rt.block_ids = range_ids(32, 32);
  auto r = c.worker.call(rt);
  CHECK(r.ec == errc::bad_request);
  CHECK(r.message.find("stored with another KV layout (524288 bytes per chunk") != std::string::npos);
  CHECK(retrieve_matches(a, newest_a));  // A's chunks are untouched
}
