// Every message of the protocol: round trip, every truncation rejected,
// trailing bytes and absurd counts rejected with an error naming the field.
#include <doctest/doctest.h>

#include <cstring>
#include <tuple>

#include "kvlink/wire/messages.hpp"

using namespace kvlink::wire;

namespace {

ChunkHash hash(std::uint64_t i) { return {i * 0x9E3779B97F4A7C15ull, ~i}; }

std::vector<ChunkHash> hashes(int n) {
  std::vector<ChunkHash> v;
  for (int i = 0; i < n; ++i) v.push_back(hash(static_cast<std::uint64_t>(i) + 1));
  return v;
}

KvLayout sample_layout() {
  KvLayout l;
  l.num_layers = 2;
  l.num_blocks = 8;
  l.block_size = 16;
  l.num_kv_heads = 2;
  l.head_size = 4;
  l.dtype_size = 2;
  l.block_stride = l.block_bytes();
  l.plane_stride = l.block_bytes() * l.num_blocks;
  l.region_bytes = 2 * l.plane_stride * 2;
  l.layers = {{0, {}}, {2 * l.plane_stride, {}}};
  l.device_uuid[3] = std::byte{7};
  return l;
}

// One sample of every message, with non-default values in every field.
auto samples() {
  HelloRequest hello;
  hello.role = Role::worker;
  hello.instance_id = 0x1234'5678'9abcull;
  hello.auth_token = "secret";
  hello.client_name = "test";
  HelloReply hello_reply{42, 256, 1 << 20, 128, capability::cpu_transfer, "0.1.0"};
  RegisterKvCacheRequest reg;
  reg.ns = 99;
  reg.model = "llama";
  reg.world_size = 2;
  reg.kv_rank = 1;
  reg.layout = sample_layout();
  LookupRequest lookup{7, 2, 11, hashes(3)};
  SyncLookupRequest sync{7, 2, 12, hashes(4)};
  FreeLookupLocksRequest free_locks{7, 2, 99, hashes(4), 1, 3};
  StoreRequest store{7, 1, hashes(2), {1, 2, 3, 4}, Bytes(64, std::byte{1})};
  RetrieveRequest retrieve{7, 1, hashes(2), {5, 6, 7, 8}, 16, {}, 0, 42};
  EndSessionRequest end{7, 12, hashes(1)};
  ReportBlockAllocationRequest report{12, 30, 100};
  StatsReply stats{{{"a", 1}, {"b", -2}}};
  return std::make_tuple(hello, hello_reply, PingRequest{}, ErrorReply{9, "bad"}, reg, UnregisterKvCacheRequest{},
                         lookup, LookupAccepted{5}, QueryPrefetchStatusRequest{5},
                         PrefetchStatus{PrefetchState::done, 3}, sync, LookupResult{4}, free_locks, store,
                         StoreResult{2, 1}, retrieve, RetrieveResult{2}, end, report, ClearRequest{}, ClearResult{10},
                         StatsRequest{}, stats);
}

template <class M>
void check_message(const M& m) {
  const Bytes bytes = encode(m);
  CAPTURE(typeid(M).name());
  M back{};
  REQUIRE_FALSE(decode(bytes, back, "MSG"));
  CHECK(encode(back) == bytes);  // every field survived

  // Every strict prefix is rejected, never read past.
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    M partial{};
    kvlink::Error err = decode(std::span(bytes.data(), n), partial, "MSG");
    CHECK_MESSAGE(err, "prefix of " << n << " bytes accepted");
    if (err) CHECK(err.message().starts_with("MSG: "));
    if (err) CHECK(err == kvlink::errc::protocol_error);
  }
  // Trailing garbage is rejected.
  Bytes longer = bytes;
  longer.push_back(std::byte{0});
  M extra{};
  CHECK(decode(longer, extra, "MSG").message().find("trailing") != std::string::npos);
}

}  // namespace

TEST_CASE("every message round-trips and rejects truncation and trailing bytes") {
  std::apply([](const auto&... m) { (check_message(m), ...); }, samples());
}

TEST_CASE("a huge element count is rejected without allocating") {
  LookupRequest l{1, 1, 1, hashes(1)};
  Bytes bytes = encode(l);
  // hashes count sits after ns (8), world_size (4), session_id (8).
  const std::uint32_t huge = 0xFFFF'FFFF;
  std::memcpy(bytes.data() + 20, &huge, 4);
  LookupRequest back;
  std::string why = decode(bytes, back).message();
  CHECK(why.find("hashes") != std::string::npos);
  CHECK(why.find("limit") != std::string::npos);

  const std::uint32_t plausible = 1000;  // under the limit but more than the bytes left
  std::memcpy(bytes.data() + 20, &plausible, 4);
  why = decode(bytes, back).message();
  CHECK(why.find("truncated at field 'hashes'") != std::string::npos);
}

TEST_CASE("HELLO validation names what is wrong") {
  HelloRequest h;
  h.instance_id = 0;
  HelloRequest back;
  CHECK(decode(encode(h), back).message().find("instance_id") != std::string::npos);
  h.instance_id = 1;
  h.protocol_version = 99;
  CHECK(decode(encode(h), back).message().find("protocol version 99") != std::string::npos);
  CHECK(decode(encode(h), back) == kvlink::errc::version_mismatch);
  h.protocol_version = protocol_version;
  h.role = static_cast<Role>(9);
  CHECK(decode(encode(h), back).message().find("role 9") != std::string::npos);
  h.role = Role::worker;
  CHECK_FALSE(decode(encode(h), back));
}

TEST_CASE("KV layout validation rejects layouts that do not fit their region") {
  RegisterKvCacheRequest r;
  r.model = "m";
  r.layout = sample_layout();
  RegisterKvCacheRequest back;
  CHECK_FALSE(decode(encode(r), back));

  auto bad = r;
  bad.layout.region_bytes -= 1;
  CHECK(decode(encode(bad), back).message().find("extends past the registered region") != std::string::npos);
  bad = r;
  bad.layout.block_stride = 1;
  CHECK(decode(encode(bad), back).message().find("block_stride") != std::string::npos);
  bad = r;
  bad.layout.layers.pop_back();
  CHECK(decode(encode(bad), back).message().find("layer locations") != std::string::npos);
  bad = r;
  bad.model.clear();
  CHECK(decode(encode(bad), back).message().find("model name is empty") != std::string::npos);
  bad = r;
  bad.kv_rank = 5;
  CHECK(decode(encode(bad), back).message().find("kv_rank 5") != std::string::npos);
  bad = r;
  bad.layout.block_stride = ~0ull;  // would wrap 64-bit arithmetic
  CHECK(decode(encode(bad), back).message().find("overflows") != std::string::npos);
}

TEST_CASE("a boolean field only accepts 0 or 1") {
  Bytes b{std::byte{2}};
  Reader r(b, "X");
  bool v = false;
  r.boolean(v, "flag");
  CHECK(!r.ok());
  CHECK(r.error().find("'flag'") != std::string::npos);
}

TEST_CASE("paged_layout derives strides, layer offsets and the region for both orders") {
  for (auto order : {PagedOrder::planes_first, PagedOrder::blocks_first}) {
    const KvLayout l = paged_layout(3, 10, 16, 2, 8, 2, order);
    const std::uint64_t bb = 16 * 2 * 8 * 2;
    CHECK(l.block_bytes() == bb);
    CHECK_FALSE(l.check());
    CHECK(l.region_bytes == 3 * 2 * 10 * bb);
    CHECK(l.layers.at(2).offset == 2 * 2 * 10 * bb);  // layers follow each other
    if (order == PagedOrder::planes_first) {
      CHECK(l.block_stride == bb);
      CHECK(l.plane_stride == 10 * bb);
    } else {
      CHECK(l.block_stride == 2 * bb);
      CHECK(l.plane_stride == bb);
    }
  }
}
