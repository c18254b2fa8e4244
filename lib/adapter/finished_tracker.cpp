#include "kvlink/adapter/finished_tracker.hpp"

#include <algorithm>

namespace kvlink::adapter {

GetFinishedTracker::Ticket GetFinishedTracker::store_started(const std::string& id, Sent sent) {
  const Ticket t = next_++;
  stores_.emplace(t, PendingStore{id, sent});
  auto& r = requests_[id];
  ++r.stores_in_flight;
  r.had_store = true;
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
  r.had_retrieve = true;
  return t;
}

void GetFinishedTracker::retrieve_done(Ticket t, bool ok) {
  auto it = retrieves_.find(t);
  if (it == retrieves_.end()) return;
  if (!ok) load_errors_.insert(it->second.blocks.begin(), it->second.blocks.end());
  const std::string id = std::move(it->second.id);
  retrieves_.erase(it);
  auto r = requests_.find(id);
  if (r == requests_.end()) return;
  if (--r->second.retrieves_in_flight == 0 && !retrieve_reported(id) &&
      std::find(retrieves_ready_.begin(), retrieves_ready_.end(), id) == retrieves_ready_.end())
    retrieves_ready_.push_back(id);
}

GetFinishedTracker::Finished GetFinishedTracker::get_finished(std::span<const std::string> engine_finished,
                                                              bool unhealthy, Present present) {
  for (const auto& id : engine_finished)
    if (auto r = requests_.find(id); r != requests_.end()) r->second.engine_finished = true;
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
  for (auto& id : retrieves_ready_)
    if (!retired_.contains(id) && reported_retrieves_.insert(id).second) out.retrieves.push_back(std::move(id));
  retrieves_ready_.clear();
  std::vector<std::string> done;
  for (auto& [id, r] : requests_) {
    if (r.had_store && r.stores_in_flight == 0 && r.retrieves_in_flight == 0 && r.engine_finished && !store_reported(id)) {
      reported_stores_.insert(id);
      const bool as_retrieve = std::find(out.retrieves.begin(), out.retrieves.end(), id) != out.retrieves.end();
      if (!(unhealthy && as_retrieve)) out.stores.push_back(id);
    }
    if (r.engine_finished && r.stores_in_flight == 0 && r.retrieves_in_flight == 0) done.push_back(id);
  }
  for (const auto& id : done) retire(id);  // over: later repeats of the id are ignored
  std::sort(out.stores.begin(), out.stores.end());
  return out;
}

std::vector<std::uint32_t> GetFinishedTracker::take_load_errors() {
  std::vector<std::uint32_t> out(load_errors_.begin(), load_errors_.end());
  load_errors_.clear();
  return out;
}

void GetFinishedTracker::retire(const std::string& id) {
  requests_.erase(id);
  reported_stores_.erase(id);
  reported_retrieves_.erase(id);
  if (remembered_ids_ == 0 || !retired_.insert(id).second) return;
  retired_order_.push_back(id);
  if (retired_order_.size() > remembered_ids_) {
    retired_.erase(retired_order_.front());
    retired_order_.pop_front();
  }
}

void GetFinishedTracker::forget(const std::string& id) {
  std::erase_if(stores_, [&](const auto& e) { return e.second.id == id; });
  std::erase_if(retrieves_, [&](const auto& e) { return e.second.id == id; });
  requests_.erase(id);
  reported_stores_.erase(id);
  reported_retrieves_.erase(id);
  std::erase(retrieves_ready_, id);
  if (retired_.erase(id)) std::erase(retired_order_, id);
}

}  // namespace kvlink::adapter
