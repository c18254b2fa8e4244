// kvlink-server's transfer engine choice (--transfer-engine auto|cpu|cuda)
// against the real binary: what HELLO announces, which registrations each
// choice accepts, and the refusal a host without a CUDA device gives for
// cuda_ipc KV caches. Runs on every machine; with a GPU the CUDA branch of
// each check runs instead (the data path itself is in test/gpu).
#include <doctest/doctest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <asio/experimental/as_tuple.hpp>
#include <asio/use_awaitable.hpp>

#include "kvlink/net/connection.hpp"
#include "kvlink/store/keys.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "server_process.hpp"
#include "test_support.hpp"

using namespace kvlink;
using kvlink::test::run;
using kvlink::test::ServerProcess;
using kvlink::test::TempDir;

namespace {

struct Worker {
  asio::io_context io;
  net::ConnectResult link;

  explicit Worker(const std::string& endpoint) {
    wire::HelloRequest h;
    h.role = wire::Role::worker;
    h.instance_id = net::random_instance_id();
    h.client_name = "transfer_engine_test";
    link = run(io, net::connect(io.get_executor(), test::parse(endpoint), h, std::chrono::seconds(5)));
    REQUIRE_MESSAGE(!link.error, link.error.message());
  }
  ~Worker() { link.connection->close(); }

  static asio::awaitable<std::pair<std::error_code, std::string>> call(std::shared_ptr<net::Connection> c,
                                                                       wire::RegisterKvCacheRequest req, int fd) {
    // Two statements, not a conditional of two co_awaits (g++ 12 copies its
    // result's bytes; see bench/transfer_cpu.cpp).
    auto token = asio::experimental::as_tuple(asio::use_awaitable);
    std::error_code ec;
    if (fd >= 0)
      std::tie(ec, std::ignore) = co_await c->async_call_with_fd(std::move(req), fd, std::chrono::seconds(5), token);
    else
      std::tie(ec, std::ignore) = co_await c->async_call(std::move(req), std::chrono::seconds(5), token);
    co_return std::pair{ec, ec ? c->last_error_message() : std::string()};
  }
  // REGISTER_KV_CACHE; the error message, "" on success.
  std::string register_kv(wire::KvLayout layout, int fd = -1) {
    wire::RegisterKvCacheRequest req;
    req.ns = store::namespace_id({"engine-test", 1, ""});
    req.model = "engine-test";
    req.layout = std::move(layout);
    auto [ec, message] = run(io, call(link.connection, std::move(req), fd));
    if (ec) REQUIRE_MESSAGE(!message.empty(), "a refused registration must say why");
    return ec ? message : std::string();
  }
};

// A well-formed cuda_ipc layout whose handles and device name nothing.
wire::KvLayout fake_cuda_layout() {
  wire::KvLayout l = wire::paged_layout(2, 64, 16, 2, 64, 2);
  l.backend = wire::KvBackend::cuda_ipc;
  for (auto& layer : l.layers) layer.ipc_handle = wire::Bytes(64);
  l.region_bytes = l.layers.back().offset + l.region_bytes / l.num_layers;
  REQUIRE_FALSE(l.check());
  return l;
}

std::string register_memfd(Worker& w) {
  wire::KvLayout l = wire::paged_layout(2, 64, 16, 2, 64, 2);
  auto kv = transfer::create_kv_memfd(l, {.name = "transfer_engine_test", .map = false});
  REQUIRE_MESSAGE(kv, kv.error().message());
  return w.register_kv(l, kv->fd.get());
}

}  // namespace

TEST_CASE("transfer engine auto: memfd KV caches are served; cuda_ipc ones need a CUDA device the server sees") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "64MiB", "--no-huge-pages"});
  server.start();
  Worker cuda_worker(server.endpoint());
  const std::uint64_t caps = cuda_worker.link.hello.capabilities;
  CHECK((caps & wire::capability::cpu_transfer) != 0);
  const std::string why = cuda_worker.register_kv(fake_cuda_layout());
  if ((caps & wire::capability::cuda_transfer) == 0) {
    // No GPU here (or a build without CUDA): refused, and the reason says so.
    CHECK_MESSAGE(why.find("this server has no CUDA device") != std::string::npos, why);
  } else {
    // A CUDA server: the all-zero UUID names no device it sees.
    CHECK_MESSAGE(why.find("which this server does not see") != std::string::npos, why);
  }
  Worker cpu_worker(server.endpoint());
  CHECK(register_memfd(cpu_worker) == "");
}

TEST_CASE("transfer engine cpu: cuda_ipc KV caches are refused even on a GPU host") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--transfer-engine", "cpu", "--l1-size", "64MiB", "--no-huge-pages"});
  server.start();
  Worker w(server.endpoint());
  CHECK(w.link.hello.capabilities == wire::capability::cpu_transfer);
  const std::string why = w.register_kv(fake_cuda_layout());
  CHECK_MESSAGE(why.find("started with --transfer-engine cpu") != std::string::npos, why);
  CHECK(register_memfd(w) == "");
}

TEST_CASE("transfer engine cuda: without a usable CUDA device the server does not start, and says why") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--transfer-engine", "cuda", "--l1-size", "64MiB"});
  std::string failure;
  try {
    server.start();
  } catch (const std::exception& e) {
    failure = e.what();
  }
  if (failure.empty()) {
    // It started: then it found a device, and HELLO says so.
    Worker w(server.endpoint());
    CHECK((w.link.hello.capabilities & wire::capability::cuda_transfer) != 0);
  } else {
    CHECK_MESSAGE(failure.find("--transfer-engine cuda: ") != std::string::npos, failure);
    const bool reason = failure.find("no CUDA device") != std::string::npos ||
                        failure.find("built without CUDA") != std::string::npos;
    CHECK_MESSAGE(reason, failure);
  }
}
