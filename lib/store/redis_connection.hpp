// One connection to one Redis node, for the Redis Cluster tier (issue 18):
// commands pipelined on a TCP socket on the server's io_context, replies
// matched to them in order, a deadline per command.
//
// hiredis does the protocol: redisFormatCommandArgv builds each command
// (binary-safe arguments), its reader parses the reply stream (sans-io: we
// feed it the bytes Asio read). Its own networking and async API are not
// used: Asio owns the socket, the timers and the thread, as everywhere
// else in kvlink. Considered and not taken: writing RESP by hand (hiredis
// is Debian's, audited and fast), redis-plus-plus or hiredis's async
// adapters (their own event loops and threads).
//
// What a caller sees:
// - a reply (any RESP type; an error reply such as MOVED is a reply, not
//   an Error: the cluster logic reads it);
// - timed_out when no reply came within the command's deadline (the reply,
//   if it comes later, is dropped: the stream stays in order);
// - not_connected when the connection closed or broke first.
// Every `done` runs exactly once, on the io thread, never inside send().
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/steady_timer.hpp>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/store/cluster_keys.hpp"

struct redisReply;
struct redisReader;

namespace kvlink::store {

// A view of one reply, valid while the callback that received it runs.
class RedisValue {
 public:
  enum class Type : std::uint8_t { none, string, array, integer, nil, status, error };
  RedisValue() = default;
  explicit RedisValue(const redisReply* r) : r_(r) {}
  Type type() const;
  // string, status and error replies: their bytes.
  std::string_view str() const;
  std::span<const std::byte> bytes() const;
  long long integer() const;
  // array replies.
  std::size_t size() const;
  RedisValue operator[](std::size_t i) const;
  bool is_error() const { return type() == Type::error; }

 private:
  const redisReply* r_ = nullptr;
};

class RedisConnection : public std::enable_shared_from_this<RedisConnection> {
 public:
  using Done = std::function<void(const Error&, RedisValue)>;
  using Connected = std::function<void(Result<std::shared_ptr<RedisConnection>>)>;

  // Connects to `node` over TCP and, with a password, authenticates (AUTH),
  // all within `timeout`; `done` gets the connection or why not.
  static void connect(asio::any_io_executor ex, const ClusterNode& node, std::string password, Duration timeout,
                      Connected done);
  ~RedisConnection();
  RedisConnection(const RedisConnection&) = delete;
  RedisConnection& operator=(const RedisConnection&) = delete;

  // Sends one command: `args` are the command and its arguments.
  void send(std::span<const std::string_view> args, Duration deadline, Done done);
  void send(std::initializer_list<std::string_view> args, Duration deadline, Done done) {
    send(std::span<const std::string_view>(args.begin(), args.size()), deadline, std::move(done));
  }
  // Closes the socket; every command still waiting completes with
  // not_connected. Idempotent.
  void close();

  bool is_open() const { return open_; }
  // Commands sent whose reply has not come (timed-out ones included).
  std::size_t pending() const { return pending_.size(); }
  // Bytes queued to send and not yet written.
  std::size_t queued_bytes() const { return out_bytes_ + sending_bytes_; }
  // Bytes written whose replies have not come: at most
  // pipeline_window_bytes, or one command when it alone is larger.
  std::size_t unanswered_bytes() const { return unanswered_bytes_; }
  static constexpr std::size_t pipeline_window_bytes = 1 << 20;
  const ClusterNode& node() const { return node_; }

 private:
  struct Pending {
    TimePoint deadline;
    Done done;  // null once completed (a timeout)
    std::size_t bytes = 0;  // of the command sent
  };
  RedisConnection(asio::any_io_executor ex, ClusterNode node);
  void start_reading();
  void flush();
  void arm_timer();
  void on_timer();
  void fail_all(const Error& error);
  void complete(Pending& p, const Error& error, RedisValue value);

  asio::any_io_executor ex_;
  ClusterNode node_;
  asio::ip::tcp::socket socket_;
  asio::steady_timer timer_;
  TimePoint timer_at_ = TimePoint::max();
  redisReader* reader_ = nullptr;
  std::deque<Pending> pending_;
  // Commands as hiredis formatted them, each sent from where it was
  // formatted (a gather write; never copied again into one buffer).
  struct FreeCommand {
    void operator()(char* cmd) const;
  };
  struct Formatted {
    std::unique_ptr<char, FreeCommand> bytes;
    std::size_t size = 0;
  };
  std::deque<Formatted> out_;       // not yet handed to a write
  std::vector<Formatted> sending_;  // the write in progress
  std::size_t out_bytes_ = 0;
  std::size_t sending_bytes_ = 0;
  // Bytes of commands written whose replies have not come. Past
  // pipeline_window_bytes the next command waits for replies, unless none
  // is awaited: Redis copies the rest of a client's query buffer after each
  // command, so several chunk-sized values in one pipeline cost it time
  // that grows with their number (redis-benchmark -P 16 of 4 MiB SETs is
  // about 3x slower than -P 1); small commands still pipeline by the
  // thousand.
  std::size_t unanswered_bytes_ = 0;
  std::vector<char> in_ = std::vector<char>(64 * 1024);
  bool open_ = true;
  bool writing_ = false;
};

}  // namespace kvlink::store
