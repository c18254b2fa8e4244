// kvlink-server: the KV-cache server. Prints one line containing "ready" and
// its endpoints once it accepts connections (and tells systemd, under
// Type=notify). SIGINT/SIGTERM drain (a planned restart: see Server::drain)
// and exit 0; a second signal exits at once. SIGHUP reopens --log-file.
// docs/operations.md is the operator's guide.
#include <unistd.h>

#include <asio/io_context.hpp>
#include <asio/signal_set.hpp>
#include <CLI/CLI.hpp>
#include <systemd/sd-daemon.h>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fmt/format.h>
#include <functional>

#include "kvlink/log.hpp"
#include "kvlink/net/auth_token.hpp"
#include "kvlink/net/endpoint.hpp"
#include "kvlink/server/inbound_budget.hpp"
#include "kvlink/server/server.hpp"
#include "kvlink/store/cluster_keys.hpp"
#include "kvlink/store/l1_pool.hpp"
#include "kvlink/transfer/routing_engine.hpp"
#include "kvlink/version.hpp"

namespace {

// Tells systemd (Type=notify) how the server is doing: "READY=1",
// "STOPPING=1", "STATUS=...", newline-separated, through libsystemd's
// sd_notify (Debian libsystemd-dev). Without $NOTIFY_SOCKET (not started
// by systemd as Type=notify) it does nothing.
void notify_systemd(const std::string& state) {
  if (const int rc = sd_notify(0, state.c_str()); rc < 0)
    kvlink::log::warn("kvlink-server: cannot notify systemd at NOTIFY_SOCKET={}: {}",
                      std::getenv("NOTIFY_SOCKET") ? std::getenv("NOTIFY_SOCKET") : "", std::strerror(-rc));
}

// A size flag's bytes: parse_size's, refused below `min` with `too_small`.
kvlink::Result<std::uint64_t> size_flag(const std::string& text, std::uint64_t min = 0, const char* too_small = "") {
  auto bytes = kvlink::store::parse_size(text);
  if (bytes && *bytes < min) return kvlink::Error(kvlink::errc::bad_request, too_small);
  return bytes;
}

int usage_error(std::string_view flag, const kvlink::Error& err) {
  fmt::print(stderr, "kvlink-server: {}: {}\n", flag, err.message());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  kvlink::server::ServerConfig cfg;
  std::string log_level = "info";
  std::string unix_mode = "0600";

  CLI::App app{"kvlink-server: KV-cache server for LLM inference engines"};
  app.set_version_flag("--version", std::string("kvlink-server ") + kvlink::version_string);
  app.add_option("--listen,-l", cfg.listen,
                 "Endpoint to listen on, repeatable: unix:/path/to.sock or tcp:HOST:PORT (loopback unless an address "
                 "is given)")
      ->default_str(kvlink::net::default_endpoint());
  app.add_option("--chunk-size", cfg.chunk_size, "Tokens per chunk (a multiple of the engine's block size)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1u << 20));
  app.add_option("--max-payload", cfg.max_payload, "Largest frame payload accepted, in bytes")
      ->capture_default_str()
      ->check(CLI::Range(4096u, 1u << 30));
  app.add_option("--max-in-flight", cfg.max_in_flight, "Requests one connection may have outstanding")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1u << 20));
  app.add_option("--max-connections", cfg.max_connections, "Concurrent client connections")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1u << 20));
  app.add_option("--max-instances", cfg.max_instances,
                 "Client instances the server keeps (each HELLO's instance id until it leaves or is reaped)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1u << 24));
  std::string max_outbound = std::to_string(cfg.max_outbound_bytes);
  app.add_option("--max-outbound-bytes", max_outbound,
                 "Replies a connection may have queued before the server stops reading its requests (8MiB, ...)")
      ->capture_default_str();
  std::string max_inbound;
  app.add_option("--max-inbound-bytes", max_inbound,
                 "Payload bytes of frames still arriving, over all connections, the server buffers (256MiB, ...); a "
                 "frame that would pass it is refused and its connection closed")
      ->default_str("4 x --max-payload");
  std::string quota;
  app.add_option("--instance-l1-quota", quota,
                 "L1 one instance's STOREs may hold: bytes (4GiB, ...) or a fraction of L1 (0.25); default: no quota");
  std::string token_file;
  app.add_option("--auth-token-file", token_file,
                 "File holding the shared secret every HELLO must carry (or set KVLINK_AUTH_TOKEN); required for "
                 "non-loopback tcp endpoints");
  app.add_option("--unix-group", cfg.unix_group,
                 "Give unix sockets to this group and make them group-accessible (mode 0660 unless --unix-mode)");
  app.add_option("--reap-timeout-s", cfg.reap_timeout_s,
                 "Forget instances silent this long, releasing their locks, jobs and KV-cache registration; 0: no "
                 "reaper (registrations then stay until UNREGISTER)")
      ->capture_default_str()
      ->check(CLI::Range(0u, 1u << 30));
  app.add_option("--registration-grace-s", cfg.registration_grace_s,
                 "Silence allowed to instances that registered KV caches but never pinged; not below "
                 "--reap-timeout-s")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1u << 30));
  auto* unix_mode_opt =
      app.add_option("--unix-mode", unix_mode, "Permission bits of unix sockets (octal)")->capture_default_str();
  app.add_option("--log-level", log_level, "debug, info, warn, error or off")->capture_default_str();
  std::string log_format = "text", log_file;
  app.add_option("--log-format", log_format,
                 "Log lines as text (timestamp level message) or json (one object per line: ts, level, msg)")
      ->capture_default_str()
      ->check(CLI::IsMember({"text", "json"}));
  app.add_option("--log-file", log_file,
                 "Append the log to this file instead of stderr; SIGHUP reopens it (rotation by rename)");
  std::string l1_size = "1GiB";
  app.add_option("--l1-size", l1_size, "L1 memory for KV chunks: 512MiB, 8GiB, or plain bytes")->capture_default_str();
  std::string l1_slab_size;
  app.add_option("--l1-slab-size", l1_slab_size,
                 "L1 is cut into slabs of this size, each holding chunks of one KV layout, so engines of different "
                 "models or shapes share L1; a layout's chunk must fit in a slab (default: an eighth of --l1-size, "
                 "at most 1GiB)");
  bool no_huge_pages = false;
  app.add_flag("--no-huge-pages", no_huge_pages, "Do not try huge pages for L1");
  app.add_flag("--l1-lock", cfg.l1_lock,
               "Pin L1 in RAM at startup (mlock): it is never paged out; needs a locked-memory limit (ulimit -l, "
               "systemd LimitMEMLOCK=) of at least --l1-size");
  std::string l2_disk_size, l2_max_write, l2_max_read;
  app.add_option("--l2-disk", cfg.l2_disk,
                 "A directory for the disk tier below L1 (one server each): L1's evictions are written there and "
                 "found again by lookups and after a restart; needs --l2-disk-size");
  app.add_option("--l2-disk-size", l2_disk_size, "Bytes the disk tier may take: 64GiB, 1TiB, ...");
  app.add_option("--l2-disk-layouts", cfg.l2_disk_layouts,
                 "KV layouts (chunk sizes) the disk tier's space is split between")
      ->capture_default_str()
      ->check(CLI::Range(1u, 64u));
  app.add_flag("--l2-write-through", cfg.l2_write_through,
               "Write every stored chunk to the tier too, not only what L1 evicts");
  app.add_option_function<std::int64_t>(
         "--l2-lookup-wait-ms", [&cfg](std::int64_t v) { cfg.l2_lookup_wait = std::chrono::milliseconds(v); },
         "The longest a lookup waits for chunks coming up from the tier (keep it below the engines' call timeout)")
      ->default_str(std::to_string(cfg.l2_lookup_wait.count()))
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{60000}));
  app.add_option_function<std::int64_t>(
         "--l2-io-deadline-ms", [&cfg](std::int64_t v) { cfg.l2_io_deadline = std::chrono::milliseconds(v); },
         "A tier I/O without a completion this long marks the tier degraded (L1-only service until a probe "
         "succeeds)")
      ->default_str(std::to_string(cfg.l2_io_deadline.count()))
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{600000}));
  app.add_option("--l2-max-write-bytes", l2_max_write, "Tier writes in flight at most (evictions past it are dropped)")
      ->default_str("256MiB");
  app.add_option("--l2-max-read-bytes", l2_max_read, "Tier reads in flight at most (lookups past it miss)")
      ->default_str("256MiB");
  std::string redis_seeds, redis_password_file;
  app.add_option("--l2-redis-cluster", redis_seeds,
                 "A Redis Cluster shared by the servers of several machines, given by some of its nodes "
                 "(HOST:PORT[,HOST:PORT...]): every stored chunk is written there, and lookups that miss L1 and the "
                 "disk find there what another server stored");
  app.add_option("--l2-redis-password-file", redis_password_file,
                 "File holding the cluster's password (or set KVLINK_REDIS_PASSWORD)");
  app.add_option_function<std::int64_t>(
         "--l2-redis-ttl-s", [&cfg](std::int64_t v) { cfg.l2_redis_ttl = std::chrono::seconds(v); },
         "Seconds chunks live in the cluster (0: until the cluster evicts them)")
      ->default_str("0")
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{86400 * 365}));
  app.add_option_function<std::int64_t>(
         "--l2-redis-deadline-ms", [&cfg](std::int64_t v) { cfg.l2_redis_deadline = std::chrono::milliseconds(v); },
         "Deadline of each command to the cluster")
      ->default_str(std::to_string(cfg.l2_redis_deadline.count()))
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{60000}));
  app.add_option_function<std::int64_t>(
         "--l2-redis-ping-ms", [&cfg](std::int64_t v) { cfg.l2_redis_ping = std::chrono::milliseconds(v); },
         "Interval and timeout of the PINGs watching each master: a hung or dead master is known within about "
         "two of them, and its chunks miss instead of waiting")
      ->default_str(std::to_string(cfg.l2_redis_ping.count()))
      ->check(CLI::Range(std::int64_t{10}, std::int64_t{60000}));
  app.add_flag("--l2-redis-write-back", cfg.l2_redis_write_back,
               "Also write what L1 evicts to the cluster (stores are always written through)");
  auto seconds = [&](const char* name, std::chrono::seconds& field, const char* what) {
    app.add_option_function<std::int64_t>(name, [&field](std::int64_t v) { field = std::chrono::seconds(v); }, what)
        ->default_str(std::to_string(field.count()))
        ->check(CLI::Range(std::int64_t{1}, std::int64_t{86400 * 365}));
  };
  seconds("--read-lock-ttl-s", cfg.read_lock_ttl, "Seconds before a lookup's read lock expires");
  seconds("--write-lock-ttl-s", cfg.write_lock_ttl, "Seconds before an unfinished STORE's write lock expires");
  seconds("--job-ttl-s", cfg.job_ttl, "Seconds an unpolled prefetch job is kept");
  seconds("--session-ttl-s", cfg.session_ttl, "Seconds an idle request session is kept");
  seconds("--outbound-stall-timeout-s", cfg.outbound_stall_timeout,
          "Seconds a connection's replies may stay above --max-outbound-bytes before it is closed");
  app.add_option_function<std::int64_t>(
         "--drain-timeout-s", [&cfg](std::int64_t v) { cfg.drain_timeout = std::chrono::seconds(v); },
         "On SIGTERM/SIGINT (planned restart): seconds to wait for STOREs and RETRIEVEs in flight before closing "
         "the connections; 0: do not wait. A second signal exits at once")
      ->default_str(std::to_string(cfg.drain_timeout.count()))
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{86400}));
  app.add_option("--high-watermark", cfg.high_watermark, "Fraction of L1 above which eviction starts")
      ->capture_default_str()
      ->check(CLI::Range(0.01, 1.0));
  app.add_option("--low-watermark", cfg.low_watermark, "Fraction of L1 eviction brings usage down to")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--http", cfg.http,
                 "Serve the HTTP admin plane on HOST:PORT (port 0: any free one): /healthz, /readyz, /status, "
                 "/metrics (Prometheus) and a live status page at /; loopback unless an auth token is set, which "
                 "/status and /metrics then require as a bearer token (default: off)");
  app.add_option("--transfer-threads", cfg.transfer_threads,
                 "Threads copying KV data between the workers' memfds and L1 (CPU transfer engine)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 256u));
  std::string engine_choice = "auto", cuda_copy = "batch";
  kvlink::transfer::TransferEngineOptions engine_options;
  app.add_option("--transfer-engine", engine_choice,
                 "auto: the CPU engine, plus the CUDA engine for cuda_ipc KV caches when a CUDA device exists; "
                 "cpu: CPU only; cuda: like auto, but fail to start without a CUDA device")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--cuda-copy", cuda_copy,
                 "How the CUDA engine moves a job's blocks: batch (one cudaMemcpyBatchAsync) or kernel (one "
                 "gather/scatter kernel launch)")
      ->capture_default_str()
      ->check(CLI::IsMember({"batch", "kernel"}));
  app.add_option("--cuda-streams", engine_options.cuda.streams_per_direction,
                 "CUDA streams per direction (store, retrieve) and device")
      ->capture_default_str()
      ->check(CLI::Range(1u, 64u));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help, --version: 0. A bad flag: 2, like the checks below (CLI11's
    // own codes, 105 and up, differ from error to error).
    return app.exit(e) == 0 ? 0 : 2;
  }

  if (auto bytes = size_flag(l1_size)) cfg.l1_size = *bytes;
  else return usage_error("--l1-size", bytes.error());
  if (!l1_slab_size.empty()) {
    if (auto bytes = size_flag(l1_slab_size, 1, "must be more than 0 bytes")) cfg.l1_slab_size = *bytes;
    else return usage_error("--l1-slab-size", bytes.error());
  }
  for (std::size_t at = 0; !redis_seeds.empty() && at <= redis_seeds.size();) {
    const auto comma = std::min(redis_seeds.find(',', at), redis_seeds.size());
    if (comma > at) cfg.l2_redis_cluster.push_back(redis_seeds.substr(at, comma - at));
    at = comma + 1;
  }
  for (const auto& node : cfg.l2_redis_cluster)
    if (auto parsed = kvlink::store::parse_cluster_node(node); !parsed)
      return usage_error("--l2-redis-cluster", parsed.error());
  if (!redis_password_file.empty()) {
    if (auto pw = kvlink::net::read_auth_token_file(redis_password_file)) cfg.l2_redis_password = std::move(*pw);
    else return usage_error("--l2-redis-password-file", pw.error());
  } else if (const char* pw = std::getenv("KVLINK_REDIS_PASSWORD"); pw && *pw) {
    cfg.l2_redis_password = pw;
  }
  if (!cfg.l2_disk.empty() && l2_disk_size.empty())
    return usage_error("--l2-disk", kvlink::Error(kvlink::errc::bad_request,
                                                  "needs --l2-disk-size: the bytes the tier may take (e.g. 64GiB)"));
  if (!l2_disk_size.empty()) {
    if (auto bytes = size_flag(l2_disk_size, 1 << 20, "must be at least 1MiB")) cfg.l2_disk_size = *bytes;
    else return usage_error("--l2-disk-size", bytes.error());
  }
  if (!l2_max_write.empty()) {
    if (auto bytes = size_flag(l2_max_write, 1, "must not be 0")) cfg.l2_max_write_bytes = *bytes;
    else return usage_error("--l2-max-write-bytes", bytes.error());
  }
  if (!l2_max_read.empty()) {
    if (auto bytes = size_flag(l2_max_read, 1, "must not be 0")) cfg.l2_max_read_bytes = *bytes;
    else return usage_error("--l2-max-read-bytes", bytes.error());
  }
  if (auto bytes = size_flag(max_outbound, 65536, "must be at least 64KiB")) cfg.max_outbound_bytes = *bytes;
  else return usage_error("--max-outbound-bytes", bytes.error());
  if (!max_inbound.empty()) {
    if (auto bytes = size_flag(max_inbound, 1, "must not be 0")) cfg.max_inbound_bytes = *bytes;
    else return usage_error("--max-inbound-bytes", bytes.error());
  }
  if (auto err = kvlink::server::check_inbound(cfg)) {
    fmt::print(stderr, "kvlink-server: {}\n", err.message());
    return 2;
  }
  if (!quota.empty()) {
    // A plain number below 1 (or with a point) is a fraction of L1; anything else a size.
    char* end = nullptr;
    const double fraction = std::strtod(quota.c_str(), &end);
    if (end && *end == '\0' && quota.find('.') != std::string::npos) {
      if (!(fraction > 0 && fraction <= 1)) {
        fmt::print(stderr, "kvlink-server: --instance-l1-quota {}: a fraction of L1 must be in (0, 1]\n", quota);
        return 2;
      }
      cfg.instance_l1_quota_fraction = fraction;
    } else if (auto bytes = size_flag(quota, 1, "must not be 0")) {
      cfg.instance_l1_quota_bytes = *bytes;
    } else {
      fmt::print(stderr, "kvlink-server: --instance-l1-quota: {} (give bytes such as 4GiB or a fraction such as 0.25)\n",
                 bytes.error().message());
      return 2;
    }
  }
  if (auto token = kvlink::net::resolve_auth_token({}, token_file)) cfg.auth_token = std::move(*token);
  else return usage_error("--auth-token-file", token.error());
  if (!cfg.unix_group.empty() && unix_mode_opt->count() == 0) unix_mode = "0660";
  cfg.huge_pages = !no_huge_pages;
  if (cfg.low_watermark > cfg.high_watermark) {
    fmt::print(stderr, "kvlink-server: --low-watermark {} is above --high-watermark {}\n", cfg.low_watermark,
               cfg.high_watermark);
    return 2;
  }
  std::string reaper_warning;
  if (auto err = kvlink::server::check_reaper(cfg, reaper_warning)) {
    fmt::print(stderr, "kvlink-server: {}\n", err.message());
    return 2;
  }

  if (auto level = kvlink::log::parse_level(log_level)) kvlink::log::set_level(*level);
  else return usage_error("--log-level", level.error());
  kvlink::log::set_format(kvlink::log::parse_format(log_format).value());  // checked by CLI11
  if (!log_file.empty()) {
    if (auto err = kvlink::log::open_file(log_file)) return usage_error("--log-file", err);
  }
  if (!reaper_warning.empty()) kvlink::log::warn("kvlink-server: {}", reaper_warning);
  if (cfg.reap_timeout_s == 0)
    kvlink::log::info("kvlink-server: --reap-timeout-s 0: no reaper; silent instances and their registrations stay "
                      "until they unregister");
  try {
    std::size_t used = 0;
    cfg.unix_socket_mode = static_cast<unsigned>(std::stoul(unix_mode, &used, 8));
    if (used != unix_mode.size() || cfg.unix_socket_mode > 0777) throw std::invalid_argument("range");
  } catch (const std::exception&) {
    fmt::print(stderr, "kvlink-server: --unix-mode '{}' is not an octal permission such as 0600 or 0660\n", unix_mode);
    return 2;
  }

  asio::io_context io(1);
  // Declared before the server, so it outlives it: the server's jobs run here.
  // Both checked by CLI11.
  engine_options.choice = kvlink::transfer::parse_engine_choice(engine_choice).value();
  engine_options.cuda.method = kvlink::transfer::parse_copy_method(cuda_copy).value();
  engine_options.cpu_threads = cfg.transfer_threads;
  std::string engine_summary;
  auto made = kvlink::transfer::make_transfer_engine(io.get_executor(), engine_options, engine_summary);
  if (!made) {
    fmt::print(stderr, "kvlink-server: {}\n", made.error().message());
    return 2;
  }
  auto& engine = *made;
  kvlink::log::info("kvlink-server: transfer engine: {}", engine_summary);
  cfg.transfer_engine_summary = engine_summary;
  kvlink::server::Server server(io, cfg, *engine);
  try {
    server.start();
  } catch (const std::exception& e) {
    fmt::print(stderr, "kvlink-server: {}\n", e.what());
    return 1;
  }
  // First SIGTERM/SIGINT: a planned restart (drain, then exit 0). A second
  // one while draining: the operator wants out now. SIGHUP is log rotation:
  // with --log-file the file is reopened at its path (the old one was
  // renamed; copy threads logging meanwhile write whole lines to one or the
  // other); with stderr its owner rotates it, so there is nothing to reopen,
  // and SIGHUP must not kill the server either way.
  asio::signal_set signals(io, SIGINT, SIGTERM, SIGHUP);
  std::function<void(std::error_code, int)> on_signal = [&](std::error_code ec, int sig) {
    if (ec) return;
    if (sig == SIGHUP) {
      if (log_file.empty()) {
        kvlink::log::info("kvlink-server: SIGHUP: the log goes to stderr, nothing to reopen; still serving");
      } else if (auto err = kvlink::log::reopen()) {
        kvlink::log::error("kvlink-server: SIGHUP: {}; still logging to the file opened before", err.message());
      } else {
        kvlink::log::info("kvlink-server: SIGHUP: reopened the log file {}", log_file);
      }
      signals.async_wait(on_signal);
      return;
    }
    if (server.handler().draining()) {
      kvlink::log::warn("kvlink-server: signal {} during the drain: exiting now, cutting {} transfers in flight", sig,
                        server.handler().transfers_in_flight());
      std::fflush(stdout);
      std::fflush(stderr);
      // Skips destructors: copies still running must not find L1 unmapped.
      std::_Exit(0);
    }
    kvlink::log::info("kvlink-server: signal {} received", sig);
    notify_systemd("STOPPING=1\nSTATUS=draining: finishing transfers in flight");
    server.drain(cfg.drain_timeout, [&](const kvlink::server::Server::DrainReport&) { signals.cancel(); });
    signals.async_wait(on_signal);
  };
  signals.async_wait(on_signal);
  fmt::print("kvlink-server ready boot_id={:016x} listening on {}{}\n", server.boot_id(),
             fmt::join(server.endpoints(), " "), server.admin_url().empty() ? "" : " admin " + server.admin_url());
  std::fflush(stdout);
  notify_systemd(fmt::format("READY=1\nSTATUS=serving on {}", fmt::join(server.endpoints(), " ")));
  io.run();
  return 0;
}
