#include "read_pacer.hpp"

#include <chrono>
#include <fmt/format.h>

namespace kvlink::net {

ReadPacer::PauseCheck ReadPacer::check_pause(std::size_t queued, bool open, TimePoint now) const {
  if (!over_limit(queued)) return {PauseCheck::resume, {}};
  if (!open) return {PauseCheck::end, closed_locally()};
  if (now >= pause_deadline_) {
    return {PauseCheck::end,
            Error(errc::limit_exceeded,
                  fmt::format("the peer did not read its replies: {} bytes stayed queued (limit {}) for {} ms", queued,
                              outbound_limit_,
                              std::chrono::duration_cast<std::chrono::milliseconds>(stall_timeout_).count()))};
  }
  return {PauseCheck::wait, {}};
}

}  // namespace kvlink::net
