// RoutingTransferEngine: registrations and jobs go to the engine of their
// layout's backend; without a CUDA engine cuda_ipc is refused with the
// reason; HELLO's capability bits are the union. No sockets, no GPU.
#include <doctest/doctest.h>

#include "kvlink/error.hpp"
#include "kvlink/transfer/routing_engine.hpp"

using namespace kvlink;
using namespace kvlink::transfer;

namespace {

// Counts what reaches it; announces `caps`.
class Probe final : public TransferEngine {
 public:
  explicit Probe(std::uint64_t caps) : caps_(caps) {}
  Error attach(Registration&, UniqueFd) override {
    ++attached;
    return {};
  }
  void submit(TransferJob, TransferDone done) override {
    ++submitted;
    done({});
  }
  Error use_l1(const Registration&, std::byte*, std::uint64_t) override {
    ++l1;
    return {};
  }
  std::uint64_t capabilities() const override { return caps_; }
  int attached = 0, submitted = 0, l1 = 0;

 private:
  std::uint64_t caps_;
};

std::shared_ptr<Registration> reg(wire::KvBackend backend) {
  auto r = std::make_shared<Registration>();
  r->layout.backend = backend;
  return r;
}

}  // namespace

TEST_CASE("routing engine: each backend reaches its own engine") {
  auto cpu = std::make_unique<Probe>(wire::capability::cpu_transfer);
  auto cuda = std::make_unique<Probe>(wire::capability::cuda_transfer);
  Probe *c = cpu.get(), *g = cuda.get();
  RoutingTransferEngine router(std::move(cpu), std::move(cuda), "");
  CHECK(router.capabilities() == (wire::capability::cpu_transfer | wire::capability::cuda_transfer));
  for (auto backend : {wire::KvBackend::cpu_memfd, wire::KvBackend::cuda_ipc}) {
    auto r = reg(backend);
    REQUIRE_FALSE(router.attach(*r, {}));
    REQUIRE_FALSE(router.use_l1(*r, nullptr, 0));
    TransferJob job;
    job.registration = r;
    std::error_code result = errc::timed_out;
    router.submit(std::move(job), [&](std::error_code ec) { result = ec; });
    CHECK(!result);
  }
  CHECK((c->attached == 1 && c->submitted == 1 && c->l1 == 1));
  CHECK((g->attached == 1 && g->submitted == 1 && g->l1 == 1));
}

TEST_CASE("routing engine: no CUDA engine -> cuda_ipc is refused with the reason, memfd still served") {
  auto cpu = std::make_unique<Probe>(wire::capability::cpu_transfer);
  Probe* c = cpu.get();
  RoutingTransferEngine router(std::move(cpu), nullptr, "cudaGetDeviceCount failed: no driver");
  CHECK(router.capabilities() == wire::capability::cpu_transfer);
  auto g = reg(wire::KvBackend::cuda_ipc);
  const Error refused = router.attach(*g, {});
  CHECK(refused == errc::bad_request);
  const std::string why = refused.message();
  CHECK(why.find("this server has no CUDA device") != std::string::npos);
  CHECK(why.find("cudaGetDeviceCount failed: no driver") != std::string::npos);
  CHECK_FALSE(router.use_l1(*g, nullptr, 0));
  auto m = reg(wire::KvBackend::cpu_memfd);
  CHECK_FALSE(router.attach(*m, {}));
  CHECK(c->attached == 1);
  CHECK(c->l1 == 0);
}

TEST_CASE("routing engine: --transfer-engine and --cuda-copy values") {
  CHECK(parse_engine_choice("auto").value() == EngineChoice::automatic);
  CHECK(parse_engine_choice("cpu").value() == EngineChoice::cpu);
  CHECK(parse_engine_choice("cuda").value() == EngineChoice::cuda);
  CHECK(parse_engine_choice("gpu").error() == errc::bad_request);
  CHECK(parse_copy_method("kernel").value() == CudaCopyMethod::kernel);
  CHECK(parse_copy_method("batch").value() == CudaCopyMethod::batch);
  CHECK(parse_copy_method("memcpy").error() == errc::bad_request);
  CHECK(std::string(copy_method_name(CudaCopyMethod::kernel)) == "kernel");
}
