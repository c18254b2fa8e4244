// Fuzzes the Redis Cluster tier's value decoding, redirects and node
// addresses: arbitrary bytes never crash, a value accepted is exactly the
// chunk its header describes, and re-encoding it gives the same bytes.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "kvlink/store/cluster_keys.hpp"

using namespace kvlink::store;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto* bytes = reinterpret_cast<const std::byte*>(data);
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  (void)parse_redirect(text);
  (void)parse_cluster_node(text);
  (void)cluster_slot(text);
  const ChunkKey key{7, {1, 2}, 0};
  const std::span<const std::byte> value(bytes, size);
  const std::uint64_t slot_bytes = size >= cluster_header_bytes ? size - cluster_header_bytes : 0;
  auto got = decode_cluster_value(key, slot_bytes, value);
  if (got) {
    const auto again = encode_cluster_value(key, *got);
    if (again.size() != size || !std::equal(again.begin(), again.end(), bytes)) __builtin_trap();
  }
  // A well-formed value of these bytes must decode to them.
  const auto encoded = encode_cluster_value(key, value);
  auto back = decode_cluster_value(key, size, encoded);
  if (!back || back->size() != size || !std::equal(back->begin(), back->end(), bytes)) __builtin_trap();
  return 0;
}
