// A request as the handler's parts receive it: the frame of one message,
// its payload owned alongside. For testing the parts without the handler.
#pragma once

#include <cstdint>

#include "kvlink/wire/messages.hpp"

namespace kvlink::test {

struct RequestFrame {
  wire::Bytes payload;
  wire::Frame frame;

  template <class M>
  explicit RequestFrame(const M& m, std::uint64_t id = 1, std::uint16_t flags = 0) {
    wire::Writer w(payload);
    wire::encode(w, m);
    frame.header.opcode = static_cast<std::uint8_t>(M::opcode);
    frame.header.flags = flags;
    frame.header.id = id;
    frame.header.length = static_cast<std::uint32_t>(payload.size());
    frame.payload = payload;
  }
  RequestFrame(const RequestFrame&) = delete;  // `frame` points into `payload`
  operator const wire::Frame&() const { return frame; }
};

}  // namespace kvlink::test
