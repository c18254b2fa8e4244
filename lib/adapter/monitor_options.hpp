// What both adapters do with the link part of their configuration
// (SchedulerConfig, WorkerConfig): the options of the health monitor that
// owns their connection.
#pragma once

#include <stdexcept>
#include <utility>

#include "kvlink/health/monitor.hpp"
#include "kvlink/net/auth_token.hpp"
#include "kvlink/net/endpoint.hpp"

namespace kvlink::adapter::detail {

// Throws std::invalid_argument, with what is wrong, for a bad endpoint or
// an unusable token file.
template <class Config>
health::MonitorOptions monitor_options(const Config& config, wire::Role role) {
  health::MonitorOptions o;
  o.health = config.health;
  auto endpoint = net::parse_endpoint(config.endpoint);
  if (!endpoint) throw std::invalid_argument(endpoint.error().message());
  o.endpoint = std::move(*endpoint);
  auto token = net::resolve_auth_token(config.auth_token, config.auth_token_file);
  if (!token) throw std::invalid_argument(token.error().message());
  o.hello.role = role;
  o.hello.auth_token = std::move(*token);
  o.hello.client_name = config.name;
  o.name = config.name;
  return o;
}

}  // namespace kvlink::adapter::detail
