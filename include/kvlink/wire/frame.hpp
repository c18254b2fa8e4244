// Framing: a fixed 24-byte little-endian header, then the payload.
//
//   u32 magic "KVLK" | u8 version | u8 opcode | u16 flags | u64 request id
//   | u32 payload length | u32 reserved (0)
//
// Sans-io: FrameParser turns a byte stream into frames and FrameBuilder
// appends frames to a buffer; the Asio layer only moves bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "kvlink/wire/codec.hpp"

namespace kvlink::wire {

inline constexpr std::uint32_t frame_magic = 0x4B4C564B;  // bytes "KVLK"
inline constexpr std::uint8_t protocol_version = 4;
inline constexpr std::size_t header_size = 24;
// Largest payload either side accepts before HELLO negotiates one.
inline constexpr std::uint32_t default_max_payload = 16u << 20;
// HELLO and its reply must fit this before limits are known.
inline constexpr std::uint32_t min_max_payload = 4096;

enum class Opcode : std::uint8_t {
  hello = 1,
  ping = 2,
  register_kv_cache = 3,
  unregister_kv_cache = 4,
  lookup = 5,
  query_prefetch_status = 6,
  sync_lookup = 7,
  free_lookup_locks = 8,
  store = 9,
  retrieve = 10,
  end_session = 11,
  report_block_allocation = 12,
  clear = 13,
  stats = 14,
  server_notice = 15,  // server -> client, one-way (e.g. draining before a planned restart)
};
inline constexpr std::uint8_t max_opcode = 15;

// Name for logs and errors ("PING"); "OP_<n>" for values outside the table.
std::string opcode_name(std::uint8_t op);
inline std::string opcode_name(Opcode op) { return opcode_name(static_cast<std::uint8_t>(op)); }

// Requests a client may send one-way (flag::one_way): those whose reply
// carries nothing. Any other gets its reply, or an error, so one-way makes
// no sense for it; the server refuses that as a protocol error.
constexpr bool one_way_allowed(Opcode op) {
  return op == Opcode::free_lookup_locks || op == Opcode::end_session || op == Opcode::report_block_allocation;
}

namespace flag {
inline constexpr std::uint16_t response = 1;  // a reply to request `id`
inline constexpr std::uint16_t error = 2;     // payload is ErrorReply
inline constexpr std::uint16_t one_way = 4;   // request that gets no reply
inline constexpr std::uint16_t known = response | error | one_way;
}  // namespace flag

struct Header {
  std::uint8_t version = protocol_version;
  std::uint8_t opcode = 0;
  std::uint16_t flags = 0;
  std::uint64_t id = 0;
  std::uint32_t length = 0;

  bool is_response() const { return (flags & flag::response) != 0; }
  bool is_error() const { return (flags & flag::error) != 0; }
  bool is_one_way() const { return (flags & flag::one_way) != 0; }
};

// Appends whole frames to a byte buffer. The payload is encoded straight into
// the buffer (no temporary), then the length is patched in.
class FrameBuilder {
 public:
  explicit FrameBuilder(Bytes& out) : out_(out) {}

  // Encodes one frame; `encode` receives a Writer for the payload.
  template <class EncodePayload>
  void add(std::uint8_t opcode, std::uint16_t flags, std::uint64_t id, EncodePayload&& encode) {
    // The header goes in with one copy (this is on every request's path);
    // its length field is patched once the payload is written.
    const std::size_t start = out_.size();
    std::byte header[header_size] = {};
    std::memcpy(header + 0, &frame_magic, 4);
    header[4] = static_cast<std::byte>(protocol_version);
    header[5] = static_cast<std::byte>(opcode);
    std::memcpy(header + 6, &flags, 2);
    std::memcpy(header + 8, &id, 8);
    out_.insert(out_.end(), header, header + header_size);
    Writer w(out_);
    encode(w);
    const auto length = static_cast<std::uint32_t>(out_.size() - start - header_size);
    std::memcpy(out_.data() + start + 16, &length, sizeof length);
  }

 private:
  Bytes& out_;
};

struct Frame {
  Header header;
  std::span<const std::byte> payload;  // valid until the parser is fed again
};

// Splits an incoming byte stream into frames. Feed bytes with `append` (or
// write into `prepare` + `commit` to avoid a copy), then call `next` until it
// returns nothing. A framing error (bad magic, reserved bits, oversized
// length) is final for the stream: the connection must be closed.
//
// Memory: once a frame's header is in, the buffer grows to hold that frame
// at once (not by doubling past it, so a frame at the maximum costs its size
// plus one read, not twice it); once a frame larger than working_size has
// been consumed, `prepare` (and `shrink`) give its memory back.
class FrameParser {
 public:
  // The buffer a stream of ordinary frames settles in; more than this is
  // released once the frame that needed it has been consumed.
  static constexpr std::size_t working_size = 256 * 1024;

  explicit FrameParser(std::uint32_t max_payload = default_max_payload) : max_payload_(max_payload) {}

  void set_max_payload(std::uint32_t max_payload) { max_payload_ = max_payload; }
  std::uint32_t max_payload() const { return max_payload_; }

  // Room for at least `at_least` more bytes (invalidates the frames returned so far).
  std::span<std::byte> prepare(std::size_t at_least);
  void commit(std::size_t n) { end_ += n; }
  void append(std::span<const std::byte> data);

  // The next whole frame, or nothing if more bytes are needed or on error.
  std::optional<Frame> next();

  // The header of the first frame not yet returned by `next`, once its
  // bytes are in and valid (nothing otherwise, or after a failure). When
  // `next` returned nothing without failing, this is the frame still
  // arriving: its length says how much the buffer is about to hold.
  std::optional<Header> peek() const;

  // Gives the buffer's memory back if it is above working_size and the
  // bytes still needed (the unconsumed ones, or the frame still arriving)
  // fit in working_size. Invalidates the frames returned so far; `prepare`
  // does it too.
  void shrink();
  // Bytes of memory the buffer holds (its capacity).
  std::size_t capacity() const { return buf_.capacity(); }

  bool failed() const { return !error_.empty(); }
  const std::string& error() const { return error_; }
  // A version mismatch is reported separately so the peer gets a precise answer.
  bool version_mismatch() const { return version_mismatch_; }
  std::uint8_t peer_version() const { return peer_version_; }
  // The failure was a frame longer than max_payload.
  bool too_large() const { return too_large_; }
  std::size_t buffered() const { return end_ - begin_; }

 private:
  Bytes buf_;
  std::size_t begin_ = 0;  // first unconsumed byte
  std::size_t end_ = 0;    // one past the last valid byte
  std::uint32_t max_payload_;
  std::string error_;
  bool version_mismatch_ = false;
  bool too_large_ = false;
  std::uint8_t peer_version_ = protocol_version;

  enum class HeaderCheck : std::uint8_t { ok, bad_magic, bad_version, bad_flags, too_large };
  // Decodes the header at begin_ (end_ - begin_ >= header_size) and checks it.
  HeaderCheck read_header(Header& h) const;
};

}  // namespace kvlink::wire
