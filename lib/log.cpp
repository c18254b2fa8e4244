#include "kvlink/log.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <mutex>

#include "kvlink/json.hpp"

namespace kvlink::log {
namespace {

std::atomic<Level> g_level{Level::info};
std::atomic<Format> g_format{Format::text};
Sink g_sink;
// Guards g_file and g_path, and serializes the lines written: one line is
// one fwrite + fflush under it, so lines never interleave and reopen()
// swaps the file between two lines.
std::mutex g_out_mutex;
std::FILE* g_file = nullptr;  // nullptr: stderr
std::string g_path;

// Opens `path` for appending (O_CLOEXEC: not inherited by children).
Result<std::FILE*> open_append(const std::string& path) {
  auto failed = [&path] {
    const int e = errno;
    return Error(std::error_code(e, std::generic_category()),
                 fmt::format("cannot open log file {}: {}", path, std::strerror(e)));
  };
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
  if (fd < 0) return failed();
  std::FILE* f = ::fdopen(fd, "a");
  if (f == nullptr) {
    Error err = failed();
    ::close(fd);
    return err;
  }
  return f;
}

}  // namespace

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

void set_level(Level l) { g_level.store(l, std::memory_order_relaxed); }
Level level() { return g_level.load(std::memory_order_relaxed); }

Result<Level> parse_level(std::string_view text) {
  for (Level l : {Level::debug, Level::info, Level::warn, Level::error, Level::off})
    if (text == level_name(l)) return l;
  return Error(errc::bad_request, fmt::format("log level '{}': use debug, info, warn, error or off", text));
}

void set_format(Format f) { g_format.store(f, std::memory_order_relaxed); }
Format format() { return g_format.load(std::memory_order_relaxed); }

Result<Format> parse_format(std::string_view text) {
  if (text == "text") return Format::text;
  if (text == "json") return Format::json;
  return Error(errc::bad_request, fmt::format("log format '{}': use text or json", text));
}

Error open_file(const std::string& path) {
  if (path.empty()) return Error(errc::bad_request, "cannot open log file: the path is empty");
  auto opened = open_append(path);
  if (!opened) return opened.error();
  std::FILE* f = *opened;
  std::FILE* old = nullptr;
  {
    std::lock_guard lock(g_out_mutex);
    old = g_file;
    g_file = f;
    g_path = path;
  }
  if (old != nullptr) std::fclose(old);
  return {};
}

Error reopen() {
  std::string path;
  {
    std::lock_guard lock(g_out_mutex);
    if (g_file == nullptr) return {};
    path = g_path;
  }
  // Opened outside the lock: other threads keep logging to the old file
  // meanwhile; the swap itself happens between two of their lines.
  auto opened = open_append(path);
  if (!opened) return opened.error();
  std::FILE* f = *opened;
  std::FILE* old = nullptr;
  {
    std::lock_guard lock(g_out_mutex);
    if (g_file == nullptr || g_path != path) {
      // close_file() or open_file() ran meanwhile: theirs wins.
      old = f;
    } else {
      old = g_file;
      g_file = f;
    }
  }
  std::fclose(old);
  return {};
}

std::string file_path() {
  std::lock_guard lock(g_out_mutex);
  return g_path;
}

void close_file() {
  std::FILE* old = nullptr;
  {
    std::lock_guard lock(g_out_mutex);
    old = g_file;
    g_file = nullptr;
    g_path.clear();
  }
  if (old != nullptr) std::fclose(old);
}

void set_sink(Sink sink) { g_sink = std::move(sink); }

std::string iso8601_utc(std::chrono::system_clock::time_point when) {
  using namespace std::chrono;
  const auto ms_total = floor<milliseconds>(when.time_since_epoch());
  const auto secs = floor<seconds>(ms_total);
  const auto ms = (ms_total - secs).count();
  const std::time_t t = static_cast<std::time_t>(secs.count());
  std::tm tm{};
  gmtime_r(&t, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
  return fmt::format("{}.{:03d}Z", stamp, static_cast<int>(ms));
}

std::string format_line(Format f, Level l, std::string_view message, std::chrono::system_clock::time_point when) {
  if (f == Format::json)
    return fmt::format("{{\"ts\":\"{}\",\"level\":\"{}\",\"msg\":{}}}\n", iso8601_utc(when), level_name(l),
                       json_string(message));
  return fmt::format("{} {:5} {}\n", iso8601_utc(when), level_name(l), message);
}

void write(Level l, std::string_view message) {
  if (g_sink) return g_sink(l, message);
  const std::string line = format_line(format(), l, message, std::chrono::system_clock::now());
  std::lock_guard lock(g_out_mutex);
  std::FILE* out = g_file != nullptr ? g_file : stderr;
  std::fwrite(line.data(), 1, line.size(), out);
  std::fflush(out);
}

}  // namespace kvlink::log
