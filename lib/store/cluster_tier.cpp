#include "store/cluster_tier.hpp"

#include <fmt/format.h>

#include <cstring>

namespace kvlink::store {

ClusterTier::ClusterTier(asio::any_io_executor ex, ClusterTierConfig config)
    : config_(std::move(config)), client_(ClusterClient::create(ex, config_.cluster)) {}

ClusterTier::~ClusterTier() {
  *alive_ = false;
  client_->close();
}

void ClusterTier::start(std::function<void(const Error&)> done) {
  // The answer may come after the tier is gone (its connections closing):
  // then nobody hears it.
  client_->refresh([alive = std::weak_ptr<bool>(alive_), done = std::move(done)](const Error& err) {
    if (auto a = alive.lock(); a && *a && done) done(err);
  });
}

void ClusterTier::tick(TimePoint now) {
  // No map yet: ask every second. A master down, or slots without one
  // (the cluster failed a master and has not promoted its replica yet):
  // the cluster will promote a replica (after its cluster-node-timeout),
  // so read the map often until it names a master that answers for every
  // slot; writes then go to the new master from the first one, not only
  // after a command has failed.
  const bool failing_over =
      client_->masters_degraded() > 0 || client_->slots().covered() < cluster_slots;
  if ((accepting() && !failing_over) || now < next_refresh_) return;
  next_refresh_ = now + (accepting() ? std::chrono::milliseconds(250) : std::chrono::milliseconds(1000));
  client_->refresh();
}

LowerTierStats ClusterTier::stats() const {
  LowerTierStats s = stats_;
  s.healthy = accepting();
  s.transitions = client_->node_transitions();
  s.nodes = client_->slots().masters().size();
  s.nodes_degraded = client_->masters_degraded();
  return s;
}

std::vector<TierNode> ClusterTier::nodes() const {
  std::vector<TierNode> out;
  const SlotMap& map = client_->slots();
  for (const auto& m : map.masters())
    out.push_back({to_string(m), client_->node_state(m) != health::State::degraded, map.slots_of(m)});
  return out;
}

bool ClusterTier::put(const ChunkKey& key, std::span<const std::byte> bytes, TimePoint) {
  if (!accepting()) {
    ++stats_.writes_skipped;
    return false;
  }
  const std::uint64_t size = cluster_header_bytes + bytes.size();
  if (stats_.write_bytes_in_flight > 0 && stats_.write_bytes_in_flight + size > config_.max_write_bytes_in_flight) {
    ++stats_.writes_skipped;
    return false;
  }
  // The value put together once, in the argument that is sent (hiredis
  // formats it into the command: one more copy, then the socket's).
  std::string value(size, '\0');
  const auto header = cluster_value_header(key, bytes);
  std::memcpy(value.data(), header.data(), header.size());
  if (!bytes.empty()) std::memcpy(value.data() + header.size(), bytes.data(), bytes.size());
  const std::string name = cluster_key(key);
  std::vector<std::string> args{"SET", name, std::move(value)};
  if (config_.ttl.count() > 0) {
    args.emplace_back("EX");
    args.push_back(std::to_string(config_.ttl.count()));
  }
  stats_.write_bytes_in_flight += size;
  // A write to a master that is down waits for the map to be read again
  // (the cluster may have promoted its replica just now); nobody waits on
  // a write. Lookups' commands miss at once instead.
  client_->send(name, std::move(args), config_.command_deadline,
                [this, alive = std::weak_ptr<bool>(alive_), size, bytes = bytes.size()](const Error& e, RedisValue v) {
                  if (auto a = alive.lock(); !a || !*a) return;
                  stats_.write_bytes_in_flight -= size;
                  if (e || v.is_error()) {
                    ++stats_.writes_failed;
                    return;
                  }
                  ++stats_.writes;
                  stats_.write_bytes += bytes;
                },
                ClusterClient::MasterDown::wait_for_map);
  return true;
}

void ClusterTier::find(std::span<const ChunkKey> keys, Found done) {
  struct State {
    std::vector<std::optional<std::uint64_t>> sizes;
    std::size_t left = 0;
    Found done;
  };
  auto st = std::make_shared<State>();
  st->sizes.resize(keys.size());
  st->left = keys.size();
  st->done = std::move(done);
  // Answers that come after the tier is gone (its connections closing)
  // reach nobody.
  std::weak_ptr<bool> alive = alive_;
  if (keys.empty()) {
    // Never inside the call, like every other answer.
    client_->send("", {"PING"}, config_.command_deadline, [st, alive](const Error&, RedisValue) {
      if (auto a = alive.lock(); a && *a) st->done({});
    });
    return;
  }
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const std::string name = cluster_key(keys[i]);
    client_->send(name, {"STRLEN", name}, config_.command_deadline, [st, i, alive](const Error& e, RedisValue v) {
      if (!e && v.type() == RedisValue::Type::integer && v.integer() > static_cast<long long>(cluster_header_bytes))
        st->sizes[i] = static_cast<std::uint64_t>(v.integer()) - cluster_header_bytes;
      if (--st->left > 0) return;
      if (auto a = alive.lock(); a && *a) st->done(std::move(st->sizes));
    });
  }
}

Error ClusterTier::get(const ChunkKey& key, std::uint64_t slot_bytes, TimePoint, ReadDone done) {
  const std::uint64_t size = cluster_header_bytes + slot_bytes;
  if (stats_.read_bytes_in_flight > 0 && stats_.read_bytes_in_flight + size > config_.max_read_bytes_in_flight)
    return Error(errc::limit_exceeded, "the cluster tier's reads in flight are at their bound");
  stats_.read_bytes_in_flight += size;
  const std::string name = cluster_key(key);
  client_->send(name, {"GET", name}, config_.command_deadline,
                [this, alive = std::weak_ptr<bool>(alive_), key, slot_bytes, size, done = std::move(done)](
                    const Error& e, RedisValue v) {
                  if (auto a = alive.lock(); !a || !*a) return;
                  stats_.read_bytes_in_flight -= size;
                  if (e) {
                    ++stats_.reads_failed;
                    return done(e, {});
                  }
                  if (v.type() == RedisValue::Type::nil) {
                    ++stats_.reads_failed;
                    return done(Error(errc::not_found, "the chunk is not in the cluster (evicted or expired)"), {});
                  }
                  if (v.type() != RedisValue::Type::string) {
                    ++stats_.reads_failed;
                    return done(Error(errc::server_error, fmt::format("GET answered {}", v.str())), {});
                  }
                  auto bytes = decode_cluster_value(key, slot_bytes, v.bytes());
                  if (!bytes) {
                    ++stats_.corrupt_dropped;
                    return done(bytes.error(), {});
                  }
                  ++stats_.reads;
                  stats_.read_bytes += bytes->size();
                  done({}, *bytes);
                });
  return {};
}

}  // namespace kvlink::store
