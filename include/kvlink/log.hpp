// Minimal leveled logging through fmt. One process-wide level and sink; the
// default sink writes timestamped lines to stderr. Engines can redirect it.
#pragma once

#include <fmt/format.h>

#include <functional>
#include <string_view>

namespace kvlink::log {

enum class Level { debug = 0, info = 1, warn = 2, error = 3, off = 4 };

void set_level(Level level);
Level level();
// Parses "debug", "info", "warn", "error", "off"; false if unknown.
bool parse_level(std::string_view text, Level& out);

using Sink = std::function<void(Level, std::string_view line)>;
// Replaces the sink (nullptr restores stderr). Not thread-safe against
// concurrent logging: set it at start-up.
void set_sink(Sink sink);

void write(Level level, std::string_view message);

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
