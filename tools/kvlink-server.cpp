// kvlink-server: the KV-cache server. Prints one line containing "ready" and
// its endpoints once it accepts connections; SIGINT/SIGTERM drain and exit 0.
#include <asio/io_context.hpp>
#include <asio/signal_set.hpp>
#include <CLI/CLI.hpp>
#include <cstdio>
#include <fmt/format.h>

#include "kvlink/log.hpp"
#include "kvlink/net/endpoint.hpp"
#include "kvlink/server/server.hpp"
#include "kvlink/version.hpp"

int main(int argc, char** argv) {
  kvlink::server::ServerConfig cfg;
  std::string log_level = "info";
  std::string unix_mode = "0600";

  CLI::App app{"kvlink-server: KV-cache server for LLM inference engines"};
  app.set_version_flag("--version", kvlink::version_string);
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
  app.add_option("--reap-timeout-s", cfg.reap_timeout_s, "Forget (and release) instances silent this long")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1u << 30));
  app.add_option("--registration-grace-s", cfg.registration_grace_s,
                 "Silence allowed to instances that registered KV caches but never pinged")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1u << 30));
  app.add_option("--unix-mode", unix_mode, "Permission bits of unix sockets (octal)")->capture_default_str();
  app.add_option("--log-level", log_level, "debug, info, warn, error or off")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  kvlink::log::Level level;
  if (!kvlink::log::parse_level(log_level, level)) {
    fmt::print(stderr, "kvlink-server: --log-level '{}' is not one of debug, info, warn, error, off\n", log_level);
    return 2;
  }
  kvlink::log::set_level(level);
  try {
    std::size_t used = 0;
    cfg.unix_socket_mode = static_cast<unsigned>(std::stoul(unix_mode, &used, 8));
    if (used != unix_mode.size() || cfg.unix_socket_mode > 0777) throw std::invalid_argument("range");
  } catch (const std::exception&) {
    fmt::print(stderr, "kvlink-server: --unix-mode '{}' is not an octal permission such as 0600 or 0660\n", unix_mode);
    return 2;
  }

  asio::io_context io(1);
  kvlink::server::Server server(io, cfg);
  try {
    server.start();
  } catch (const std::exception& e) {
    fmt::print(stderr, "kvlink-server: {}\n", e.what());
    return 1;
  }
  asio::signal_set signals(io, SIGINT, SIGTERM);
  signals.async_wait([&](std::error_code ec, int sig) {
    if (ec) return;
    kvlink::log::info("kvlink-server: signal {} received, shutting down", sig);
    server.stop();
  });
  fmt::print("kvlink-server ready boot_id={:016x} listening on {}\n", server.boot_id(), fmt::join(server.endpoints(), " "));
  std::fflush(stdout);
  io.run();
  return 0;
}
