// Bad input against the real kvlink-server: malformed frames on raw
// sockets, and well-formed requests with bad arguments. Each gets a clear
// error, the server keeps serving other clients, and a KV cache stored
// before stays byte-exact. A KV memfd must be sealed against resizing, and
// one that is not is refused, and lookup locks cannot be pinned or taken
// from another scheduler. Elsewhere: wrong magic, unknown opcodes,
// unregistered STOREs, mismatched namespaces and block counts (rpc_test.cpp,
// store_test.cpp); large requests against a PING (backpressure_test.cpp);
// frames trickled at the limit and the inbound cap (memory_limits_test.cpp);
// claimed instance ids, log floods, an L1 it cannot serve
// (server_lifecycle_test.cpp); several KV layouts (store_test.cpp).
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <asio/io_context.hpp>
#include <cerrno>
#include <cstring>
#include <fmt/format.h>

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

// A blocking unix socket speaking raw bytes; reads time out (hang guard).
struct RawSocket {
  int fd = -1;
  explicit RawSocket(const std::string& endpoint) {
    fd = test::connect_unix(endpoint);
    timeval tv{10, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  ~RawSocket() { ::close(fd); }
  void send(const wire::Bytes& b) { REQUIRE(::send(fd, b.data(), b.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(b.size())); }
  // Reads until the server closes the connection (or the 10 s guard);
  // returns the frames received and whether EOF was seen.
  std::pair<std::vector<std::pair<wire::Header, wire::Bytes>>, bool> read_to_eof() {
    wire::FrameParser p;
    std::vector<std::pair<wire::Header, wire::Bytes>> frames;
    for (;;) {
      auto space = p.prepare(4096);
      const ssize_t n = ::recv(fd, space.data(), space.size(), 0);
      if (n <= 0) return {frames, n == 0};
      p.commit(static_cast<std::size_t>(n));
      while (auto f = p.next()) frames.emplace_back(f->header, wire::Bytes(f->payload.begin(), f->payload.end()));
    }
  }
};

wire::Bytes frame(std::uint8_t opcode, std::uint64_t id, const wire::Bytes& payload, std::uint16_t flags = 0) {
  wire::Bytes b;
  wire::FrameBuilder(b).add(opcode, flags, id, [&](wire::Writer& w) { w.raw(payload.data(), payload.size()); });
  return b;
}

template <class M>
wire::Bytes payload_of(const M& m) {
  wire::Bytes b;
  wire::FrameBuilder(b).add(static_cast<std::uint8_t>(M::opcode), 0, 1, [&](wire::Writer& w) { wire::encode(w, m); });
  return wire::Bytes(b.begin() + wire::header_size, b.end());
}

wire::ErrorReply error_of(const std::pair<wire::Header, wire::Bytes>& f) {
  REQUIRE(f.first.is_error());
  wire::ErrorReply e;
  REQUIRE_FALSE(wire::decode(f.second, e, "error"));
  return e;
}

wire::HelloRequest hello(wire::Role role) {
  wire::HelloRequest h;
  h.role = role;
  h.instance_id = net::random_instance_id();
  h.client_name = "bad_input_test";
  return h;
}

// Clients HELLO as bad_input_test, so the server's log names them.
struct Client : test::Client {
  Client(asio::io_context& io, const std::string& endpoint, wire::Role role)
      : test::Client(io, endpoint, role, "bad_input_test") {}
};

const std::uint64_t ns = store::namespace_id({"bad-input-model", 1, ""});

// 4 layers, 64 blocks of 16 tokens, 4 KiB per block; a chunk is 16 blocks.
wire::KvLayout kv_layout() { return wire::paged_layout(4, 64, 16, 2, 64, 2); }

// An engine's KV cache: a sealed memfd of the layout's size, mapped here.
struct Memory {
  UniqueFd fd;
  std::unique_ptr<std::byte, transfer::Unmap> mapping;
  std::byte* base = nullptr;
  std::size_t size = 0;
  explicit Memory(const wire::KvLayout& l = kv_layout()) : size(l.region_bytes) {
    auto kv = transfer::create_kv_memfd(l, {.name = "bad_input_test-kv"});
    REQUIRE_MESSAGE(kv, kv.error().message());
    fd = std::move(kv->fd);
    mapping = std::move(kv->memory);
    base = mapping.get();
  }
};

std::vector<wire::ChunkHash> prompt(std::size_t chunks, std::uint32_t salt) {
  std::vector<store::Token> t(chunks * 256);
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<store::Token>(i * 7 + salt);
  return store::chunk_hashes(t, 256);
}

std::vector<std::uint32_t> ids(std::uint32_t first, std::uint32_t n) {
  std::vector<std::uint32_t> v(n);
  for (std::uint32_t i = 0; i < n; ++i) v[i] = first + i;
  return v;
}

wire::RegisterKvCacheRequest registration(const wire::KvLayout& l = kv_layout()) {
  wire::RegisterKvCacheRequest r;
  r.ns = ns;
  r.model = "bad-input-model";
  r.layout = l;
  return r;
}

// A worker that stored 2 chunks of known bytes (blocks 0..31) and can check
// that they still come back byte-exact (into blocks 32..63).
struct Victim {
  Client worker;
  Memory mem;
  std::vector<wire::ChunkHash> hashes = prompt(2, 12345);
  std::vector<std::byte> expected;
  Victim(asio::io_context& io, const std::string& endpoint) : worker(io, endpoint, wire::Role::worker) {
    worker.ok(registration(), mem.fd.get());
    for (std::size_t i = 0; i < mem.size; ++i) mem.base[i] = static_cast<std::byte>((i * 131 + 7) % 251);
    wire::StoreRequest st;
    st.ns = ns;
    st.hashes = hashes;
    st.block_ids = ids(0, 32);
    REQUIRE(worker.ok(st).stored_chunks == 2);
    const auto l = kv_layout();
    for (std::uint32_t layer = 0; layer < 4; ++layer)
      for (std::uint32_t plane = 0; plane < 2; ++plane) {
        const std::byte* p = mem.base + l.layers[layer].offset + plane * l.plane_stride;
        expected.insert(expected.end(), p, p + 32 * l.block_stride);
      }
  }
  bool intact() {
    std::memset(mem.base, 0, mem.size);
    wire::RetrieveRequest rt;
    rt.ns = ns;
    rt.hashes = hashes;
    rt.block_ids = ids(32, 32);
    if (worker.ok(rt).retrieved_chunks != 2) return false;
    const auto l = kv_layout();
    std::vector<std::byte> got;
    for (std::uint32_t layer = 0; layer < 4; ++layer)
      for (std::uint32_t plane = 0; plane < 2; ++plane) {
        const std::byte* p = mem.base + l.layers[layer].offset + plane * l.plane_stride + 32 * l.block_stride;
        got.insert(got.end(), p, p + 32 * l.block_stride);
      }
    return got == expected;
  }
};

}  // namespace

TEST_CASE("bad frames: each gets a clear error and closes only its connection; stored data stays intact") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--max-payload", "65536", "--log-level",
                        "off"});
  server.start();
  asio::io_context io;
  Victim victim(io, server.endpoint());
  Client admin(io, server.endpoint(), wire::Role::admin);
  const std::int64_t open_before = admin.stat("connections_open");

  SUBCASE("oversized length: frame_too_large naming --max-payload") {
    RawSocket raw(server.endpoint());
    wire::Bytes f = frame(static_cast<std::uint8_t>(wire::Opcode::ping), 9, {});
    const std::uint32_t huge = 65537;
    std::memcpy(f.data() + 16, &huge, 4);  // the header's payload length
    raw.send(f);
    auto [frames, eof] = raw.read_to_eof();
    CHECK(eof);
    REQUIRE(frames.size() == 1);
    auto e = error_of(frames[0]);
    CHECK(e.code == static_cast<std::uint16_t>(errc::frame_too_large));
    CHECK(e.message.find("65537 bytes exceeds the maximum of 65536") != std::string::npos);
    CHECK(e.message.find("--max-payload") != std::string::npos);
    CHECK(admin.stat("frames_too_large") == 1);
  }
  SUBCASE("a 4 GiB length field is refused before anything is buffered") {
    RawSocket raw(server.endpoint());
    wire::Bytes f = frame(static_cast<std::uint8_t>(wire::Opcode::ping), 9, {});
    const std::uint32_t huge = 0xffffffffu;
    std::memcpy(f.data() + 16, &huge, 4);
    raw.send(f);
    auto [frames, eof] = raw.read_to_eof();
    CHECK(eof);
    REQUIRE(frames.size() == 1);
    CHECK(error_of(frames[0]).code == static_cast<std::uint16_t>(errc::frame_too_large));
  }
  SUBCASE("wrong protocol version: version_mismatch saying which versions") {
    RawSocket raw(server.endpoint());
    wire::Bytes f = frame(static_cast<std::uint8_t>(wire::Opcode::hello), 1, payload_of(hello(wire::Role::admin)));
    f[4] = std::byte{99};  // the header's version byte
    raw.send(f);
    auto [frames, eof] = raw.read_to_eof();
    CHECK(eof);
    REQUIRE(frames.size() == 1);
    auto e = error_of(frames[0]);
    CHECK(e.code == static_cast<std::uint16_t>(errc::version_mismatch));
    CHECK(e.message.find("peer speaks version 99") != std::string::npos);
  }
  SUBCASE("truncated frames: a partial header, a partial payload, then the client goes away") {
    {
      RawSocket raw(server.endpoint());
      wire::Bytes f = frame(static_cast<std::uint8_t>(wire::Opcode::hello), 1, payload_of(hello(wire::Role::admin)));
      raw.send(wire::Bytes(f.begin(), f.begin() + 10));
    }
    {
      RawSocket raw(server.endpoint());
      wire::Bytes f = frame(static_cast<std::uint8_t>(wire::Opcode::hello), 1, payload_of(hello(wire::Role::admin)));
      raw.send(wire::Bytes(f.begin(), f.end() - 3));
      ::shutdown(raw.fd, SHUT_WR);
      auto [frames, eof] = raw.read_to_eof();  // nothing to answer: the server just closes
      CHECK(eof);
      CHECK(frames.empty());
    }
  }
  SUBCASE("a payload that ends inside a field: protocol_error naming the field; the connection stays") {
    RawSocket raw(server.endpoint());
    raw.send(frame(static_cast<std::uint8_t>(wire::Opcode::hello), 1, payload_of(hello(wire::Role::worker))));
    wire::StoreRequest st;
    st.ns = ns;
    st.hashes = prompt(1, 1);
    st.block_ids = ids(0, 16);
    wire::Bytes p = payload_of(st);
    p.resize(8 + 4 + (4 + 16) + (4 + 16 * 4) - 3);  // ns, kv_rank, hashes, then 3 bytes short of block_ids' end
    raw.send(frame(static_cast<std::uint8_t>(wire::Opcode::store), 2, p));
    // A count of 2^32-1 hashes with a few bytes behind it: refused, nothing allocated.
    wire::Bytes huge = payload_of(st);
    const std::uint32_t n = 0xffffffffu;
    std::memcpy(huge.data() + 12, &n, 4);  // after ns (8) and kv_rank (4)
    raw.send(frame(static_cast<std::uint8_t>(wire::Opcode::store), 3, huge));
    // FREE_LOOKUP_LOCKS (sent here as a request with a reply) with a range past its hashes.
    wire::FreeLookupLocksRequest fl;
    fl.ns = ns;
    fl.hashes = prompt(2, 1);
    fl.start = 1;
    fl.end = 0xffffffffu;
    raw.send(frame(static_cast<std::uint8_t>(wire::Opcode::free_lookup_locks), 5, payload_of(fl)));
    raw.send(frame(static_cast<std::uint8_t>(wire::Opcode::ping), 4, {}));
    ::shutdown(raw.fd, SHUT_WR);
    auto [frames, eof] = raw.read_to_eof();
    CHECK(eof);
    REQUIRE(frames.size() == 5);
    CHECK_FALSE(frames[0].first.is_error());
    auto truncated = error_of(frames[1]);
    CHECK(truncated.code == static_cast<std::uint16_t>(errc::protocol_error));
    CAPTURE(truncated.message);
    CHECK(truncated.message.find("block_ids") != std::string::npos);
    auto counted = error_of(frames[2]);
    CHECK(counted.code == static_cast<std::uint16_t>(errc::protocol_error));
    CHECK(counted.message.find("hashes") != std::string::npos);
    auto range = error_of(frames[3]);
    CHECK(range.code == static_cast<std::uint16_t>(errc::bad_request));
    CHECK(range.message == "FREE_LOOKUP_LOCKS range [1, 4294967295) is not within the 2 hashes given");
    CHECK_FALSE(frames[4].first.is_error());  // PING still answered
  }
  SUBCASE("a response frame from a client: protocol_error, closed") {
    RawSocket raw(server.endpoint());
    raw.send(frame(static_cast<std::uint8_t>(wire::Opcode::ping), 5, {}, wire::flag::response));
    auto [frames, eof] = raw.read_to_eof();
    CHECK(eof);
    REQUIRE(frames.size() == 1);
    CHECK(error_of(frames[0]).message.find("clients send requests, not responses") == 0);
  }
  SUBCASE("a request with a reply sent one-way: protocol_error as the connection's error, closed") {
    RawSocket raw(server.endpoint());
    raw.send(frame(static_cast<std::uint8_t>(wire::Opcode::hello), 1, payload_of(hello(wire::Role::scheduler))));
    raw.send(frame(static_cast<std::uint8_t>(wire::Opcode::ping), 6, {}, wire::flag::one_way));
    auto [frames, eof] = raw.read_to_eof();
    CHECK(eof);
    REQUIRE(frames.size() == 2);  // HELLO's reply, then the error
    CHECK(frames[1].first.id == 0);
    auto e = error_of(frames[1]);
    CHECK(e.code == static_cast<std::uint16_t>(errc::protocol_error));
    CHECK(e.message.find("PING was sent one-way, but it has a reply") == 0);
  }

  // Others are still served, the broken connections are gone, nothing stored changed.
  CHECK_FALSE(admin.call(wire::PingRequest{}).ec);
  CHECK(test::run_until(io, [&] { return admin.stat("connections_open") == open_before; }, 5s));
  CHECK(victim.intact());
}

TEST_CASE("bad store arguments: clear errors, the connection stays, stored data stays intact") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--log-level", "off"});
  server.start();
  asio::io_context io;
  Victim victim(io, server.endpoint());
  Client worker(io, server.endpoint(), wire::Role::worker);
  Memory mem;

  // Layouts that do not fit their memory.
  auto reg = registration();
  reg.layout.layers[3].offset = reg.layout.region_bytes;  // a layer past the region
  auto r = worker.call(reg, mem.fd.get());
  CHECK(r.ec == errc::bad_request);
  CHECK(r.message.find("layer 3") != std::string::npos);
  CHECK(r.message.find("extends past the registered region") != std::string::npos);
  reg = registration();
  reg.layout.block_stride = 1;
  r = worker.call(reg, mem.fd.get());
  CHECK(r.ec == errc::bad_request);
  CHECK(r.message.find("block_stride 1 is smaller than one block") != std::string::npos);
  reg = registration();
  reg.kv_rank = 3;
  r = worker.call(reg, mem.fd.get());
  CHECK(r.message.find("kv_rank 3 is not below world_size 1") != std::string::npos);
  reg = registration();
  reg.world_size = 100000;
  reg.kv_rank = 0;
  r = worker.call(reg, mem.fd.get());
  CHECK(r.message.find("world_size 100000 is out of range") != std::string::npos);
  // A chunk larger than an L1 slab (2 MiB of 16 MiB): no layout class can
  // hold it; the victim's layout is unaffected (checked below).
  reg = registration(wire::paged_layout(32, 64, 16, 2, 64, 2));  // 4 MiB chunks
  r = worker.call(reg, mem.fd.get());
  CHECK(r.ec == errc::bad_request);
  CHECK(r.message.find("more than an L1 slab") != std::string::npos);
  CHECK(r.message.find("raise --l1-slab-size") != std::string::npos);

  // Registering again on the same connection replaces the registration (a
  // worker re-registering after a reconnect does the same).
  worker.ok(registration(), mem.fd.get());
  worker.ok(registration(), mem.fd.get());

  // Out-of-range block ids, for STORE and RETRIEVE.
  wire::StoreRequest st;
  st.ns = ns;
  st.hashes = prompt(1, 99);
  st.block_ids = ids(50, 16);  // 50..65: 64 and 65 are beyond num_blocks 64
  auto s = worker.call(st);
  CHECK(s.ec == errc::bad_request);
  CHECK(s.message == "block id 64 (position 14) is not below the registered num_blocks 64");
  st.block_ids = ids(0, 16);
  st.block_ids[3] = 0xffffffffu;
  CHECK(worker.call(st).message.find("block id 4294967295 (position 3)") == 0);
  wire::RetrieveRequest rt;
  rt.ns = ns;
  rt.hashes = victim.hashes;
  rt.block_ids = ids(40, 32);
  auto rr = worker.call(rt);
  CHECK(rr.ec == errc::bad_request);
  CHECK(rr.message.find("block id 64 (position 24)") == 0);

  // Huge counts and offsets.
  rt.block_ids = ids(32, 32);
  rt.skip_first_n_tokens = 0xffffffffu;
  rr = worker.call(rt);
  CHECK(rr.ec == errc::bad_request);
  CHECK(rr.message.find("skip_first_n_tokens 4294967295 exceeds the 512 tokens") == 0);
  wire::SyncLookupRequest sl;
  sl.ns = ns;
  sl.world_size = 0;
  CHECK(worker.call(sl).message.find("world_size 0 is out of range") == 0);
  sl.world_size = 1024;
  sl.hashes = std::vector<wire::ChunkHash>(5000);
  CHECK(worker.call(sl).message.find("more than 4194304 keys in one request") != std::string::npos);
  // The worker's own registration is unharmed too: it can store and retrieve.
  CHECK_FALSE(worker.call(wire::PingRequest{}).ec);
  st.block_ids = ids(0, 16);
  CHECK(worker.ok(st).stored_chunks == 1);
  CHECK(victim.intact());
}

// ---- the KV memfd must be sealed: its size cannot change under the server ----------

namespace {

// STOREs blocks 0..31 of `mem` (known bytes) as 2 chunks, wipes them,
// RETRIEVEs into blocks 32..63; true if the bytes came back.
bool round_trip(Client& worker, Memory& mem, std::uint32_t salt) {
  const auto l = kv_layout();
  for (std::size_t i = 0; i < mem.size; ++i) mem.base[i] = static_cast<std::byte>((i * 7 + salt) % 253);
  std::vector<std::byte> expected;
  for (std::uint32_t layer = 0; layer < 4; ++layer)
    for (std::uint32_t plane = 0; plane < 2; ++plane) {
      const std::byte* p = mem.base + l.layers[layer].offset + plane * l.plane_stride;
      expected.insert(expected.end(), p, p + 32 * l.block_stride);
    }
  wire::StoreRequest st;
  st.ns = ns;
  st.hashes = prompt(2, salt);
  st.block_ids = ids(0, 32);
  if (worker.ok(st).stored_chunks != 2) return false;
  std::memset(mem.base, 0, mem.size);
  wire::RetrieveRequest rt;
  rt.ns = ns;
  rt.hashes = st.hashes;
  rt.block_ids = ids(32, 32);
  if (worker.ok(rt).retrieved_chunks != 2) return false;
  std::vector<std::byte> got;
  for (std::uint32_t layer = 0; layer < 4; ++layer)
    for (std::uint32_t plane = 0; plane < 2; ++plane) {
      const std::byte* p = mem.base + l.layers[layer].offset + plane * l.plane_stride + 32 * l.block_stride;
      got.insert(got.end(), p, p + 32 * l.block_stride);
    }
  return got == expected;
}

}  // namespace

TEST_CASE("a registered KV memfd is sealed: the engine cannot shrink it, STORE and RETRIEVE go on, the server lives") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--log-level", "error"});
  server.start();
  asio::io_context io;
  Client worker(io, server.endpoint(), wire::Role::worker);
  Memory mem;  // create_kv_memfd
  worker.ok(registration(), mem.fd.get());

  // Shrinking the memfd under the server's mapping (which made the next copy
  // kill the server with SIGBUS) is refused by the kernel; so is growing it.
  // (errno read at once: doctest's output may change it before a CHECK.)
  auto resize_error = [&](std::size_t bytes) {
    return ::ftruncate(mem.fd.get(), static_cast<off_t>(bytes)) == 0 ? 0 : errno;
  };
  CHECK(resize_error(0) == EPERM);
  CHECK(resize_error(mem.size / 2) == EPERM);
  CHECK(resize_error(mem.size * 2) == EPERM);
  struct stat st {};
  REQUIRE(::fstat(mem.fd.get(), &st) == 0);
  CHECK(static_cast<std::size_t>(st.st_size) == mem.size);

  CHECK(round_trip(worker, mem, 1));
  CHECK_FALSE(worker.call(wire::PingRequest{}).ec);
  CHECK(server.terminate() == 0);  // exited by SIGTERM, not killed by a signal
}

TEST_CASE("an unsealed KV memfd (or a regular file) is refused naming the seals; the server and other engines go on") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--log-level", "error"});
  server.start();
  asio::io_context io;
  Victim victim(io, server.endpoint());  // another engine, registered and storing
  Client worker(io, server.endpoint(), wire::Role::worker);
  const auto l = kv_layout();

  // Made by hand on purpose: a memfd of the right size that can still be
  // resized, as engines made them before the seals were required.
  UniqueFd unsealed(::memfd_create("bad_input_test-unsealed", MFD_CLOEXEC));
  REQUIRE(unsealed);
  REQUIRE(::ftruncate(unsealed.get(), static_cast<off_t>(l.region_bytes)) == 0);
  auto r = worker.call(registration(), unsealed.get());
  CHECK(r.ec == errc::bad_request);
  CHECK_MESSAGE(r.message.find("not sealed against resizing (it lacks F_SEAL_SHRINK and F_SEAL_GROW)") !=
                    std::string::npos,
                r.message);
  CHECK(r.message.find("seal the memfd with F_SEAL_SHRINK|F_SEAL_GROW, e.g. with kvlink::transfer::create_kv_memfd") !=
        std::string::npos);
  // The refused registration mapped nothing: shrinking the memfd now and
  // sending a STORE cannot reach it (the worker is not registered).
  REQUIRE(::ftruncate(unsealed.get(), 0) == 0);
  wire::StoreRequest st;
  st.ns = ns;
  st.hashes = prompt(1, 77);
  st.block_ids = ids(0, 16);
  CHECK(worker.call(st).ec == errc::not_registered);

  // A regular file cannot be sealed at all: refused, and the message says so.
  const std::string path = dir.path() + "/kv-file";
  UniqueFd file(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  REQUIRE(file);
  REQUIRE(::ftruncate(file.get(), static_cast<off_t>(l.region_bytes)) == 0);
  r = worker.call(registration(), file.get());
  CHECK(r.ec == errc::bad_request);
  // (A file on tmpfs reports F_SEAL_SEAL, elsewhere F_GET_SEALS fails: refused either way.)
  CHECK_MESSAGE((r.message.find("cannot be sealed") != std::string::npos ||
                 r.message.find("not sealed against resizing") != std::string::npos),
                r.message);
  CHECK(r.message.find("F_SEAL_SHRINK|F_SEAL_GROW") != std::string::npos);

  // The server is up, the other engine's data is intact and it keeps
  // storing, and the refused worker registers fine with a sealed memfd.
  CHECK_FALSE(worker.call(wire::PingRequest{}).ec);
  CHECK(victim.intact());
  Memory mem;
  worker.ok(registration(), mem.fd.get());
  CHECK(round_trip(worker, mem, 2));
  CHECK(victim.intact());
  CHECK(server.terminate() == 0);
}

TEST_CASE("a sealed KV memfd smaller than its layout is refused naming both sizes") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--log-level", "error"});
  server.start();
  asio::io_context io;
  Victim victim(io, server.endpoint());
  Client worker(io, server.endpoint(), wire::Role::worker);
  const auto l = kv_layout();
  auto smaller = l;
  smaller.region_bytes = l.region_bytes - 4096;
  Memory small(smaller);  // sealed at region_bytes - 4 KiB: it can never grow to fit
  auto r = worker.call(registration(), small.fd.get());
  CHECK(r.ec == errc::bad_request);
  CHECK_MESSAGE(r.message.find(fmt::format("memfd is {} bytes, layout needs {} (region_bytes)", smaller.region_bytes,
                                           l.region_bytes)) == 0,
                r.message);
  CHECK(r.message.find("create_kv_memfd") != std::string::npos);
  CHECK_FALSE(worker.call(wire::PingRequest{}).ec);
  CHECK(victim.intact());
  CHECK(server.terminate() == 0);
}

TEST_CASE("lookup locks: an abort storm leaves none held; schedulers never release each other's; a failed RETRIEVE releases its own") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--log-level", "error"});
  server.start();
  asio::io_context io;
  Victim victim(io, server.endpoint());
  Client one(io, server.endpoint(), wire::Role::scheduler);
  Client two(io, server.endpoint(), wire::Role::scheduler);
  auto lookup = [&](Client& s, std::uint64_t session) {
    wire::SyncLookupRequest sl;
    sl.ns = ns;
    sl.session_id = session;
    sl.hashes = victim.hashes;
    return s.ok(sl).matched_chunks;
  };
  auto end_session = [&](Client& s, std::uint64_t session) {
    wire::EndSessionRequest es;
    es.ns = ns;
    es.session_id = session;
    es.hashes = victim.hashes;
    s.conn->send(es);
  };

  // 300 requests looked up and aborted, by two schedulers at once.
  for (std::uint64_t i = 1; i <= 150; ++i) {
    REQUIRE(lookup(one, i) == 2);
    REQUIRE(lookup(two, i) == 2);
    end_session(one, i);
    end_session(two, i);
  }
  // One-way messages are handled in order per connection: a STATS on each
  // comes after that connection's END_SESSIONs.
  one.stat("read_locks_held");
  CHECK(two.stat("read_locks_held") == 0);
  CHECK(two.stat("l1_pinned_bytes") == 0);

  // The same session id from two schedulers: each ends only its own.
  REQUIRE(lookup(one, 7) == 2);
  REQUIRE(lookup(two, 7) == 2);
  end_session(two, 7);
  CHECK(two.stat("read_locks_held") == 2);
  CHECK(two.stat("l1_pinned_bytes") == 2 * 4 * 2 * 16 * 4096);
  end_session(one, 7);
  CHECK(one.stat("read_locks_held") == 0);

  // A RETRIEVE that fails (a block beyond the cache) releases the locks its
  // request's lookup took.
  REQUIRE(lookup(one, 9) == 2);
  wire::RetrieveRequest rt;
  rt.ns = ns;
  rt.session_id = 9;
  rt.hashes = victim.hashes;
  rt.block_ids = ids(40, 32);  // 40..71: past the 64 blocks
  CHECK(victim.worker.call(rt).ec == errc::bad_request);
  CHECK(one.stat("read_locks_held") == 0);
  CHECK(one.stat("l1_pinned_bytes") == 0);
  CHECK(victim.intact());
}
