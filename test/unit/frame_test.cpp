// The frame parser: any split of the byte stream yields the same frames;
// bad magic, versions, flags and oversized lengths are rejected.
#include <doctest/doctest.h>

#include <cstring>

#include "kvlink/wire/messages.hpp"

using namespace kvlink::wire;

namespace {

Bytes three_frames() {
  Bytes out;
  FrameBuilder b(out);
  b.add(static_cast<std::uint8_t>(Opcode::ping), 0, 1, [](Writer&) {});
  b.add(static_cast<std::uint8_t>(Opcode::lookup), 0, 2,
        [](Writer& w) { encode(w, LookupRequest{1, 1, 1, {ChunkHash{1, 2}}}); });
  b.add(static_cast<std::uint8_t>(Opcode::ping), flag::response, 3, [](Writer&) {});
  return out;
}

}  // namespace

TEST_CASE("frames survive any split of the stream") {
  const Bytes stream = three_frames();
  for (std::size_t chunk = 1; chunk <= stream.size(); ++chunk) {
    FrameParser p;
    std::vector<std::uint64_t> ids;
    for (std::size_t pos = 0; pos < stream.size(); pos += chunk) {
      const std::size_t n = std::min(chunk, stream.size() - pos);
      p.append(std::span(stream.data() + pos, n));
      while (auto f = p.next()) {
        ids.push_back(f->header.id);
        if (f->header.id == 2) {
          LookupRequest l;
          CHECK(decode(f->payload, l) == "");
          CHECK(l.hashes.size() == 1);
        }
      }
      REQUIRE_FALSE(p.failed());
    }
    CHECK(ids == std::vector<std::uint64_t>{1, 2, 3});
    CHECK(p.buffered() == 0);
  }
}

TEST_CASE("framing errors are final and named") {
  SUBCASE("bad magic") {
    Bytes s = three_frames();
    s[0] = std::byte{'X'};
    FrameParser p;
    p.append(s);
    CHECK_FALSE(p.next());
    CHECK(p.failed());
    CHECK(p.error().find("magic") != std::string::npos);
  }
  SUBCASE("other protocol version") {
    Bytes s = three_frames();
    s[4] = std::byte{protocol_version + 1};
    FrameParser p;
    p.append(s);
    CHECK_FALSE(p.next());
    CHECK(p.version_mismatch());
    CHECK(p.peer_version() == protocol_version + 1);
    CHECK(p.error().find("version") != std::string::npos);
  }
  SUBCASE("unknown flags") {
    Bytes s = three_frames();
    s[7] = std::byte{0x80};
    FrameParser p;
    p.append(s);
    CHECK_FALSE(p.next());
    CHECK(p.error().find("flags") != std::string::npos);
  }
  SUBCASE("payload over the maximum") {
    Bytes s = three_frames();
    const std::uint32_t big = 1u << 30;
    std::memcpy(s.data() + 16, &big, 4);
    FrameParser p(1u << 20);
    p.append(s);
    CHECK_FALSE(p.next());
    CHECK(p.error().find("exceeds the maximum") != std::string::npos);
  }
}

TEST_CASE("a partial frame waits for more bytes") {
  Bytes s = three_frames();
  FrameParser p;
  p.append(std::span(s.data(), header_size - 1));
  CHECK_FALSE(p.next());
  CHECK_FALSE(p.failed());
  p.append(std::span(s.data() + header_size - 1, 1));
  auto f = p.next();
  REQUIRE(f);
  CHECK(f->header.id == 1);
}

TEST_CASE("opcode names") {
  CHECK(opcode_name(Opcode::sync_lookup) == "SYNC_LOOKUP");
  CHECK(opcode_name(std::uint8_t{200}) == "OP_200");
}
