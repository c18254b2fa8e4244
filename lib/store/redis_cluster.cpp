#include "store/redis_cluster.hpp"

#include <asio/post.hpp>
#include <fmt/format.h>

namespace kvlink::store {

Result<std::vector<SlotMap::Range>> parse_cluster_slots(RedisValue reply) {
  auto bad = [](std::string_view why) {
    return Error(errc::protocol_error, fmt::format("CLUSTER SLOTS answered something else: {}", why));
  };
  if (reply.is_error())
    return Error(errc::bad_request, fmt::format("CLUSTER SLOTS refused: {}; is cluster mode on (cluster-enabled "
                                                "yes)?",
                                                reply.str()));
  if (reply.type() != RedisValue::Type::array) return bad("not an array");
  std::vector<SlotMap::Range> ranges;
  for (std::size_t i = 0; i < reply.size(); ++i) {
    const RedisValue r = reply[i];
    if (r.type() != RedisValue::Type::array || r.size() < 3) return bad("a range without a master");
    const long long first = r[0].integer(), last = r[1].integer();
    if (r[0].type() != RedisValue::Type::integer || r[1].type() != RedisValue::Type::integer || first < 0 ||
        last < first || last >= cluster_slots)
      return bad("a range's slots are not numbers within 0..16383");
    SlotMap::Range range;
    range.first = static_cast<std::uint16_t>(first);
    range.last = static_cast<std::uint16_t>(last);
    for (std::size_t n = 2; n < r.size(); ++n) {
      const RedisValue node = r[n];
      if (node.type() != RedisValue::Type::array || node.size() < 2 || node[1].type() != RedisValue::Type::integer ||
          node[1].integer() <= 0 || node[1].integer() > 65535)
        return bad("a node is not [host, port, ...]");
      ClusterNode addr{std::string(node[0].str()), static_cast<std::uint16_t>(node[1].integer())};
      (n == 2 ? range.master : range.replicas.emplace_back()) = std::move(addr);
    }
    ranges.push_back(std::move(range));
  }
  return ranges;
}

std::shared_ptr<ClusterClient> ClusterClient::create(asio::any_io_executor ex, ClusterConfig config) {
  return std::shared_ptr<ClusterClient>(new ClusterClient(ex, std::move(config)));
}

ClusterClient::ClusterClient(asio::any_io_executor ex, ClusterConfig config) : ex_(ex), config_(std::move(config)) {}

void ClusterClient::close() {
  for (auto& [name, link] : nodes_)
    if (link.conn) link.conn->close();
  nodes_.clear();
  for (auto& [name, m] : monitors_) m->stop();
  monitors_.clear();
}

health::State ClusterClient::node_state(const ClusterNode& node) const {
  auto it = monitors_.find(to_string(node));
  return it == monitors_.end() ? health::State::healthy : it->second->state();
}

std::size_t ClusterClient::masters_degraded() const {
  std::size_t n = 0;
  for (const auto& [name, m] : monitors_)
    if (m->state() == health::State::degraded) ++n;
  return n;
}

void ClusterClient::watch_masters() {
  if (!config_.watch_nodes) return;
  std::map<std::string, std::shared_ptr<NodeMonitor>> next;
  for (const auto& m : slots_.masters()) {
    const std::string name = to_string(m);
    if (auto it = monitors_.find(name); it != monitors_.end()) {
      next.emplace(name, std::move(it->second));
      monitors_.erase(it);
      continue;
    }
    auto monitor = NodeMonitor::create(ex_, m, config_.password, config_.health, next_seed_++,
                                       [weak = weak_from_this()](const ClusterNode&, const health::Transition&) {
                                         if (auto self = weak.lock()) {
                                           ++self->node_transitions_;
                                           self->refresh();
                                         }
                                       });
    monitor->start();
    next.emplace(name, std::move(monitor));
  }
  for (auto& [name, m] : monitors_) m->stop();  // no longer masters
  monitors_ = std::move(next);
}

void ClusterClient::with_node(const ClusterNode& node,
                              std::function<void(const Error&, const std::shared_ptr<RedisConnection>&)> then) {
  NodeLink& link = nodes_[to_string(node)];
  if (link.conn && link.conn->is_open()) return then({}, link.conn);
  link.conn.reset();
  link.waiting.push_back(std::move(then));
  if (link.connecting) return;
  link.connecting = true;
  RedisConnection::connect(
      ex_, node, config_.password, config_.connect_timeout,
      [weak = weak_from_this(), name = to_string(node)](Result<std::shared_ptr<RedisConnection>> r) {
        auto self = weak.lock();
        if (!self) return;
        auto it = self->nodes_.find(name);
        if (it == self->nodes_.end()) return;  // closed meanwhile
        NodeLink& l = it->second;
        l.connecting = false;
        auto waiting = std::move(l.waiting);
        l.waiting.clear();
        if (r) l.conn = *r;
        const Error err = r ? Error() : r.error();
        for (auto& w : waiting) w(err, l.conn);
      });
}

void ClusterClient::refresh_soon() {
  // Failures come per command: one CLUSTER SLOTS per interval at most.
  const TimePoint now = Clock::now();
  if (now - last_failure_refresh_ < min_refresh_interval) return;
  last_failure_refresh_ = now;
  refresh();
}

void ClusterClient::refresh(std::function<void(const Error&)> done) {
  if (done) refresh_waiters_.push_back(std::move(done));
  if (refreshing_) return;
  refreshing_ = true;
  read_slots(0, [self = shared_from_this()](const Error& err) {
    self->refreshing_ = false;
    auto waiters = std::move(self->refresh_waiters_);
    self->refresh_waiters_.clear();
    for (auto& w : waiters) w(err);
  });
}

void ClusterClient::read_slots(std::size_t seed, std::function<void(const Error&)> done) {
  // The masters already known first (the seeds may be stale), then the seeds.
  std::vector<ClusterNode> candidates = slots_.masters();
  candidates.insert(candidates.end(), config_.seeds.begin(), config_.seeds.end());
  if (seed >= candidates.size())
    return done(Error(errc::not_connected,
                      fmt::format("no node of the cluster answered CLUSTER SLOTS ({} tried); check "
                                  "--l2-redis-cluster's addresses and that the cluster is up",
                                  candidates.size())));
  const ClusterNode node = candidates[seed];
  with_node(node, [self = shared_from_this(), seed, node, done = std::move(done)](
                      const Error& err, const std::shared_ptr<RedisConnection>& conn) mutable {
    if (err) return self->read_slots(seed + 1, std::move(done));
    conn->send({"CLUSTER", "SLOTS"}, self->config_.slots_timeout,
               [self, seed, node, done = std::move(done)](const Error& e, RedisValue v) mutable {
                 auto ranges = e ? Result<std::vector<SlotMap::Range>>(e) : parse_cluster_slots(v);
                 if (!ranges || ranges->empty()) return self->read_slots(seed + 1, std::move(done));
                 // A node that does not know its own address says "": the one asked.
                 for (auto& r : *ranges) {
                   if (r.master.host.empty()) r.master.host = node.host;
                   for (auto& rep : r.replicas)
                     if (rep.host.empty()) rep.host = node.host;
                 }
                 self->slots_.assign(*ranges);
                 self->watch_masters();
                 done({});
               });
  });
}

void ClusterClient::send(const std::string& key, std::vector<std::string> args, Duration deadline, Done done,
                         MasterDown on_master_down) {
  auto cmd = std::make_shared<Command>(
      Command{key, std::move(args), Clock::now() + deadline, std::move(done), 0, on_master_down});
  asio::post(ex_, [self = shared_from_this(), cmd] { self->dispatch(cmd); });
}

void ClusterClient::dispatch(std::shared_ptr<Command> cmd, const ClusterNode* ask) {
  const TimePoint now = Clock::now();
  if (now >= cmd->deadline)
    return cmd->done(Error(errc::timed_out, "the cluster did not answer in time"), RedisValue());
  const std::uint16_t slot = cluster_slot(cmd->key);
  const ClusterNode* master = ask ? ask : slots_.master(slot);
  if (!master) {
    // No node known for the slot: read the map once, then try again.
    if (cmd->redirects++ >= config_.max_redirects)
      return cmd->done(Error(errc::not_connected, fmt::format("no cluster node serves slot {}", slot)), RedisValue());
    return refresh([self = shared_from_this(), cmd](const Error& err) {
      if (err) return cmd->done(err, RedisValue());
      self->dispatch(cmd);
    });
  }
  if (node_state(*master) == health::State::degraded) {
    if (cmd->on_master_down == MasterDown::wait_for_map && cmd->redirects++ < config_.max_redirects) {
      return refresh([self = shared_from_this(), cmd, down = *master, slot](const Error&) {
        const ClusterNode* now = self->slots_.master(slot);
        if (now && !(*now == down)) return self->dispatch(cmd);
        cmd->done(Error(errc::not_connected, fmt::format("redis node {} is down (its heartbeat failed) and no "
                                                         "replica has taken its slots yet",
                                                         to_string(down))),
                  RedisValue());
      });
    }
    // Down, or failed over: the map may have news.
    refresh_soon();
    return cmd->done(Error(errc::not_connected, fmt::format("redis node {} is down (its heartbeat failed): a miss",
                                                            to_string(*master))),
                     RedisValue());
  }
  const bool asking = ask != nullptr;
  with_node(*master, [self = shared_from_this(), cmd, asking](const Error& err,
                                                              const std::shared_ptr<RedisConnection>& conn) {
    if (err) {
      // A master gone (a crash the cluster is failing over): this command
      // misses; reading the map again finds the replica promoted.
      self->refresh_soon();
      return cmd->done(err, RedisValue());
    }
    const Duration left = cmd->deadline - Clock::now();
    if (asking) conn->send({"ASKING"}, left, [](const Error&, RedisValue) {});
    std::vector<std::string_view> argv(cmd->args.begin(), cmd->args.end());
    conn->send(argv, left, [self, cmd](const Error& e, RedisValue v) {
      if (e == errc::not_connected) self->refresh_soon();
      if (e || !v.is_error()) return cmd->done(e, v);
      auto redirect = parse_redirect(v.str());
      if (!redirect) return cmd->done(e, v);
      if (++cmd->redirects > self->config_.max_redirects)
        return cmd->done(Error(errc::protocol_error, fmt::format("more than {} redirects for one command; the "
                                                                 "cluster's slots keep moving",
                                                                 self->config_.max_redirects)),
                         RedisValue());
      if (redirect->kind == ClusterRedirect::Kind::ask) return self->dispatch(cmd, &redirect->node);
      // MOVED: the slot has a new master (a failover, a reshard). Correct
      // the map now, read it whole soon after.
      self->slots_.moved(redirect->slot, redirect->node);
      self->refresh_soon();
      self->dispatch(cmd);
    });
  });
}

}  // namespace kvlink::store
