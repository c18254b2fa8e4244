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
#include "kvlink/wire/messages.hpp"

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
  // The one frame collected: a reply of type R, decoded.
  template <class R>
  R only_reply() {
    auto f = frames();
    REQUIRE(f.size() == 1);
    REQUIRE_FALSE(f[0].first.is_error());
    R r;
    REQUIRE_FALSE(wire::decode(f[0].second, r, "reply"));
    return r;
  }
  // The one frame collected: an error reply, decoded.
  wire::ErrorReply only_error() {
    auto f = frames();
    REQUIRE(f.size() == 1);
    REQUIRE(f[0].first.is_error());
    wire::ErrorReply e;
    REQUIRE_FALSE(wire::decode(f[0].second, e, "error"));
    return e;
  }
};

}  // namespace kvlink::test
