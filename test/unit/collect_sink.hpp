// A ReplySink for handler tests without sockets: collects reply bytes and
// parses them back into frames. Owned by a shared_ptr, so deferred
// completions can find it (or find it gone) through weak_self().
#pragma once

#include <doctest/doctest.h>

#include <memory>
#include <utility>
#include <vector>

#include "kvlink/server/request_handler.hpp"
#include "kvlink/wire/frame.hpp"

namespace kvlink::test {

struct CollectSink final : server::ReplySink, std::enable_shared_from_this<CollectSink> {
  wire::Bytes out;
  wire::Bytes& buffer() override { return out; }
  void flush() override {}
  std::weak_ptr<ReplySink> weak_self() override { return shared_from_this(); }
  // Parses everything collected so far into frames (copying payloads).
  std::vector<std::pair<wire::Header, wire::Bytes>> frames() {
    wire::FrameParser p;
    p.append(out);
    out.clear();
    std::vector<std::pair<wire::Header, wire::Bytes>> v;
    while (auto f = p.next()) v.emplace_back(f->header, wire::Bytes(f->payload.begin(), f->payload.end()));
    REQUIRE_FALSE(p.failed());
    return v;
  }
};

}  // namespace kvlink::test
