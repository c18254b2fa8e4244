// A socket that speaks frames: one reader that pulls as many frames per
// syscall as the kernel has, and one send buffer that collects every frame
// queued during the current turn of the io_context and writes them together.
// Used by the client connection and by the server's sessions.
#pragma once

#include <asio/experimental/as_tuple.hpp>
#include <asio/awaitable.hpp>
#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>
#include <memory>
#include <system_error>
#include <utility>

#include "kvlink/error.hpp"
#include "kvlink/net/endpoint.hpp"
#include "kvlink/wire/frame.hpp"

namespace kvlink::net {

struct StreamEnd {
  std::error_code ec;  // eof, connection_lost, protocol_error, ...
  std::string reason;  // human-readable
};

class FrameStream {
 public:
  explicit FrameStream(Socket socket, std::uint32_t max_payload = wire::default_max_payload)
      : socket_(std::move(socket)), parser_(max_payload) {}

  Socket& socket() { return socket_; }
  wire::FrameParser& parser() { return parser_; }
  bool is_open() const { return socket_.is_open(); }
  // Bytes queued but not yet accepted by the kernel.
  std::size_t queued_bytes() const { return out_.size() + (writing_ ? writing_buf_.size() : 0); }

  // Queues one frame; `encode` writes its payload. The flush happens after
  // the current handler returns, so frames queued together leave together.
  // `owner` keeps the object that owns this stream alive until the write ends.
  template <class EncodePayload>
  void send(std::uint8_t opcode, std::uint16_t flags, std::uint64_t id, EncodePayload&& encode,
            const std::shared_ptr<void>& owner) {
    if (!socket_.is_open()) return;
    wire::FrameBuilder(out_).add(opcode, flags, id, std::forward<EncodePayload>(encode));
    schedule_flush(owner);
  }

  // Lower level: append whole frames to out_buffer(), then schedule_flush().
  wire::Bytes& out_buffer() { return out_; }
  void schedule_flush(const std::shared_ptr<void>& owner) {
    if (flush_scheduled_ || writing_ || out_.empty()) return;
    if (in_read_turn_) {
      // read_frames flushes once the frames of this read are handled: no
      // post, so no extra trip through the scheduler (and its epoll_wait(0))
      // before the reply leaves.
      if (!turn_owner_) turn_owner_ = owner;
      return;
    }
    flush_scheduled_ = true;
    asio::post(socket_.get_executor(), [this, owner] { flush(owner); });
  }

  // Reads frames until the stream ends, handing each to on_frame (which
  // returns false to stop). Returns why the stream ended.
  template <class OnFrame>
  asio::awaitable<StreamEnd> read_frames(OnFrame on_frame) {
    for (;;) {
      // Start with small reads so an idle connection holds little memory
      // (the buffer is zero-filled, so its size is resident); grow while
      // reads come back full.
      auto space = parser_.prepare(read_size_);
      auto [ec, n] = co_await socket_.async_read_some(asio::buffer(space.data(), space.size()),
                                                      asio::experimental::as_tuple(asio::use_awaitable));
      if (ec) {
        if (ec == asio::error::eof) co_return StreamEnd{errc::connection_lost, "peer closed the connection"};
        if (ec == asio::error::operation_aborted) co_return StreamEnd{errc::connection_lost, "connection closed locally"};
        co_return StreamEnd{errc::connection_lost, ec.message()};
      }
      parser_.commit(n);
      if (n == space.size() && read_size_ < max_read_size) read_size_ *= 2;
      // The frames of one read are one turn: what their handlers queue
      // leaves together when the turn ends (end_read_turn), as it would
      // after a posted flush.
      in_read_turn_ = true;
      bool stopped = false;
      try {
        while (auto frame = parser_.next()) {
          if (!on_frame(*frame)) {
            stopped = true;
            break;
          }
        }
      } catch (...) {
        end_read_turn();
        throw;
      }
      end_read_turn();
      if (stopped) co_return StreamEnd{errc::protocol_error, "stopped by the frame handler"};
      if (parser_.failed()) {
        co_return StreamEnd{parser_.version_mismatch() ? make_error_code(errc::version_mismatch)
                                                       : make_error_code(errc::protocol_error),
                            parser_.error()};
      }
    }
  }

  void close() {
    std::error_code ignored;
    socket_.shutdown(Socket::shutdown_both, ignored);
    socket_.close(ignored);
  }

 private:
  void flush(const std::shared_ptr<void>& owner) {
    flush_scheduled_ = false;
    if (writing_ || out_.empty() || !socket_.is_open()) return;
    // Try the kernel right away; only what does not fit waits for an async write.
    // Asio's non_blocking(true) is an ioctl(FIONBIO) every time; the flag
    // sticks, so set it once.
    std::error_code ec;
    if (!socket_.non_blocking()) socket_.non_blocking(true, ec);  // one ioctl per socket, not per flush
    std::size_t n = ec ? 0 : socket_.write_some(asio::buffer(out_), ec);
    if (ec && ec != asio::error::would_block && ec != asio::error::try_again) {
      close();  // the reader sees the closed socket and reports the end
      return;
    }
    if (n == out_.size()) {
      out_.clear();
      return;
    }
    writing_ = true;
    writing_buf_.assign(out_.begin() + static_cast<std::ptrdiff_t>(n), out_.end());
    out_.clear();
    asio::async_write(socket_, asio::buffer(writing_buf_), [this, owner](std::error_code wec, std::size_t) {
      writing_ = false;
      writing_buf_.clear();
      if (wec) {
        close();
        return;
      }
      if (!out_.empty()) flush(owner);
    });
  }

  void end_read_turn() {
    in_read_turn_ = false;
    if (auto owner = std::move(turn_owner_)) {
      turn_owner_.reset();
      flush(owner);
    }
  }

  Socket socket_;
  wire::FrameParser parser_;
  // While read_frames hands frames to their handler: flushes wait for the
  // end of the turn; turn_owner_ is the owner of the first deferred flush.
  bool in_read_turn_ = false;
  std::shared_ptr<void> turn_owner_;
  static constexpr std::size_t max_read_size = 64 * 1024;
  std::size_t read_size_ = 2048;
  wire::Bytes out_;          // frames queued since the last flush
  wire::Bytes writing_buf_;  // frames the async write is sending
  bool writing_ = false;
  bool flush_scheduled_ = false;
};

}  // namespace kvlink::net
