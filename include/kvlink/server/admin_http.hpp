// kvlink-server's HTTP admin listener (--http HOST:PORT): /healthz,
// /readyz, /status, /metrics and the live status page at /. Runs on its own
// few threads (cpp-httplib, Debian libcpp-httplib-dev) and answers from the
// last ServerStatus the io thread published, never touching the io
// thread's state, so a scrape or a slow HTTP client cannot delay an engine.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "kvlink/error.hpp"
#include "kvlink/net/endpoint.hpp"
#include "kvlink/server/status.hpp"

namespace kvlink::server {

struct AdminHttpConfig {
  std::string address;     // HOST:PORT (port 0: any free port)
  std::string auth_token;  // when set, /status and /metrics need "Authorization: Bearer TOKEN"
  unsigned threads = 4;    // requests served at once
  std::chrono::seconds read_timeout{2};  // a client silent this long mid-request is dropped
  std::size_t max_body_bytes = 4096;     // no endpoint takes a body
  // /healthz fails when the io thread published nothing for this long:
  // it is stuck, and a liveness probe should restart the server.
  std::chrono::seconds stale_after{5};
};

// One HTTP answer, decided from the request and the snapshot alone (pure).
struct HttpAnswer {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
};
// `status` is the last snapshot (null before the first); `now` the io
// thread's clock (steady). `authorization` is the request's Authorization
// header.
HttpAnswer admin_answer(std::string_view method, std::string_view path, std::string_view authorization,
                        const ServerStatus* status, TimePoint now, const AdminHttpConfig& config);

// The address to serve `config` on, or why it may not be served (a
// non-loopback address without a token, an address that is not HOST:PORT).
Result<net::Endpoint> admin_endpoint(const AdminHttpConfig& config);

class AdminHttp {
 public:
  // Binds and starts serving; throws std::runtime_error saying what to do
  // when the address is refused or cannot be bound.
  explicit AdminHttp(AdminHttpConfig config);
  ~AdminHttp();  // stops serving and joins its threads
  AdminHttp(const AdminHttp&) = delete;
  AdminHttp& operator=(const AdminHttp&) = delete;

  // "http://127.0.0.1:8080"
  const std::string& url() const { return url_; }
  // The io thread hands over a new snapshot (any thread may call it).
  void publish(std::shared_ptr<const ServerStatus> status);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string url_;
};

}  // namespace kvlink::server
