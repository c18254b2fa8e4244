#include "kvlink/wire/frame.hpp"

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
  // Move the unconsumed tail to the front once it is all that is left, so
  // the buffer does not grow with the total bytes ever received.
  if (begin_ == end_) {
    begin_ = end_ = 0;
  } else if (begin_ > 0 && buf_.size() - end_ < at_least) {
    std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  if (buf_.size() - end_ < at_least) buf_.resize(end_ + at_least);
  // Use all spare capacity: one read takes as many frames as the kernel has.
  if (buf_.size() < buf_.capacity()) buf_.resize(buf_.capacity());
  return {buf_.data() + end_, buf_.size() - end_};
}

void FrameParser::append(std::span<const std::byte> data) {
  if (data.empty()) return;  // memcpy from an empty span's null pointer is UB
  auto space = prepare(data.size());
  std::memcpy(space.data(), data.data(), data.size());
  commit(data.size());
}

std::optional<Frame> FrameParser::next() {
  if (failed() || end_ - begin_ < header_size) return std::nullopt;
  const std::byte* p = buf_.data() + begin_;
  Header h;
  std::uint32_t magic = 0;
  std::uint32_t reserved = 0;
  std::memcpy(&magic, p, 4);
  h.version = static_cast<std::uint8_t>(p[4]);
  h.opcode = static_cast<std::uint8_t>(p[5]);
  std::memcpy(&h.flags, p + 6, 2);
  std::memcpy(&h.id, p + 8, 8);
  std::memcpy(&h.length, p + 16, 4);
  std::memcpy(&reserved, p + 20, 4);
  if (magic != frame_magic) {
    error_ = "bad frame magic (not a kvlink peer, or the stream is out of sync)";
    return std::nullopt;
  }
  if (h.version != protocol_version) {
    version_mismatch_ = true;
    peer_version_ = h.version;
    error_ = "protocol version mismatch: peer speaks version " + std::to_string(h.version) + ", this side speaks " +
             std::to_string(protocol_version) + "; upgrade the older side";
    return std::nullopt;
  }
  if (reserved != 0 || (h.flags & ~flag::known) != 0) {
    error_ = "frame header has unknown flags or reserved bits set";
    return std::nullopt;
  }
  if (h.length > max_payload_) {
    too_large_ = true;
    error_ = "frame payload of " + std::to_string(h.length) + " bytes exceeds the maximum of " +
             std::to_string(max_payload_);
    return std::nullopt;
  }
  if (end_ - begin_ < header_size + h.length) return std::nullopt;
  Frame f{h, {p + header_size, h.length}};
  begin_ += header_size + h.length;
  return f;
}

}  // namespace kvlink::wire
