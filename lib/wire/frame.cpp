#include "kvlink/wire/frame.hpp"

#include <algorithm>
#include <array>
#include <cstring>

namespace kvlink::wire {

std::string opcode_name(std::uint8_t op) {
  static constexpr std::array<std::string_view, max_opcode + 1> names = {
      "",      "HELLO",    "PING",  "REGISTER_KV_CACHE", "UNREGISTER_KV_CACHE", "LOOKUP", "QUERY_PREFETCH_STATUS",
      "SYNC_LOOKUP", "FREE_LOOKUP_LOCKS", "STORE", "RETRIEVE", "END_SESSION", "REPORT_BLOCK_ALLOCATION", "CLEAR",
      "STATS", "SERVER_NOTICE"};
  if (op >= 1 && op <= max_opcode) return std::string(names[op]);
  return "OP_" + std::to_string(op);
}

std::span<std::byte> FrameParser::prepare(std::size_t at_least) {
  if (begin_ == end_) begin_ = end_ = 0;
  shrink();
  if (buf_.size() - end_ < at_least) {
    // Move the unconsumed tail to the front, so the buffer does not grow
    // with the total bytes ever received.
    if (begin_ > 0) {
      std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
      end_ -= begin_;
      begin_ = 0;
    }
    const std::size_t want = end_ + at_least;
    if (want > buf_.capacity()) {
      // A frame whose header is in says what it needs: room for all of it
      // and one more read at once. Without one, grow geometrically.
      std::size_t cap = std::max(want, 2 * buf_.capacity());
      if (auto h = peek(); h && header_size + h->length > end_) cap = std::max(want, header_size + h->length + at_least);
      buf_.reserve(cap);
    }
  }
  // Use all spare capacity: one read takes as many frames as the kernel has.
  if (buf_.size() < buf_.capacity()) buf_.resize(buf_.capacity());
  return {buf_.data() + end_, buf_.size() - end_};
}

void FrameParser::shrink() {
  if (buf_.capacity() <= working_size) return;
  const std::size_t held = end_ - begin_;
  std::size_t needed = held;
  if (auto h = peek()) needed = std::max(needed, header_size + h->length);
  if (needed > working_size) return;  // a large frame is still being read or handled
  Bytes small(buf_.begin() + static_cast<std::ptrdiff_t>(begin_), buf_.begin() + static_cast<std::ptrdiff_t>(end_));
  buf_.swap(small);  // `small` (the large buffer) is freed here
  begin_ = 0;
  end_ = held;
}

void FrameParser::append(std::span<const std::byte> data) {
  if (data.empty()) return;  // memcpy from an empty span's null pointer is UB
  auto space = prepare(data.size());
  std::memcpy(space.data(), data.data(), data.size());
  commit(data.size());
}

FrameParser::HeaderCheck FrameParser::read_header(Header& h) const {
  const std::byte* p = buf_.data() + begin_;
  std::uint32_t magic = 0;
  std::uint32_t reserved = 0;
  std::memcpy(&magic, p, 4);
  h.version = static_cast<std::uint8_t>(p[4]);
  h.opcode = static_cast<std::uint8_t>(p[5]);
  std::memcpy(&h.flags, p + 6, 2);
  std::memcpy(&h.id, p + 8, 8);
  std::memcpy(&h.length, p + 16, 4);
  std::memcpy(&reserved, p + 20, 4);
  if (magic != frame_magic) return HeaderCheck::bad_magic;
  if (h.version != protocol_version) return HeaderCheck::bad_version;
  if (reserved != 0 || (h.flags & ~flag::known) != 0) return HeaderCheck::bad_flags;
  if (h.length > max_payload_) return HeaderCheck::too_large;
  return HeaderCheck::ok;
}

std::optional<Header> FrameParser::peek() const {
  if (failed() || end_ - begin_ < header_size) return std::nullopt;
  Header h;
  if (read_header(h) != HeaderCheck::ok) return std::nullopt;
  return h;
}

std::optional<Frame> FrameParser::next() {
  if (failed() || end_ - begin_ < header_size) return std::nullopt;
  Header h;
  switch (read_header(h)) {
    case HeaderCheck::ok:
      break;
    case HeaderCheck::bad_magic:
      error_ = "bad frame magic (not a kvlink peer, or the stream is out of sync)";
      return std::nullopt;
    case HeaderCheck::bad_version:
      version_mismatch_ = true;
      peer_version_ = h.version;
      error_ = "protocol version mismatch: peer speaks version " + std::to_string(h.version) + ", this side speaks " +
               std::to_string(protocol_version) + "; upgrade the older side";
      return std::nullopt;
    case HeaderCheck::bad_flags:
      error_ = "frame header has unknown flags or reserved bits set";
      return std::nullopt;
    case HeaderCheck::too_large:
      too_large_ = true;
      error_ = "frame payload of " + std::to_string(h.length) + " bytes exceeds the maximum of " +
               std::to_string(max_payload_);
      return std::nullopt;
  }
  if (end_ - begin_ < header_size + h.length) return std::nullopt;
  const std::byte* p = buf_.data() + begin_;
  Frame f{h, {p + header_size, h.length}};
  begin_ += header_size + h.length;
  return f;
}

}  // namespace kvlink::wire
