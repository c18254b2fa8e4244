#include "kvlink/adapter/finished_tracker.hpp"

#include <algorithm>

namespace kvlink::adapter {

GetFinishedTracker::Ticket GetFinishedTracker::store_started(const std::string& id, Sent sent) {
  const Ticket t = next_++;
  stores_.emplace(t, PendingStore{id, sent});
  auto& r = requests_[id];
  ++r.stores_in_flight;
  r.store_round = true;
  // An engine report seen before this store was about an earlier life of
  // the id (or a repeat of it): this store needs a report of its own.
  r.engine_finished = false;
  return t;
}

void GetFinishedTracker::store_done(Ticket t) {
  auto it = stores_.find(t);
  if (it == stores_.end()) return;  // drained earlier, or forgotten
  if (auto r = requests_.find(it->second.id); r != requests_.end()) --r->second.stores_in_flight;
  stores_.erase(it);
}

void GetFinishedTracker::store_unanswered(Ticket t) {
  if (auto it = stores_.find(t); it != stores_.end()) it->second.unanswered = true;
}

void GetFinishedTracker::retrieve_unanswered(Ticket t) {
  if (auto it = retrieves_.find(t); it != retrieves_.end()) it->second.unanswered = true;
}

GetFinishedTracker::Ticket GetFinishedTracker::retrieve_started(const std::string& id,
                                                                std::span<const std::uint32_t> blocks, Sent sent) {
  const Ticket t = next_++;
  retrieves_.emplace(t, PendingRetrieve{id, std::vector<std::uint32_t>(blocks.begin(), blocks.end()), sent});
  auto& r = requests_[id];
  ++r.retrieves_in_flight;
  r.retrieve_round = true;
  return t;
}

void GetFinishedTracker::retrieve_done(Ticket t, bool ok) {
  auto it = retrieves_.find(t);
  if (it == retrieves_.end()) return;  // drained earlier, or forgotten
  if (!ok) load_errors_.insert(it->second.blocks.begin(), it->second.blocks.end());
  if (auto r = requests_.find(it->second.id); r != requests_.end()) --r->second.retrieves_in_flight;
  retrieves_.erase(it);
}

GetFinishedTracker::Finished GetFinishedTracker::get_finished(std::span<const std::string> engine_finished,
                                                              bool unhealthy, Present present) {
  // A report finishes the open store round only: with none open (a repeat,
  // or an id with no stores) there is nothing for it to finish.
  for (const auto& id : engine_finished)
    if (auto r = requests_.find(id); r != requests_.end() && r->second.store_round) r->second.engine_finished = true;
  // Unanswered transfers, and in a drain every pending one, end here once
  // the server can no longer touch their blocks.
  std::vector<Ticket> tickets;
  for (const auto& [t, s] : stores_)
    if ((unhealthy || s.unanswered) && safe(s.sent, present)) tickets.push_back(t);
  for (Ticket t : tickets) store_done(t);
  tickets.clear();
  for (const auto& [t, r] : retrieves_)
    if ((unhealthy || r.unanswered) && safe(r.sent, present)) tickets.push_back(t);
  for (Ticket t : tickets) retrieve_done(t, false);

  Finished out;
  for (auto it = requests_.begin(); it != requests_.end();) {
    auto& [id, r] = *it;
    bool as_retrieve = false;
    if (r.retrieve_round && r.retrieves_in_flight == 0) {
      r.retrieve_round = false;
      as_retrieve = true;
      out.retrieves.push_back(id);
    }
    if (r.store_round && r.engine_finished && r.stores_in_flight == 0 && r.retrieves_in_flight == 0) {
      r.store_round = false;
      r.engine_finished = false;
      if (!(unhealthy && as_retrieve)) out.stores.push_back(id);
    }
    // Every round reported: the next transfer of the id starts afresh.
    it = r.idle() ? requests_.erase(it) : std::next(it);
  }
  std::sort(out.stores.begin(), out.stores.end());
  std::sort(out.retrieves.begin(), out.retrieves.end());
  return out;
}

std::vector<std::uint32_t> GetFinishedTracker::take_load_errors() {
  std::vector<std::uint32_t> out(load_errors_.begin(), load_errors_.end());
  load_errors_.clear();
  return out;
}

void GetFinishedTracker::forget(const std::string& id) {
  std::erase_if(stores_, [&](const auto& e) { return e.second.id == id; });
  std::erase_if(retrieves_, [&](const auto& e) { return e.second.id == id; });
  requests_.erase(id);
}

}  // namespace kvlink::adapter
