// Minimal leveled logging through fmt. One process-wide level and sink; the
// default sink writes one line per message to stderr, or to a log file
// (open_file), as text or JSON. Engines can redirect it (set_sink).
//
// Text:  2026-11-28T19:40:01.123Z info  kvlink-server: ...
// JSON:  {"ts":"2026-11-28T19:40:01.123Z","level":"info","msg":"kvlink-server: ..."}
// Timestamps are UTC, ISO 8601, with milliseconds. A JSON line's message is
// escaped by kvlink::json_string (kvlink/json.hpp): '"', '\' and control
// characters escaped (\n, \r, \t or \u00XX), other bytes as they are.
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <functional>
#include <string>
#include <string_view>

#include "kvlink/error.hpp"

namespace kvlink::log {

enum class Level { debug = 0, info = 1, warn = 2, error = 3, off = 4 };

void set_level(Level level);
Level level();
// Parses "debug", "info", "warn", "error", "off" (bad_request otherwise).
Result<Level> parse_level(std::string_view text);
// "debug", "info", ...
const char* level_name(Level level);

enum class Format { text, json };
// The default sink's line format (text unless set). Set it at start-up.
void set_format(Format format);
Format format();
// Parses "text" or "json" (bad_request otherwise).
Result<Format> parse_format(std::string_view text);

// The default sink writes to this file (opened for appending, created 0640)
// instead of stderr. On failure (the errno's code, the path and its text)
// the previous destination stays.
Error open_file(const std::string& path);
// Opens the file's path again, for log rotation by rename: lines written
// before go to the renamed file, lines after to a new file at the path.
// Safe against threads logging meanwhile. On failure the old file stays in
// use; without a file (stderr) does nothing.
Error reopen();
// The path given to open_file, "" while logging to stderr.
std::string file_path();
// Back to stderr (closes the file).
void close_file();

using Sink = std::function<void(Level, std::string_view line)>;
// Replaces the sink (nullptr restores the default: stderr or the file).
// Not thread-safe against concurrent logging: set it at start-up. A sink
// gets the bare message, without timestamp or level.
void set_sink(Sink sink);

void write(Level level, std::string_view message);

// One line of the default sink as written at `when`, '\n' included.
std::string format_line(Format format, Level level, std::string_view message,
                        std::chrono::system_clock::time_point when);
// "2026-11-28T19:40:01.123Z"
std::string iso8601_utc(std::chrono::system_clock::time_point when);

template <class... Args>
void debug(fmt::format_string<Args...> f, Args&&... args) {
  if (level() <= Level::debug) write(Level::debug, fmt::format(f, std::forward<Args>(args)...));
}
template <class... Args>
void info(fmt::format_string<Args...> f, Args&&... args) {
  if (level() <= Level::info) write(Level::info, fmt::format(f, std::forward<Args>(args)...));
}
template <class... Args>
void warn(fmt::format_string<Args...> f, Args&&... args) {
  if (level() <= Level::warn) write(Level::warn, fmt::format(f, std::forward<Args>(args)...));
}
template <class... Args>
void error(fmt::format_string<Args...> f, Args&&... args) {
  if (level() <= Level::error) write(Level::error, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace kvlink::log
