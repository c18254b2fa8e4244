#include "kvlink/server/request_limits.hpp"

#include <fmt/format.h>

namespace kvlink::server {

Error check_world_size(std::uint32_t ws) {
  if (ws == 0 || ws > max_world_size)
    return {errc::bad_request,
            fmt::format("world_size {} is out of range; it must be between 1 and {}", ws, max_world_size)};
  return {};
}

Error check_keys(std::size_t chunks, std::uint32_t ws) {
  if (std::uint64_t{chunks} * ws > max_keys_per_request)
    return {errc::bad_request, fmt::format("{} chunks x world_size {} is more than {} keys in one request; split the "
                                           "request",
                                           chunks, ws, max_keys_per_request)};
  return {};
}

}  // namespace kvlink::server
