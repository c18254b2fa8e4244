// The adapters' configs, the health settings and the enums of their
// states, as Python classes.
#include "adapters.hpp"
#include "record.hpp"

namespace kvlink::python {

void bind_configs(py::module_& m) {
  py::enum_<health::State>(m, "State", "The health of a link to the server (docs/health.md).")
      .value("warming", health::State::warming)
      .value("healthy", health::State::healthy)
      .value("degraded", health::State::degraded)
      .value("stopped", health::State::stopped);
  py::enum_<adapter::LookupMode>(m, "LookupMode")
      .value("two_phase", adapter::LookupMode::two_phase, "LOOKUP, then QUERY_PREFETCH_STATUS from check_lookup")
      .value("sync", adapter::LookupMode::sync, "SYNC_LOOKUP: one round trip");
  py::enum_<adapter::GateTrigger>(m, "GateTrigger", "What opens the warmup gate automatically (ready() always does).")
      .value("register_ack", adapter::GateTrigger::register_ack)
      .value("first_transfer", adapter::GateTrigger::first_transfer)
      .value("explicit_ready", adapter::GateTrigger::explicit_ready);

  using health::Config;
  Record<Config>(m, "HealthConfig", "Heartbeat and reconnect timing (docs/health.md); durations in seconds.")
      .seconds("interval", &Config::interval, "time between pings")
      .seconds("ping_timeout", &Config::ping_timeout, "how long one verdict may wait for answers")
      .field("failure_threshold", &Config::failure_threshold)
      .field("success_threshold", &Config::success_threshold)
      .field("cold_start_failure_threshold", &Config::cold_start_failure_threshold)
      .field("jitter", &Config::jitter)
      .seconds("reconnect_initial", &Config::reconnect_initial)
      .field("reconnect_multiplier", &Config::reconnect_multiplier)
      .seconds("reconnect_max", &Config::reconnect_max)
      .field("reconnect_jitter", &Config::reconnect_jitter)
      .seconds("connect_timeout", &Config::connect_timeout)
      .seconds("planned_restart_grace", &Config::planned_restart_grace)
      .seconds("max_warmup", &Config::max_warmup, "the gate opens by itself after this long")
      .done();

  using adapter::SchedulerConfig;
  Record<SchedulerConfig>(m, "SchedulerConfig", "The scheduler adapter's settings (docs/adapters.md).")
      .field("endpoint", &SchedulerConfig::endpoint, "unix:/path or tcp:host:port")
      .field("model", &SchedulerConfig::model)
      .field("world_size", &SchedulerConfig::world_size)
      .field("cache_salt", &SchedulerConfig::cache_salt)
      .field("chunk_size", &SchedulerConfig::chunk_size, "tokens per chunk; 0 takes the server's")
      .field("lookup_mode", &SchedulerConfig::lookup_mode)
      .seconds("call_timeout", &SchedulerConfig::call_timeout)
      .seconds("blocking_deadline", &SchedulerConfig::blocking_deadline)
      .field("open_gate_on_first_lookup", &SchedulerConfig::open_gate_on_first_lookup)
      .field("health", &SchedulerConfig::health)
      .field("auth_token", &SchedulerConfig::auth_token)
      .field("auth_token_file", &SchedulerConfig::auth_token_file)
      .field("name", &SchedulerConfig::name)
      .done();

  using adapter::WorkerConfig;
  Record<WorkerConfig>(m, "WorkerConfig", "The worker adapter's settings (docs/adapters.md).")
      .field("endpoint", &WorkerConfig::endpoint, "unix:/path or tcp:host:port")
      .field("model", &WorkerConfig::model)
      .field("world_size", &WorkerConfig::world_size)
      .field("kv_rank", &WorkerConfig::kv_rank)
      .field("cache_salt", &WorkerConfig::cache_salt)
      .field("chunk_size", &WorkerConfig::chunk_size, "tokens per chunk; 0 takes the server's")
      .field("gate_trigger", &WorkerConfig::gate_trigger)
      .seconds("call_timeout", &WorkerConfig::call_timeout)
      .seconds("transfer_timeout", &WorkerConfig::transfer_timeout, "deadline (and copy fence) of each transfer")
      .seconds("blocking_deadline", &WorkerConfig::blocking_deadline)
      .field("health", &WorkerConfig::health)
      .field("auth_token", &WorkerConfig::auth_token)
      .field("auth_token_file", &WorkerConfig::auth_token_file)
      .field("name", &WorkerConfig::name)
      .done();
}

}  // namespace kvlink::python
