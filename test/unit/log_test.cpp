// The default log sink: the text and JSON line formats (UTC ISO-8601
// timestamps with milliseconds, JSON string escaping of hostile messages),
// logging to a file, and reopening it after a rename (log rotation), also
// while other threads log.
#include <doctest/doctest.h>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "kvlink/log.hpp"

using namespace kvlink;
using namespace std::chrono;
using namespace std::chrono_literals;

namespace {

// 2026-11-28T19:40:01.123Z
system_clock::time_point sample_time() {
  return sys_days{year{2026} / November / 28} + 19h + 40min + 1s + 123ms;
}

// Decodes one JSON string literal starting at text[pos] (the opening
// quote); advances pos past the closing one. Strict: a raw control
// character, an unknown escape or a missing quote is a failure.
std::optional<std::string> parse_json_string(std::string_view text, std::size_t& pos) {
  if (pos >= text.size() || text[pos] != '"') return std::nullopt;
  std::string out;
  for (++pos; pos < text.size(); ++pos) {
    const char c = text[pos];
    if (c == '"') {
      ++pos;
      return out;
    }
    if (static_cast<unsigned char>(c) < 0x20) return std::nullopt;
    if (c != '\\') {
      out += c;
      continue;
    }
    if (++pos >= text.size()) return std::nullopt;
    switch (text[pos]) {
      case '"': out += '"'; break;
      case '\\': out += '\\'; break;
      case '/': out += '/'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'u': {
        if (pos + 4 >= text.size()) return std::nullopt;
        const std::string hex(text.substr(pos + 1, 4));
        char* end = nullptr;
        const long v = std::strtol(hex.c_str(), &end, 16);
        if (end != hex.c_str() + 4 || v >= 0x80) return std::nullopt;  // the log escapes only ASCII controls
        out += static_cast<char>(v);
        pos += 4;
        break;
      }
      default: return std::nullopt;
    }
  }
  return std::nullopt;
}

// Parses a flat JSON object of string values, one line ending in '\n'.
std::optional<std::map<std::string, std::string>> parse_json_line(std::string_view line) {
  if (line.size() < 3 || line.back() != '\n' || line[0] != '{') return std::nullopt;
  line.remove_suffix(1);
  std::map<std::string, std::string> fields;
  std::size_t pos = 1;
  for (;;) {
    auto key = parse_json_string(line, pos);
    if (!key || pos >= line.size() || line[pos] != ':') return std::nullopt;
    ++pos;
    auto value = parse_json_string(line, pos);
    if (!value) return std::nullopt;
    fields[*key] = *value;
    if (pos >= line.size()) return std::nullopt;
    if (line[pos] == '}') return pos + 1 == line.size() ? std::optional(fields) : std::nullopt;
    if (line[pos] != ',') return std::nullopt;
    ++pos;
  }
}

// YYYY-MM-DDTHH:MM:SS.mmmZ
bool is_iso_utc_ms(std::string_view ts) {
  const std::string_view shape = "dddd-dd-ddTdd:dd:dd.dddZ";
  if (ts.size() != shape.size()) return false;
  for (std::size_t i = 0; i < ts.size(); ++i) {
    if (shape[i] == 'd' ? !(ts[i] >= '0' && ts[i] <= '9') : ts[i] != shape[i]) return false;
  }
  return true;
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream f(path);
  std::vector<std::string> lines;
  for (std::string l; std::getline(f, l);) lines.push_back(l + "\n");
  return lines;
}

// A temporary directory; on the way out the log goes back to stderr, text,
// the level it had.
struct LogFixture {
  std::string dir;
  log::Level old_level = log::level();
  LogFixture() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "kvlink-log-test-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    dir = tmpl;
    log::set_level(log::Level::info);
  }
  ~LogFixture() {
    log::close_file();
    log::set_format(log::Format::text);
    log::set_level(old_level);
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

}  // namespace

TEST_CASE("log: timestamps are UTC ISO 8601 with milliseconds") {
  CHECK(log::iso8601_utc(sample_time()) == "2026-11-28T19:40:01.123Z");
  CHECK(log::iso8601_utc(system_clock::time_point{}) == "1970-01-01T00:00:00.000Z");
  CHECK(log::iso8601_utc(sys_days{year{2026} / January / 2} + 5ms) == "2026-01-02T00:00:00.005Z");
  CHECK(is_iso_utc_ms(log::iso8601_utc(system_clock::now())));
}

TEST_CASE("log: a text line is timestamp, level, message") {
  CHECK(log::format_line(log::Format::text, log::Level::info, "kvlink-server: ready", sample_time()) ==
        "2026-11-28T19:40:01.123Z info  kvlink-server: ready\n");
  CHECK(log::format_line(log::Format::text, log::Level::error, "boom", sample_time()) ==
        "2026-11-28T19:40:01.123Z error boom\n");
}

TEST_CASE("log: a JSON line is one object with ts, level and msg, escaped") {
  CHECK(log::format_line(log::Format::json, log::Level::warn, "plain", sample_time()) ==
        "{\"ts\":\"2026-11-28T19:40:01.123Z\",\"level\":\"warn\",\"msg\":\"plain\"}\n");
  const std::vector<std::string> hostile = {
      "say \"hi\"",
      "two\nlines\r\n",
      "C:\\path\\",
      std::string("nul \0 inside", 12),
      "\x01\x02\x1f control",
      "tab\tand \"\\\" mix",
      "\"}{\"level\":\"error\"",  // tries to end the object early
      "caf\xc3\xa9 \xe2\x9c\x93 utf-8 and \x7f",
      "",
  };
  for (const auto& msg : hostile) {
    CAPTURE(msg);
    const std::string line = log::format_line(log::Format::json, log::Level::info, msg, sample_time());
    // One line: the only raw control character is the final newline.
    for (std::size_t i = 0; i + 1 < line.size(); ++i) CHECK(static_cast<unsigned char>(line[i]) >= 0x20);
    auto fields = parse_json_line(line);
    REQUIRE_MESSAGE(fields.has_value(), "not a JSON object line: " << line);
    CHECK(fields->size() == 3);
    CHECK((*fields)["ts"] == "2026-11-28T19:40:01.123Z");
    CHECK((*fields)["level"] == "info");
    CHECK((*fields)["msg"] == msg);
  }
  // The escapes themselves: control characters as \u00XX (or \n, \r, \t),
  // '"' and '\\' backslashed, bytes of UTF-8 passed through.
  auto msg_of = [](std::string_view m) {
    const std::string line = log::format_line(log::Format::json, log::Level::info, m, sample_time());
    const std::string prefix = "{\"ts\":\"2026-11-28T19:40:01.123Z\",\"level\":\"info\",\"msg\":";
    REQUIRE(line.starts_with(prefix));
    REQUIRE(line.ends_with("}\n"));
    return line.substr(prefix.size(), line.size() - prefix.size() - 2);
  };
  CHECK(msg_of("\x01") == R"("\u0001")");
  CHECK(msg_of("\x1f") == R"("\u001f")");
  CHECK(msg_of("a\nb") == R"("a\nb")");
  CHECK(msg_of("\"\\") == R"("\"\\")");
  CHECK(msg_of("\xc3\xa9") == "\"\xc3\xa9\"");
}

TEST_CASE("log: parse_format and parse_level") {
  CHECK(log::parse_format("json").value() == log::Format::json);
  CHECK(log::parse_format("text").value() == log::Format::text);
  CHECK_FALSE(log::parse_format("JSON"));
  CHECK_FALSE(log::parse_format(""));
  CHECK(log::parse_format("JSON").error().message().find("use text or json") != std::string::npos);
  CHECK(log::parse_level("warn").value() == log::Level::warn);
  CHECK_FALSE(log::parse_level("verbose"));
  CHECK(log::parse_level("verbose").error() == errc::bad_request);
}

TEST_CASE("log: --log-file: lines go to the file; reopen after a rename starts a new one") {
  LogFixture fx;
  const std::string path = fx.dir + "/server.log";
  REQUIRE_FALSE(log::open_file(path));
  CHECK(log::file_path() == path);
  log::set_format(log::Format::json);
  log::info("first {}", 1);
  log::warn("second \"quoted\"");
  log::debug("below the level: not written");
  auto lines = read_lines(path);
  REQUIRE(lines.size() == 2);
  for (const auto& line : lines) {
    auto fields = parse_json_line(line);
    REQUIRE(fields.has_value());
    CHECK(is_iso_utc_ms((*fields)["ts"]));
  }
  CHECK((*parse_json_line(lines[0]))["msg"] == "first 1");
  CHECK((*parse_json_line(lines[1]))["msg"] == "second \"quoted\"");
  CHECK((*parse_json_line(lines[1]))["level"] == "warn");

  // Rotation: rename, reopen; the old file keeps its lines, new ones go to
  // a new file at the path.
  std::filesystem::rename(path, path + ".1");
  log::info("after the rename, before reopen");  // still the renamed file
  REQUIRE_FALSE(log::reopen());
  log::set_format(log::Format::text);
  log::info("after reopen");
  const auto old_lines = read_lines(path + ".1");
  REQUIRE(old_lines.size() == 3);
  CHECK(old_lines[2].find("after the rename, before reopen") != std::string::npos);
  const auto new_lines = read_lines(path);
  REQUIRE(new_lines.size() == 1);
  CHECK(is_iso_utc_ms(new_lines[0].substr(0, 24)));
  CHECK(new_lines[0].substr(24) == " info  after reopen\n");

  // Appends: opening an existing file keeps what it holds.
  REQUIRE_FALSE(log::open_file(path + ".1"));
  log::info("appended");
  CHECK(read_lines(path + ".1").size() == 4);
  CHECK(read_lines(path).size() == 1);

  // Back to stderr: reopen has nothing to do.
  log::close_file();
  CHECK(log::file_path() == "");
  CHECK_FALSE(log::reopen());
}

TEST_CASE("log: a file that cannot be opened is an error naming it; the old destination stays") {
  LogFixture fx;
  const std::string bad = fx.dir + "/no/such/dir/server.log";
  const std::string why = log::open_file(bad).message();
  CHECK(why.find(bad) != std::string::npos);
  CHECK(why.find("No such file or directory") != std::string::npos);
  CHECK(log::file_path() == "");
  CHECK(log::open_file(""));

  // reopen failing keeps the old file: its directory went away.
  const std::string sub = fx.dir + "/sub";
  std::filesystem::create_directory(sub);
  REQUIRE_FALSE(log::open_file(sub + "/server.log"));
  std::filesystem::rename(sub + "/server.log", fx.dir + "/kept.log");
  std::filesystem::remove(sub);
  const std::string reopen_error = log::reopen().message();
  CHECK(reopen_error.find(sub + "/server.log") != std::string::npos);
  log::info("still written");
  const auto kept = read_lines(fx.dir + "/kept.log");
  REQUIRE(kept.size() == 1);
  CHECK(kept[0].find("still written") != std::string::npos);
}

TEST_CASE("log: reopen while other threads log: no line lost, torn or mixed") {
  LogFixture fx;
  const std::string path = fx.dir + "/server.log";
  REQUIRE_FALSE(log::open_file(path));
  log::set_format(log::Format::json);
  constexpr int threads = 4, per_thread = 400, rotations = 20;
  std::atomic<int> running{threads};
  std::vector<std::thread> writers;
  for (int t = 0; t < threads; ++t) {
    writers.emplace_back([t, &running] {
      for (int i = 0; i < per_thread; ++i) log::info("thread {} line {} \"{}\"", t, i, std::string(40, 'x'));
      running.fetch_sub(1);
    });
  }
  int rotated = 0;
  while (rotated < rotations) {
    std::filesystem::rename(path, fx.dir + "/server.log." + std::to_string(rotated));
    REQUIRE_FALSE(log::reopen());
    ++rotated;
    if (running.load() == 0) break;
    std::this_thread::sleep_for(1ms);
  }
  for (auto& w : writers) w.join();
  log::close_file();

  std::vector<std::string> files{path};
  for (int i = 0; i < rotated; ++i) files.push_back(fx.dir + "/server.log." + std::to_string(i));
  int total = 0;
  for (const auto& f : files) {
    for (const auto& line : read_lines(f)) {
      auto fields = parse_json_line(line);
      REQUIRE_MESSAGE(fields.has_value(), "torn line in " << f << ": " << line);
      ++total;
    }
  }
  CHECK(total == threads * per_thread);
  CHECK(rotated >= 1);
}
