// Fuzzes framing and every message decoder: arbitrary bytes are split into
// frames and each payload is decoded as the message its opcode names (and
// as every reply type). Nothing may crash, read out of bounds or hang; a
// decoded message must re-encode to the same bytes.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "kvlink/wire/messages.hpp"

using namespace kvlink::wire;

namespace {

template <class M>
void roundtrip(std::span<const std::byte> payload) {
  M m{};
  if (decode(payload, m, "fuzz")) return;
  const Bytes again = encode(m);
  if (again.size() != payload.size() || !std::equal(again.begin(), again.end(), payload.begin())) std::abort();
}

void decode_request(std::uint8_t op, std::span<const std::byte> p) {
  switch (static_cast<Opcode>(op)) {
    case Opcode::hello: return roundtrip<HelloRequest>(p);
    case Opcode::ping: return roundtrip<PingRequest>(p);
    case Opcode::register_kv_cache: return roundtrip<RegisterKvCacheRequest>(p);
    case Opcode::unregister_kv_cache: return roundtrip<UnregisterKvCacheRequest>(p);
    case Opcode::lookup: return roundtrip<LookupRequest>(p);
    case Opcode::query_prefetch_status: return roundtrip<QueryPrefetchStatusRequest>(p);
    case Opcode::sync_lookup: return roundtrip<SyncLookupRequest>(p);
    case Opcode::free_lookup_locks: return roundtrip<FreeLookupLocksRequest>(p);
    case Opcode::store: return roundtrip<StoreRequest>(p);
    case Opcode::retrieve: return roundtrip<RetrieveRequest>(p);
    case Opcode::end_session: return roundtrip<EndSessionRequest>(p);
    case Opcode::report_block_allocation: return roundtrip<ReportBlockAllocationRequest>(p);
    case Opcode::clear: return roundtrip<ClearRequest>(p);
    case Opcode::stats: return roundtrip<StatsRequest>(p);
    case Opcode::server_notice: return roundtrip<ServerNotice>(p);
  }
}

void decode_replies(std::span<const std::byte> p) {
  roundtrip<HelloReply>(p);
  roundtrip<ErrorReply>(p);
  roundtrip<LookupAccepted>(p);
  roundtrip<PrefetchStatus>(p);
  roundtrip<LookupResult>(p);
  roundtrip<StoreResult>(p);
  roundtrip<RetrieveResult>(p);
  roundtrip<ClearResult>(p);
  roundtrip<StatsReply>(p);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FrameParser parser(1u << 16);
  // Feed in two pieces to exercise partial frames.
  const std::size_t half = size / 2;
  parser.append({reinterpret_cast<const std::byte*>(data), half});
  for (int round = 0; round < 2; ++round) {
    while (auto f = parser.next()) {
      if (f->header.is_response())
        decode_replies(f->payload);
      else
        decode_request(f->header.opcode, f->payload);
    }
    if (round == 0) parser.append({reinterpret_cast<const std::byte*>(data) + half, size - half});
  }
  // Raw payload decoding without framing, too.
  if (size > 0) decode_request(static_cast<std::uint8_t>(1 + data[0] % max_opcode), {reinterpret_cast<const std::byte*>(data) + 1, size - 1});
  return 0;
}
