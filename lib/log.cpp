#include "kvlink/log.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>

namespace kvlink::log {
namespace {

std::atomic<Level> g_level{Level::info};
Sink g_sink;
std::mutex g_stderr_mutex;

const char* level_name(Level l) {
  switch (l) {
    case Level::debug: return "debug";
    case Level::info: return "info";
    case Level::warn: return "warn";
    case Level::error: return "error";
    case Level::off: return "off";
  }
  return "?";
}

}  // namespace

void set_level(Level l) { g_level.store(l, std::memory_order_relaxed); }
Level level() { return g_level.load(std::memory_order_relaxed); }

bool parse_level(std::string_view text, Level& out) {
  for (Level l : {Level::debug, Level::info, Level::warn, Level::error, Level::off}) {
    if (text == level_name(l)) {
      out = l;
      return true;
    }
  }
  return false;
}

void set_sink(Sink sink) { g_sink = std::move(sink); }

void write(Level l, std::string_view message) {
  if (g_sink) return g_sink(l, message);
  using namespace std::chrono;
  const auto now = system_clock::now();
  const std::time_t t = system_clock::to_time_t(now);
  const auto ms = duration_cast<milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  localtime_r(&t, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%H:%M:%S", &tm);
  std::lock_guard lock(g_stderr_mutex);
  fmt::print(stderr, "{}.{:03d} {:5} {}\n", stamp, static_cast<int>(ms), level_name(l), message);
  std::fflush(stderr);
}

}  // namespace kvlink::log
