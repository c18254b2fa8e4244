// The disk tier's figures (issue 17), each against a reference measured in
// the same run on the same directory:
//
//   tier_write   DiskTier writes of 4 MiB chunks (as the server drives it:
//                copy, checksum, O_DIRECT through io_uring, journal)
//                against `dd oflag=direct` of the same bytes
//   tier_read    DiskTier reads (O_DIRECT, checksum verified) against
//                `dd iflag=direct`
//   tier_hit     a 32 MiB chunk found only on disk: SYNC_LOOKUP through
//                the real server until the RETRIEVE completed in the
//                engine's memory, against one O_DIRECT read of 32 MiB
//   warm_restart kvlink-server's start to ready on a directory holding N
//                chunks, against its start without a disk tier
//
// Output: one line per figure, NAME FIGURE REFERENCE RATIO (bench/run
// parses them), after the raw samples. Medians of --rounds.
#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fmt/format.h>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kvlink/adapter/scheduler.hpp"
#include "kvlink/adapter/worker.hpp"
#include "kvlink/runtime/runtime.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "figures.hpp"
#include "server_process.hpp"
#include "store/disk_tier.hpp"

using namespace kvlink;
using namespace std::chrono_literals;
using kvlink::test::ServerProcess;
using kvlink::bench::median;
using kvlink::bench::seconds;
using kvlink::bench::spec;
using kvlink::bench::stat_of;

namespace {

// A directory on the filesystem under test, removed at the end.
struct Dir {
  std::string path;
  explicit Dir(const std::string& base) {
    std::string tmpl = base + "/kvlink-bench-tier-XXXXXX";
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp in " + base + ": " + std::strerror(errno));
    path = tmpl;
  }
  ~Dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

// dd's bytes per second, from its last line ("... copied, 0.14 s, 1.9 GB/s").
double dd(const std::string& args) {
  const std::string cmd = "dd " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) throw std::runtime_error("cannot run dd");
  std::string out;
  char buf[512];
  while (std::fgets(buf, sizeof buf, p)) out += buf;
  if (::pclose(p) != 0) throw std::runtime_error("dd " + args + " failed: " + out);
  unsigned long long bytes = 0;
  double secs = 0;
  const auto copied = out.rfind("copied, ");
  const auto line = out.rfind('\n', copied == std::string::npos ? 0 : copied);
  if (copied == std::string::npos ||
      std::sscanf(out.c_str() + (line == std::string::npos ? 0 : line + 1), "%llu", &bytes) != 1 ||
      std::sscanf(out.c_str() + copied + 8, "%lf", &secs) != 1 || secs <= 0)
    throw std::runtime_error("cannot parse dd's output: " + out);
  return static_cast<double>(bytes) / secs;
}

std::unique_ptr<store::DiskTier> open_tier(const std::string& dir, std::uint64_t capacity) {
  store::DiskTierConfig c;
  c.dir = dir;
  c.capacity_bytes = capacity;
  auto t = store::DiskTier::open(c, 1, Clock::now());
  if (!t) throw std::runtime_error(t.error().message());
  return std::move(*t);
}

void wait_io(store::DiskTier& tier) {
  pollfd p{tier.event_fd(), POLLIN, 0};
  (void)::poll(&p, 1, 100);
  tier.on_ready(Clock::now());
}

store::ChunkKey key(std::uint64_t i) { return {77, store::ChunkHash{i * 2654435761u + 1, i}, 0}; }

// Writes `n` chunks of `bytes` as fast as the in-flight bound lets them
// go, then reads them back; bytes per second of each.
std::pair<double, double> tier_throughput(const std::string& dir, std::uint64_t bytes, std::uint64_t n) {
  auto tier = open_tier(dir, (n + 8) * bytes);
  std::vector<std::byte> data(bytes);
  std::mt19937_64 rng(3);
  for (auto& b : data) b = static_cast<std::byte>(rng());
  const auto t0 = Clock::now();
  for (std::uint64_t i = 0; i < n; ++i) {
    while (!tier->put(key(i), data, Clock::now())) {
      if (!tier->accepting() || Clock::now() - t0 > 120s) throw std::runtime_error("the tier refused writes");
      wait_io(*tier);  // at the in-flight bound: wait for completions
    }
  }
  while (tier->index().writing() > 0) wait_io(*tier);
  const double write_s = seconds(Clock::now() - t0);
  if (tier->stats().writes != n) throw std::runtime_error("not every chunk was written");

  std::uint64_t read = 0;
  const auto t1 = Clock::now();
  for (std::uint64_t i = 0; i < n; ++i) {
    for (;;) {
      auto err = tier->get(key(i), Clock::now(), [&](const Error& e, std::span<const std::byte> got) {
        if (e || got.size() != bytes) throw std::runtime_error("a read failed: " + e.message());
        ++read;
      });
      if (!err) break;
      if (err != errc::limit_exceeded) throw std::runtime_error(err.message());
      wait_io(*tier);
    }
  }
  while (read < n) wait_io(*tier);
  const double read_s = seconds(Clock::now() - t1);
  return {static_cast<double>(n * bytes) / write_s, static_cast<double>(n * bytes) / read_s};
}

void throughput(const std::string& base, int rounds) {
  constexpr std::uint64_t chunk = 4 << 20;
  constexpr std::uint64_t chunks = 256;  // 1 GiB
  std::vector<double> tw, tr, dw, dr;
  for (int r = 0; r < rounds; ++r) {
    Dir dir(base);
    const std::string file = dir.path + "/dd.bin";
    dw.push_back(dd(fmt::format("if=/dev/zero of={} bs=4M count={} oflag=direct", file, chunks)));
    auto [w, rd] = tier_throughput(dir.path + "/tier", chunk, chunks);
    tw.push_back(w);
    tr.push_back(rd);
    dr.push_back(dd(fmt::format("if={} of=/dev/null bs=4M iflag=direct", file)));
    fmt::print("sample round {}: tier write {:.0f} MB/s, dd write {:.0f} MB/s, tier read {:.0f} MB/s, dd read {:.0f} "
               "MB/s\n",
               r, w / 1e6, dw.back() / 1e6, rd / 1e6, dr.back() / 1e6);
  }
  fmt::print("tier_write {:.0f} {:.0f} {:.2f}\n", median(tw) / 1e6, median(dw) / 1e6, median(tw) / median(dw));
  fmt::print("tier_read {:.0f} {:.0f} {:.2f}\n", median(tr) / 1e6, median(dr) / 1e6, median(tr) / median(dr));
}

// One O_DIRECT read of `bytes` from a file written beforehand.
double raw_read_s(const std::string& file, std::uint64_t bytes) {
  const int fd = ::open(file.c_str(), O_RDONLY | O_DIRECT);
  if (fd < 0) throw std::runtime_error("open " + file + ": " + std::strerror(errno));
  store::AlignedBuffer buf(bytes);
  const auto t0 = Clock::now();
  std::uint64_t done = 0;
  while (done < bytes) {
    const ssize_t n = ::pread(fd, buf.data() + done, bytes - done, static_cast<off_t>(done));
    if (n <= 0) throw std::runtime_error("pread " + file);
    done += static_cast<std::uint64_t>(n);
  }
  const double s = seconds(Clock::now() - t0);
  ::close(fd);
  return s;
}

void disk_hit(const std::string& base, int rounds) {
  // 32 layers x K,V x 16 blocks of 16 tokens x 8 heads x 128 x 2 bytes:
  // 32 MiB per 256-token chunk. L1 holds 3 such chunks; 5 prompts looked
  // up in turn are each gone from L1 (written back) when their turn comes.
  constexpr std::uint64_t chunk_bytes = 32 << 20;
  Dir dir(base);
  const std::string ep = "unix:" + dir.path + "/kvlink.sock";
  ServerProcess server({"--listen", ep, "--log-level", "warn", "--chunk-size", "256", "--l1-size", "96MiB",
                        "--l1-slab-size", "32MiB", "--no-huge-pages", "--l2-disk", dir.path + "/tier",
                        "--l2-disk-size", "512MiB", "--l2-lookup-wait-ms", "5000"});
  server.start();
  const auto layout = wire::paged_layout(32, 48, 16, 8, 128, 2);
  auto kv = transfer::create_kv_memfd(layout, {.name = "bench-tier-kv"});
  if (!kv) throw std::runtime_error(kv.error().message());
  std::memset(kv->memory.get(), 0x5a, layout.region_bytes);
  runtime::Runtime rt;
  adapter::WorkerConfig wc;
  wc.endpoint = ep;
  wc.model = "bench-tier";
  wc.transfer_timeout = 10s;
  wc.blocking_deadline = 20s;
  auto worker = adapter::WorkerAdapter::create(rt.executor(), wc);
  adapter::SchedulerConfig sc;
  sc.endpoint = ep;
  sc.model = "bench-tier";
  sc.call_timeout = 10s;
  sc.blocking_deadline = 20s;
  auto scheduler = adapter::SchedulerAdapter::create(rt.executor(), sc);
  if (auto r = worker->register_kv_caches(layout, kv->fd.get()); !r) throw std::runtime_error(r.error().message());
  constexpr int prompts = 5;
  auto tokens = [](int p) {
    std::vector<store::Token> t(256);
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<store::Token>(p * 1000 + static_cast<int>(i));
    return t;
  };
  std::vector<std::uint32_t> src(16), dst(16);
  for (std::uint32_t i = 0; i < 16; ++i) src[i] = i, dst[i] = 16 + i;
  for (int p = 0; p < prompts; ++p) {
    if (auto r = worker->submit_store(spec(fmt::format("store-{}", p), tokens(p), src)); !r || r->stored_chunks != 1)
      throw std::runtime_error("store failed: " + (r ? std::string("not stored") : r.error().message()));
  }
  // The reference file: 32 MiB written with O_DIRECT beside the tier's files.
  const std::string raw = dir.path + "/raw.bin";
  (void)dd(fmt::format("if=/dev/zero of={} bs=32M count=1 oflag=direct", raw));
  std::vector<double> hit, ref;
  const std::int64_t hits_before = stat_of(ep, "tier_lookup_hits");
  for (int r = 0; r < rounds * prompts; ++r) {
    std::this_thread::sleep_for(200ms);  // the write-back of the last eviction completes
    const std::string id = fmt::format("hit-{}", r);
    const auto t = tokens(r % prompts);
    hit.push_back(bench::hit_seconds(*scheduler, *worker, id, t, dst, [&] {
      return fmt::format("round {}: disk_writes {}, disk_chunks {}, evictions {}", r, stat_of(ep, "disk_writes"),
                         stat_of(ep, "disk_chunks"), stat_of(ep, "evictions"));
    }));
    ref.push_back(raw_read_s(raw, chunk_bytes));
  }
  const std::int64_t from_disk = stat_of(ep, "tier_lookup_hits") - hits_before;
  fmt::print("sample disk-only hits: {} lookups, {} chunks came from disk\n", hit.size(), from_disk);
  if (from_disk != static_cast<std::int64_t>(hit.size()))
    throw std::runtime_error("some lookups were served from L1, not disk: the figure would be wrong");
  fmt::print("tier_hit {:.2f} {:.2f} {:.2f}\n", median(hit) * 1e3, median(ref) * 1e3, median(hit) / median(ref));
  (void)worker->shutdown(5s);
  scheduler->stop();
}

void warm_restart(const std::string& base, int rounds, std::uint64_t n) {
  Dir dir(base);
  const std::string tier_dir = dir.path + "/tier";
  {
    // N chunks of 4 KiB, as a server would have left them.
    auto tier = open_tier(tier_dir, (n + 16) * 4096);
    std::vector<std::byte> data(4096, std::byte{7});
    for (std::uint64_t i = 0; i < n; ++i)
      while (!tier->put(key(i), data, Clock::now())) wait_io(*tier);
    while (tier->index().writing() > 0) wait_io(*tier);
  }
  const std::string size = std::to_string((n + 16) * 4096);
  std::vector<double> warm, cold;
  for (int r = 0; r < rounds; ++r) {
    for (bool with_disk : {false, true}) {
      std::vector<std::string> args{"--listen", "unix:" + dir.path + "/s.sock", "--log-level", "warn", "--l1-size",
                                    "64MiB", "--no-huge-pages"};
      if (with_disk) args.insert(args.end(), {"--l2-disk", tier_dir, "--l2-disk-size", size});
      ServerProcess server(args);
      const auto t0 = Clock::now();
      server.start(60s);
      (with_disk ? warm : cold).push_back(seconds(Clock::now() - t0));
      if (with_disk && stat_of("unix:" + dir.path + "/s.sock", "disk_recovered_chunks") != static_cast<std::int64_t>(n))
        throw std::runtime_error("the restarted server did not find every chunk");
      server.kill();
    }
  }
  fmt::print("sample warm restart: {} chunks indexed\n", n);
  fmt::print("warm_restart {:.1f} {:.1f} {:.2f} {}\n", median(warm) * 1e3, median(cold) * 1e3,
             median(warm) / median(cold), n);
}

}  // namespace

int main(int argc, char** argv) {
#ifdef KVLINK_SERVER_PATH
  ::setenv("KVLINK_SERVER", KVLINK_SERVER_PATH, 0);
  ::setenv("KVLINK_CLI", KVLINK_CLI_PATH, 0);
#endif
  std::string base = "/var/tmp";
  int rounds = 3;
  std::uint64_t restart_chunks = 100000;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--dir" && i + 1 < argc) base = argv[++i];
    else if (a == "--quick") rounds = 1, restart_chunks = 20000;
    else {
      std::fprintf(stderr, "usage: bench-tier [--dir DIR (a directory on the disk to measure)] [--quick]\n");
      return 2;
    }
  }
  try {
    throughput(base, rounds);
    disk_hit(base, rounds);
    warm_restart(base, rounds, restart_chunks);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench-tier: %s\n", e.what());
    return 1;
  }
  return 0;
}
