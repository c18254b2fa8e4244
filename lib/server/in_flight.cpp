#include "kvlink/server/in_flight.hpp"

namespace kvlink::server {

InFlight::Ticket InFlight::start(const ConnectionCount& connection, std::uint64_t instance) {
  ++*connection;
  ++total_;
  ++per_instance_[instance];
  return {connection, instance};
}

void InFlight::end(InFlight* tracker, const Ticket& ticket) {
  --*ticket.connection;
  if (!tracker) return;
  --tracker->total_;
  // A forgotten instance (reaped while its copy ran) counts nothing more.
  auto it = tracker->per_instance_.find(ticket.instance);
  if (it != tracker->per_instance_.end() && --it->second == 0) tracker->per_instance_.erase(it);
}

}  // namespace kvlink::server
