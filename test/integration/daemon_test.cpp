// kvlink-server as a daemon (issue 16), against the real binaries: systemd
// readiness through $NOTIFY_SOCKET (READY=1 once it accepts connections,
// STOPPING=1 when SIGTERM starts the drain), JSON log lines on stderr,
// --log-file with rotation by rename + SIGHUP, and kvlink-cli's exit codes
// (0 answered, 1 no answer / refused, 2 bad usage) against a real server, a
// dead endpoint and a listener that accepts but never answers.
#include <doctest/doctest.h>

#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "server_process.hpp"
#include "test_support.hpp"

using namespace std::chrono_literals;
using kvlink::test::ServerProcess;
using kvlink::test::TempDir;

namespace {

std::string server_bin() { return ServerProcess::binary("KVLINK_SERVER"); }
std::string cli_bin() { return ServerProcess::binary("KVLINK_CLI"); }

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  return lines;
}

// YYYY-MM-DDTHH:MM:SS.mmmZ
bool is_iso_utc_ms(std::string_view ts) {
  const std::string_view shape = "dddd-dd-ddTdd:dd:dd.dddZ";
  if (ts.size() != shape.size()) return false;
  for (std::size_t i = 0; i < ts.size(); ++i)
    if (shape[i] == 'd' ? !(ts[i] >= '0' && ts[i] <= '9') : ts[i] != shape[i]) return false;
  return true;
}

// {"ts":"<ISO>","level":"<level>","msg":"..."}: the shape of a JSON log
// line (the escaping itself is unit/log_test's).
bool is_json_log_line(const std::string& line) {
  const std::string head = "{\"ts\":\"";
  if (!line.starts_with(head) || !line.ends_with("\"}")) return false;
  if (!is_iso_utc_ms(std::string_view(line).substr(head.size(), 24))) return false;
  const std::string rest = line.substr(head.size() + 24);
  for (const char* level : {"debug", "info", "warn", "error"})
    if (rest.starts_with(std::string("\",\"level\":\"") + level + "\",\"msg\":\"")) return true;
  return false;
}

// A unix datagram socket standing in for systemd's notification socket.
// `name` starting with '@' binds in the abstract namespace.
class NotifySocket {
 public:
  explicit NotifySocket(const std::string& name) : name_(name) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd_ >= 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    REQUIRE(name.size() < sizeof addr.sun_path);
    std::memcpy(addr.sun_path, name.data(), name.size());
    socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size());
    if (name[0] == '@') {
      addr.sun_path[0] = '\0';
    } else {
      ++len;
    }
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), len) == 0);
  }
  ~NotifySocket() { ::close(fd_); }
  const std::string& name() const { return name_; }
  // The next datagram within `limit`, "" if none came.
  std::string receive(std::chrono::milliseconds limit) {
    pollfd pfd{fd_, POLLIN, 0};
    if (::poll(&pfd, 1, static_cast<int>(limit.count())) <= 0) return {};
    char buf[4096];
    const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
  }

 private:
  std::string name_;
  int fd_ = -1;
};

// A socket that listens but never accepts nor answers: connects succeed
// (the kernel queues them), HELLO is never answered.
class HungListener {
 public:
  // unix: a path; tcp: loopback, port chosen by the kernel.
  explicit HungListener(const std::string& unix_path = {}) {
    if (!unix_path.empty()) {
      fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      REQUIRE(fd_ >= 0);
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      std::memcpy(addr.sun_path, unix_path.c_str(), unix_path.size() + 1);
      REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
      endpoint_ = "unix:" + unix_path;
    } else {
      fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      REQUIRE(fd_ >= 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
      socklen_t len = sizeof addr;
      REQUIRE(::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
      endpoint_ = "tcp:127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
    }
    REQUIRE(::listen(fd_, 16) == 0);
  }
  ~HungListener() { ::close(fd_); }
  const std::string& endpoint() const { return endpoint_; }

 private:
  int fd_ = -1;
  std::string endpoint_;
};

// Runs kvlink-cli with `args`; its exit status, output in `out`, seconds taken in `secs`.
int cli(const std::string& args, std::string& out, double* secs = nullptr) {
  const auto t0 = std::chrono::steady_clock::now();
  const int rc = kvlink::test::run_command(cli_bin() + " " + args, out);
  if (secs) *secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rc;
}

}  // namespace

TEST_CASE("daemon: NOTIFY_SOCKET gets READY=1 once the server accepts connections, STOPPING=1 on SIGTERM") {
  TempDir dir;
  const std::vector<std::string> names = {dir.path() + "/notify.sock", "@kvlink-test-notify-" + std::to_string(::getpid())};
  for (const auto& name : names) {
    CAPTURE(name);
    NotifySocket notify(name);
    ServerProcess server({"--listen", dir.socket(), "--log-level", "warn"});
    server.set_env("NOTIFY_SOCKET", name);
    server.start();
    const std::string ready = notify.receive(10s);
    CHECK(lines_of(ready).at(0) == "READY=1");
    CHECK(ready.find("\nSTATUS=serving on " + server.endpoint()) != std::string::npos);
    // Ready means connections are accepted and answered, right now.
    std::string out;
    CHECK(cli("health --server " + server.endpoint() + " --timeout-s 5", out) == 0);
    CHECK(notify.receive(50ms).empty());  // one notification per state
    // SIGTERM: the drain begins (STOPPING=1), then the server exits 0.
    CHECK(server.terminate() == 0);
    const std::string stopping = notify.receive(5s);
    CHECK(lines_of(stopping).at(0) == "STOPPING=1");
    CHECK(notify.receive(50ms).empty());
  }
  // Without NOTIFY_SOCKET nothing is sent and nothing complains.
  {
    const std::string err = dir.path() + "/quiet.err";
    ServerProcess server({"--listen", dir.socket("quiet.sock"), "--log-level", "info"});
    server.set_stderr_file(err);
    server.start();
    CHECK(server.terminate() == 0);
    CHECK(read_file(err).find("notify") == std::string::npos);
  }
}

TEST_CASE("daemon: --log-format json writes JSON lines with ISO-8601 UTC timestamps to stderr") {
  TempDir dir;
  const std::string err = dir.path() + "/stderr.log";
  ServerProcess server({"--listen", dir.socket(), "--log-level", "info", "--log-format", "json"});
  server.set_stderr_file(err);
  server.start();
  // The ready line stays a plain line on stdout (scripts wait for it).
  CHECK(server.ready_line().starts_with("kvlink-server ready"));
  REQUIRE(::kill(server.pid(), SIGHUP) == 0);  // logs a line: nothing to reopen
  REQUIRE(kvlink::test::eventually([&] { return read_file(err).find("SIGHUP") != std::string::npos; }, 5s));
  CHECK(::kill(server.pid(), 0) == 0);
  CHECK(server.terminate() == 0);
  const auto lines = lines_of(read_file(err));
  REQUIRE(lines.size() >= 3);  // transfer engine, SIGHUP, signal 15, ...
  for (const auto& l : lines) CHECK_MESSAGE(is_json_log_line(l), l);
  CHECK(read_file(err).find("\"level\":\"info\",\"msg\":\"kvlink-server: transfer engine:") != std::string::npos);

  // Text, the default: timestamp, level, message.
  const std::string text_err = dir.path() + "/text.log";
  ServerProcess text({"--listen", dir.socket("text.sock"), "--log-level", "info"});
  text.set_stderr_file(text_err);
  text.start();
  CHECK(text.terminate() == 0);
  const auto text_lines = lines_of(read_file(text_err));
  REQUIRE(!text_lines.empty());
  for (const auto& l : text_lines) {
    CAPTURE(l);
    CHECK(is_iso_utc_ms(std::string_view(l).substr(0, 24)));
    CHECK((l.substr(24, 7) == " info  " || l.substr(24, 7) == " warn  " || l.substr(24, 7) == " error "));
  }

  // A format it does not know is bad usage.
  std::string out;
  CHECK(kvlink::test::run_command(server_bin() + " --log-format xml --listen " + dir.socket("x.sock"), out) != 0);
  CHECK(out.find("--log-format") != std::string::npos);
}

TEST_CASE("daemon: --log-file, then rename it and SIGHUP: new lines go to a new file at the path") {
  TempDir dir;
  const std::string log = dir.path() + "/server.log";
  const std::string err = dir.path() + "/stderr.log";
  ServerProcess server({"--listen", dir.socket(), "--log-level", "info", "--log-file", log});
  server.set_stderr_file(err);
  server.start();
  CHECK(read_file(log).find("kvlink-server: transfer engine:") != std::string::npos);

  // logrotate's way: rename, then SIGHUP.
  std::filesystem::rename(log, log + ".1");
  REQUIRE(::kill(server.pid(), SIGHUP) == 0);
  REQUIRE(kvlink::test::eventually([&] { return read_file(log).find("reopened the log file") != std::string::npos; },
                                   5s));
  CHECK(::kill(server.pid(), 0) == 0);
  std::string out;
  CHECK(cli("health --server " + server.endpoint(), out) == 0);
  CHECK(server.terminate() == 0);

  const std::string old_text = read_file(log + ".1");
  const std::string new_text = read_file(log);
  CHECK(old_text.find("transfer engine") != std::string::npos);
  CHECK(old_text.find("reopened") == std::string::npos);
  CHECK(old_text.find("signal 15") == std::string::npos);
  CHECK(new_text.find("transfer engine") == std::string::npos);
  CHECK(new_text.find("kvlink-server: signal 15 received") != std::string::npos);
  for (const auto& l : lines_of(new_text)) CHECK(is_iso_utc_ms(std::string_view(l).substr(0, 24)));
  // Nothing of the log on stderr.
  CHECK(read_file(err) == "");

  // A file it cannot open: exit 2 before serving, naming the path.
  const std::string bad = dir.path() + "/no/such/dir/server.log";
  CHECK(kvlink::test::run_command(server_bin() + " --listen " + dir.socket("bad.sock") + " --log-file " + bad, out) ==
        2);
  CHECK(out.find(bad) != std::string::npos);
  CHECK(out.find("No such file or directory") != std::string::npos);
}

TEST_CASE("kvlink-cli exit codes: 0 answered, 1 no answer or refused, 2 bad usage; never past the timeout") {
  TempDir dir;
  const std::string token = dir.path() + "/token";
  std::ofstream(token) << "daemon-test-secret\n";
  ::chmod(token.c_str(), 0600);
  ServerProcess server({"--listen", dir.socket(), "--log-level", "warn", "--auth-token-file", token});
  server.start();
  const std::string ep = server.endpoint();
  const std::string auth = " --auth-token-file " + token;
  const std::string dead = dir.socket("absent.sock");
  HungListener hung_unix(dir.path() + "/hung.sock");
  HungListener hung_tcp;
  std::string out;
  double secs = 0;

  SUBCASE("health: the probe") {
    CHECK(cli("health --server " + ep + auth + " --timeout-s 5", out) == 0);
    CHECK(lines_of(out).size() == 1);
    CHECK(out.starts_with("healthy: " + ep + " answered in "));
    // Refused: no token, a wrong one.
    CHECK(cli("health --server " + ep, out) == 1);
    CHECK(out.starts_with("unhealthy: "));
    CHECK(lines_of(out).size() == 1);
    // Dead endpoint.
    CHECK(cli("health --server " + dead + " --timeout-s 5", out, &secs) == 1);
    CHECK(out.starts_with("unhealthy: "));
    CHECK(out.find("cannot connect") != std::string::npos);
    CHECK(secs < 4);
    // Accepts, never answers: fails by the deadline, not later.
    for (const auto* hung : {&hung_unix, &hung_tcp}) {
      CAPTURE(hung->endpoint());
      CHECK(cli("health --server " + hung->endpoint() + " --timeout-s 0.5", out, &secs) == 1);
      CHECK(out.starts_with("unhealthy: "));
      CHECK(out.find("timed out") != std::string::npos);
      CHECK(secs >= 0.45);
      CHECK(secs < 3);
    }
    // A stopped server is a hung one too.
    server.stop();
    REQUIRE(kvlink::test::eventually([&] { return kvlink::test::process_stopped(server.pid()); }, 5s));
    CHECK(cli("health --server " + ep + auth + " --timeout-s 0.3", out, &secs) == 1);
    CHECK(secs < 3);
    server.resume();
    CHECK(cli("health -s " + ep + auth, out) == 0);
  }

  SUBCASE("every subcommand: 0 against the server, 1 against a dead or hung one") {
    const std::vector<std::string> forms = {
        "ping -c 1 --timeout-ms 500",
        "stats --timeout-ms 500",
        "health --timeout-s 0.5",
        "watch --interval-ms 50 --timeout-ms 200 --duration-s 0.6",
    };
    for (const auto& form : forms) {
      CAPTURE(form);
      CHECK(cli(form + " --server " + ep + auth, out) == 0);
      CHECK(cli(form + " --server " + ep, out) == 1);  // refused: no token
      CHECK(cli(form + " --server " + dead, out) == 1);
      CHECK(cli(form + " --server " + hung_unix.endpoint(), out, &secs) == 1);
      CHECK(secs < 4);
    }
  }

  SUBCASE("bad usage is 2, whatever CLI11 or the tool found wrong") {
    const std::vector<std::string> bad = {
        "",                                        // no subcommand
        "frobnicate",                              // unknown subcommand
        "health --bogus",                          // unknown flag
        "health --timeout-s abc",                  // not a number
        "health --timeout-s 0",                    // out of range
        "ping --count 0",                          // out of range
        "stats --timeout-ms",                      // missing value
        "health --server nonsense:x",              // bad endpoint
        "ping --server tcp:",                      // bad endpoint
        "watch --server bogus",                    // bad endpoint
        "health --auth-token-file /nonexistent/token --server " + ep,  // unreadable token file
    };
    for (const auto& args : bad) {
      CAPTURE(args);
      CHECK(cli(args, out) == 2);
    }
    // --help and --version: 0; the help documents the exit codes.
    CHECK(cli("--help", out) == 0);
    CHECK(out.find("Exit codes") != std::string::npos);
    CHECK(out.find("health") != std::string::npos);
    CHECK(cli("health --help", out) == 0);
    CHECK(out.find("Exit codes") != std::string::npos);
    CHECK(out.find("--timeout-s") != std::string::npos);
    CHECK(cli("--version", out) == 0);
  }
}
