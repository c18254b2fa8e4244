#include "kvlink/server/inbound_budget.hpp"

#include <fmt/format.h>

namespace kvlink::server {

Error InboundBudget::hold(Claim& claim, std::uint32_t payload) {
  const std::uint64_t others = held_ - claim.bytes;
  if (payload > claim.bytes && payload > small_payload && others + payload > limit_)
    return Error(errc::limit_exceeded,
                 fmt::format("a frame of {} bytes was refused: the frames still arriving on the server's connections "
                             "hold {} bytes, and this one would take them past its limit of {} (--max-inbound-bytes); "
                             "send it again later, or raise --max-inbound-bytes",
                             payload, others, limit_));
  held_ = others + payload;
  claim.bytes = payload;
  return {};
}

void InboundBudget::release(Claim& claim) {
  held_ -= claim.bytes;
  claim.bytes = 0;
}

std::uint64_t inbound_limit(const ServerConfig& config) {
  return config.max_inbound_bytes != 0 ? config.max_inbound_bytes : 4 * std::uint64_t{config.max_payload};
}

Error check_inbound(const ServerConfig& config) {
  if (config.max_inbound_bytes != 0 && config.max_inbound_bytes < config.max_payload)
    return Error(
        errc::bad_request,
        fmt::format("--max-inbound-bytes {} is below --max-payload {}: a frame of the largest size would always "
                    "be refused; raise --max-inbound-bytes (default: 4 x --max-payload)",
                    config.max_inbound_bytes, config.max_payload));
  return {};
}

}  // namespace kvlink::server
