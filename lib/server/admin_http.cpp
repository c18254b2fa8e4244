#include "kvlink/server/admin_http.hpp"

#include <httplib.h>

#include <fmt/format.h>

#include <stdexcept>
#include <thread>

#include "kvlink/log.hpp"
#include "kvlink/net/endpoint.hpp"
#include "kvlink/server/request_handler.hpp"
#include "status_page.hpp"

namespace kvlink::server {

Result<net::Endpoint> admin_endpoint(const AdminHttpConfig& config) {
  auto ep = net::parse_endpoint("tcp:" + config.address);
  if (!ep)
    return Error(errc::bad_request, fmt::format("--http {}: {}; give HOST:PORT, e.g. 127.0.0.1:9100", config.address,
                                                ep.error().message()));
  if (!ep->is_loopback() && config.auth_token.empty())
    return Error(errc::unauthorized, fmt::format("--http {} is not a loopback address: anyone who can reach it could read the server's "
                       "status, so it needs the shared secret; give --auth-token-file PATH or set KVLINK_AUTH_TOKEN",
                       config.address));
  return ep;
}

HttpAnswer admin_answer(std::string_view method, std::string_view path, std::string_view authorization,
                        const ServerStatus* status, TimePoint now, const AdminHttpConfig& config) {
  if (method != "GET" && method != "HEAD")
    return {405, "text/plain; charset=utf-8", fmt::format("{} is not served here: every endpoint is GET\n", method)};
  if (path == "/") return {200, "text/html; charset=utf-8", std::string(status_page_html)};
  const bool probe = path == "/healthz" || path == "/readyz";
  if (!probe && path != "/status" && path != "/metrics")
    return {404, "text/plain; charset=utf-8",
            fmt::format("no such page: {}; this server serves /, /healthz, /readyz, /status and /metrics\n", path)};
  // The probes say nothing but up or down: open to all, like the page.
  if (!probe && !config.auth_token.empty() &&
      !constant_time_equal(authorization, "Bearer " + config.auth_token))
    return {401, "text/plain; charset=utf-8",
            fmt::format("{} the auth token: send \"Authorization: Bearer TOKEN\" with the server's token "
                        "(--auth-token-file or KVLINK_AUTH_TOKEN)\n",
                        authorization.empty() ? "missing" : "wrong")};
  if (!status) return {503, "text/plain; charset=utf-8", "starting: no status published yet\n"};
  const auto age = now - status->taken_steady;  // steady: a wall-clock step is no stall
  if (path == "/healthz") {
    if (age > config.stale_after)
      return {503, "text/plain; charset=utf-8",
              fmt::format("stuck: the io thread published no status for {:.1f} s\n",
                          std::chrono::duration<double>(age).count())};
    return {200, "text/plain; charset=utf-8", "ok\n"};
  }
  if (path == "/readyz") {
    if (!status->ready) return {503, "text/plain; charset=utf-8", "starting\n"};
    if (status->draining) return {503, "text/plain; charset=utf-8", "draining for a planned restart\n"};
    return {200, "text/plain; charset=utf-8", "ready\n"};
  }
  if (path == "/status") return {200, "application/json", status_json(*status)};
  return {200, "text/plain; version=0.0.4; charset=utf-8", status_metrics(*status)};
}

struct AdminHttp::Impl {
  AdminHttpConfig config;
  httplib::Server http;
  std::thread thread;
  std::mutex mutex;
  std::shared_ptr<const ServerStatus> status;  // guarded by mutex

  std::shared_ptr<const ServerStatus> current() {
    std::lock_guard lock(mutex);
    return status;
  }
  void serve(const httplib::Request& req, httplib::Response& res) {
    const auto snapshot = current();
    HttpAnswer a = admin_answer(req.method, req.path, req.get_header_value("Authorization"), snapshot.get(),
                                Clock::now(), config);
    res.status = a.status;
    if (a.status == 401) res.set_header("WWW-Authenticate", "Bearer");
    res.set_header("Cache-Control", "no-store");
    res.set_content(std::move(a.body), a.content_type.c_str());
  }
};

AdminHttp::AdminHttp(AdminHttpConfig config) : impl_(std::make_unique<Impl>()) {
  auto parsed = admin_endpoint(config);
  if (!parsed) throw std::runtime_error(parsed.error().message());
  const net::Endpoint& ep = *parsed;
  impl_->config = std::move(config);
  auto& http = impl_->http;
  const unsigned threads = impl_->config.threads;
  http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  http.set_read_timeout(impl_->config.read_timeout.count(), 0);
  http.set_write_timeout(5, 0);
  http.set_keep_alive_timeout(impl_->config.read_timeout.count());
  http.set_payload_max_length(impl_->config.max_body_bytes);
  auto handler = [impl = impl_.get()](const httplib::Request& req, httplib::Response& res) { impl->serve(req, res); };
  http.Get(".*", handler);
  http.Post(".*", handler);
  http.Put(".*", handler);
  http.Delete(".*", handler);
  http.Patch(".*", handler);
  http.Options(".*", handler);
  int port = ep.port;
  const bool bound = port == 0 ? (port = http.bind_to_any_port(ep.host)) > 0 : http.bind_to_port(ep.host, port);
  if (!bound)
    throw std::runtime_error(fmt::format("--http {}: cannot listen there ({}); pick a free port or another address",
                                         impl_->config.address, std::strerror(errno)));
  url_ = fmt::format("http://{}:{}", ep.host.find(':') != std::string::npos ? "[" + ep.host + "]" : ep.host, port);
  impl_->thread = std::thread([impl = impl_.get()] { impl->http.listen_after_bind(); });
}

AdminHttp::~AdminHttp() {
  impl_->http.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

void AdminHttp::publish(std::shared_ptr<const ServerStatus> status) {
  std::lock_guard lock(impl_->mutex);
  impl_->status = std::move(status);
}

}  // namespace kvlink::server
