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
          CHECK_FALSE(decode(f->payload, l));
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

namespace {

// One frame with a payload of `size` bytes (each byte its offset, mod 251).
Bytes frame_of(std::size_t size, std::uint64_t id) {
  Bytes out;
  Bytes payload(size);
  for (std::size_t i = 0; i < size; ++i) payload[i] = std::byte(static_cast<std::uint8_t>(i % 251));
  FrameBuilder(out).add(static_cast<std::uint8_t>(Opcode::ping), 0, id,
                        [&](Writer& w) { w.raw(payload.data(), payload.size()); });
  return out;
}

// Feeds `bytes` in reads of `step` as a socket reader would (prepare,
// commit, next), collecting the ids and payload sizes of whole frames.
struct SocketReader {
  FrameParser p{1u << 26};
  std::vector<std::pair<std::uint64_t, std::size_t>> frames;
  std::size_t peak = 0;  // largest capacity seen
  void feed(const Bytes& bytes, std::size_t step) {
    for (std::size_t pos = 0; pos < bytes.size(); pos += step) {
      const std::size_t n = std::min(step, bytes.size() - pos);
      auto space = p.prepare(n);
      REQUIRE(space.size() >= n);
      std::memcpy(space.data(), bytes.data() + pos, n);
      p.commit(n);
      peak = std::max(peak, p.capacity());
      while (auto f = p.next()) {
        for (std::size_t i = 0; i < f->payload.size(); i += 4093)
          REQUIRE(f->payload[i] == std::byte(static_cast<std::uint8_t>(i % 251)));
        frames.emplace_back(f->header.id, f->payload.size());
      }
      REQUIRE_FALSE(p.failed());
    }
  }
};

}  // namespace

TEST_CASE("a large frame's memory is given back once it has been consumed") {
  const std::size_t big = 8u << 20;
  SocketReader r;
  r.feed(frame_of(big, 1), 4096);  // trickled in small reads
  REQUIRE(r.frames.size() == 1);
  CHECK(r.frames[0].second == big);
  // Grown once to the size the header announced (plus one read), not
  // doubled past it: a frame at the maximum costs its size, not twice it.
  CHECK(r.peak >= big);
  CHECK(r.peak <= big + header_size + 64 * 1024);
  // The frame is consumed; the next read gives its memory back.
  CHECK(r.p.capacity() >= big);
  r.p.prepare(2048);
  CHECK(r.p.capacity() <= FrameParser::working_size);
  // The stream goes on as before.
  r.feed(frame_of(100, 2), 7);
  CHECK(r.frames.back() == std::pair<std::uint64_t, std::size_t>{2, 100});
  CHECK(r.p.capacity() <= FrameParser::working_size);
}

TEST_CASE("shrink keeps the bytes of the next frame and waits for a large one still arriving") {
  const std::size_t big = 2u << 20;
  Bytes stream = frame_of(big, 1);
  const Bytes small = frame_of(1000, 2);
  const Bytes second_big = frame_of(big, 3);
  stream.insert(stream.end(), small.begin(), small.end());
  stream.insert(stream.end(), second_big.begin(), second_big.end());
  const std::size_t first_end = frame_of(big, 1).size();

  FrameParser p(1u << 26);
  // The first frame and half of the small one arrive together.
  p.append(std::span(stream.data(), first_end + small.size() / 2));
  auto f = p.next();
  REQUIRE(f);
  CHECK(f->header.id == 1);
  CHECK_FALSE(p.next());
  REQUIRE(p.peek());
  CHECK(p.peek()->id == 2);  // the frame still arriving
  CHECK(p.capacity() > FrameParser::working_size);
  p.shrink();
  CHECK(p.capacity() <= FrameParser::working_size);
  CHECK(p.buffered() == small.size() / 2);
  // The rest of the small frame, and the head of the second large one.
  p.append(std::span(stream.data() + first_end + small.size() / 2, small.size() / 2 + header_size + 10));
  f = p.next();
  REQUIRE(f);
  CHECK(f->header.id == 2);
  CHECK(f->payload.size() == 1000);
  CHECK(f->payload[999] == std::byte(999 % 251));
  CHECK_FALSE(p.next());
  REQUIRE(p.peek());
  CHECK(p.peek()->length == big);
  // A large frame on its way keeps what it needs.
  p.append(std::span(stream.data() + first_end + small.size() + header_size + 10, 1u << 20));
  const std::size_t held = p.capacity();
  CHECK(held >= big);
  p.shrink();
  CHECK(p.capacity() == held);
  p.append(std::span(stream.data() + first_end + small.size() + header_size + 10 + (1u << 20),
                     stream.size() - (first_end + small.size() + header_size + 10 + (1u << 20))));
  f = p.next();
  REQUIRE(f);
  CHECK(f->header.id == 3);
  CHECK(f->payload.size() == big);
  CHECK_FALSE(p.next());
  CHECK(p.buffered() == 0);
  p.shrink();
  CHECK(p.capacity() <= FrameParser::working_size);
}

TEST_CASE("ordinary traffic keeps its buffer") {
  // Many small frames in reads of every size: the buffer settles below the
  // working size and is never released and grown again.
  Bytes stream;
  for (std::uint64_t id = 1; id <= 2000; ++id) {
    const Bytes f = frame_of(id % 300, id);
    stream.insert(stream.end(), f.begin(), f.end());
  }
  SocketReader r;
  r.feed(stream, 65536);
  CHECK(r.frames.size() == 2000);
  CHECK(r.peak <= FrameParser::working_size);
  const std::size_t cap = r.p.capacity();
  r.p.prepare(2048);
  CHECK(r.p.capacity() == cap);
}

TEST_CASE("peek shows only a valid header") {
  Bytes s = frame_of(10, 5);
  FrameParser p;
  p.append(std::span(s.data(), header_size - 1));
  CHECK_FALSE(p.peek());
  p.append(std::span(s.data() + header_size - 1, 1));
  REQUIRE(p.peek());
  CHECK(p.peek()->id == 5);
  CHECK(p.peek()->length == 10);
  Bytes bad = s;
  bad[0] = std::byte{'X'};
  FrameParser q;
  q.append(bad);
  CHECK_FALSE(q.peek());
  Bytes huge = s;
  const std::uint32_t len = 1u << 30;
  std::memcpy(huge.data() + 16, &len, 4);
  FrameParser r(1u << 20);
  r.append(huge);
  CHECK_FALSE(r.peek());  // over the maximum: next() reports it, nothing grows for it
  CHECK(r.capacity() < 1u << 20);
}

TEST_CASE("opcode names") {
  CHECK(opcode_name(Opcode::sync_lookup) == "SYNC_LOOKUP");
  CHECK(opcode_name(std::uint8_t{200}) == "OP_200");
}
