// A socket that speaks frames: one reader that pulls as many frames per
// syscall as the kernel has, and one send buffer that collects every frame
// queued during the current turn of the io_context and writes them together.
// Used by the client connection and by the server's sessions.
//
// File descriptors (memfds) travel with frames on unix sockets (SCM_RIGHTS):
// attach_fd() sends one with the next flush, receive_fds_into() makes the
// reader use recvmsg and collect what arrives.
//
// What the reader does next (read how much, pause, hold, end) is decided by
// ReadPacer; Reader here only makes the calls.
#pragma once

#include <sys/socket.h>

#include <asio/async_result.hpp>
#include <asio/awaitable.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>
#include <algorithm>
#include <cstring>
#include <cerrno>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/log.hpp"
#include "kvlink/unique_fd.hpp"
#include "kvlink/net/endpoint.hpp"
#include "read_pacer.hpp"
#include "kvlink/wire/frame.hpp"

namespace kvlink::net {

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
    if (!socket_.is_open() || send_failed_) return;
    wire::FrameBuilder(out_).add(opcode, flags, id, std::forward<EncodePayload>(encode));
    schedule_flush(owner);
  }

  // Sends `fd` (a unix socket only) with the bytes of the next flush, so it
  // reaches the peer no later than the frames queued with it. The stream
  // owns it until the kernel took it; closed if the stream closes first.
  void attach_fd(UniqueFd fd) { fds_out_.push_back(std::move(fd)); }

  // Unix sockets: read with recvmsg and append the fds that arrive to
  // `sink` (owned by the caller, outlives the reader). At most
  // max_queued_fds wait there; more are closed on arrival.
  void receive_fds_into(std::deque<UniqueFd>* sink) { fd_sink_ = sink; }
  static constexpr std::size_t max_queued_fds = 16;

  // Back-pressure against a peer that does not read its replies: while
  // more than `bytes` are queued, read_frames handles no more frames and
  // reads nothing (the peer's sends then block in the kernel). If the queue
  // stays above `bytes` for `stall_timeout`, read_frames ends with
  // errc::limit_exceeded. on_pause(true/false) reports each stop and resume.
  // 0 bytes (the default): no limit.
  void limit_outbound(std::size_t bytes, Duration stall_timeout, std::function<void(bool paused)> on_pause) {
    pacer_.limit_outbound(bytes, stall_timeout);
    on_pause_ = std::move(on_pause);
  }

  // Bound on what a frame still arriving may make the parser's buffer hold
  // (the server's --max-inbound-bytes across connections). After the
  // frames of each read are handled, `admit` is told the payload length of
  // the frame still incomplete at the front (0: none), before the buffer
  // grows to hold it. A failure ends read_frames with that Error (the
  // server's: errc::limit_exceeded). Unset (the default): no bound.
  void limit_inbound(std::function<Error(std::uint32_t pending_payload)> admit) {
    pacer_.limit_inbound(std::move(admit));
  }

  // Holds the connection's next frames while its owner finishes the current
  // request in slices (serving other connections in between): read_frames
  // handles and reads nothing until release_hold(). Frames keep their order.
  void hold() { pacer_.hold(); }
  void release_hold() {
    pacer_.release_hold();
    wake_reader();
  }
  bool held() const { return pacer_.held(); }

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
  // returns false to stop). Returns why the stream ended; an exception from
  // on_frame is rethrown here. The loop itself runs as plain completion
  // handlers (Reader) and the caller resumes once, at the end. A co_await
  // per read cost 13-14 % more instructions per PING on each side
  // (callgrind), enough to decide PERF.md's ping_rtt target.
  template <class OnFrame>
  asio::awaitable<Error> read_frames(OnFrame on_frame) {
    co_return co_await asio::async_initiate<const asio::use_awaitable_t<>&, void(std::exception_ptr, Error)>(
        [this](auto handler, OnFrame on_frame) {
          using R = Reader<OnFrame, decltype(handler)>;
          auto reader = std::make_unique<R>(*this, std::move(on_frame), std::move(handler));
          R* r = reader.get();
          r->step(std::move(reader));
        },
        asio::use_awaitable, std::move(on_frame));
  }

  void close() {
    fds_out_.clear();
    std::error_code ignored;
    socket_.shutdown(Socket::shutdown_both, ignored);
    socket_.close(ignored);
    if (drain_timer_) drain_timer_->cancel();  // wakes a reader paused by limit_outbound
  }

 private:
  // The read loop of read_frames. Each pending operation's handler owns the
  // Reader (`self`), so an io_context destroyed with a read pending frees it
  // and, with it, the caller's suspended coroutine.
  template <class OnFrame, class Handler>
  class Reader {
   public:
    using Ptr = std::unique_ptr<Reader>;
    Reader(FrameStream& s, OnFrame on_frame, Handler handler)
        : s_(s), on_frame_(std::move(on_frame)), handler_(std::move(handler)) {}

    // One pass: what the pacer says comes next.
    void step(Ptr self) {
      switch (s_.pacer_.next(s_.queued_bytes(), s_.fd_sink_ != nullptr)) {
        case ReadPacer::Next::wait_hold: return wait_hold(std::move(self));
        case ReadPacer::Next::pause: return start_pause(std::move(self));
        case ReadPacer::Next::handle_frames: return handle_frames(std::move(self));
        case ReadPacer::Next::read: {
          auto space = prepare();
          s_.socket_.async_read_some(asio::buffer(space.data(), space.size()),
                                     [self = std::move(self)](std::error_code ec, std::size_t n) mutable {
                                       Reader* r = self.get();
                                       r->on_read(std::move(self), ec, n);
                                     });
          return;
        }
        // recvmsg ourselves (Asio's reads have no control buffer, and the
        // kernel would close any fd that arrives).
        case ReadPacer::Next::receive: return receive(std::move(self), false);
        case ReadPacer::Next::wait_readable: return wait_readable(std::move(self));
      }
    }

   private:
    std::span<std::byte> prepare() {
      auto space = s_.parser_.prepare(s_.pacer_.read_size());
      space_size_ = space.size();
      return space;
    }

    void wait_readable(Ptr self) {
      s_.socket_.async_wait(Socket::wait_read, [self = std::move(self)](std::error_code ec) mutable {
        Reader* r = self.get();
        if (ec) return r->on_read(std::move(self), ec, 0);
        r->receive(std::move(self), true);
      });
    }

    void receive(Ptr self, bool waited) {
      auto space = prepare();
      std::error_code ec;
      const std::size_t n = s_.receive_some(space.data(), space.size(), ec);
      if (ec == std::errc::resource_unavailable_try_again || ec == std::errc::operation_would_block)
        return wait_readable(std::move(self));
      if (!ec && !waited) {
        // A read that found data at once lets other sessions run first, as
        // Asio's completion would (one busy client cannot starve the rest).
        asio::post(s_.socket_.get_executor(), [self = std::move(self), n]() mutable {
          Reader* r = self.get();
          r->on_read(std::move(self), {}, n);
        });
        return;
      }
      on_read(std::move(self), ec, n);
    }

    void on_read(Ptr self, std::error_code ec, std::size_t n) {
      if (ec) {
        if (ec == asio::error::eof)
          return finish(std::move(self), {errc::connection_lost, "peer closed the connection"});
        if (ec == asio::error::operation_aborted) return finish(std::move(self), ReadPacer::closed_locally());
        return finish(std::move(self), {errc::connection_lost, ec.message()});
      }
      s_.parser_.commit(n);
      s_.pacer_.on_read(n, space_size_);
      handle_frames(std::move(self));
    }

    // The frames of one read are one turn: what their handlers queue leaves
    // together when the turn ends (end_read_turn), as it would after a
    // posted flush.
    void handle_frames(Ptr self) {
      s_.pacer_.begin_turn();
      s_.in_read_turn_ = true;
      bool stopped = false;
      try {
        while (auto frame = s_.parser_.next()) {
          if (!on_frame_(*frame)) {
            stopped = true;
            break;
          }
          if (s_.pacer_.stop_turn(s_.queued_bytes())) break;
        }
      } catch (...) {
        s_.end_read_turn();
        return finish(std::move(self), {}, std::current_exception());
      }
      s_.end_read_turn();
      if (stopped) return finish(std::move(self), {errc::protocol_error, "stopped by the frame handler"});
      if (s_.parser_.failed()) {
        return finish(std::move(self), {s_.parser_.version_mismatch() ? make_error_code(errc::version_mismatch)
                                                                       : make_error_code(errc::protocol_error),
                                        s_.parser_.error()});
      }
      // The frames handled are gone: a large one's memory goes back now,
      // not at the next read (which may be long in coming).
      s_.parser_.shrink();
      if (s_.pacer_.checks_inbound()) {
        const auto pending = s_.parser_.peek();
        if (auto err = s_.pacer_.admit_inbound(pending ? pending->length : 0))
          return finish(std::move(self), std::move(err));
      }
      step(std::move(self));
    }

    // Held (hold()): waits for release_hold() or close.
    void wait_hold(Ptr self) {
      if (!s_.socket_.is_open()) return finish(std::move(self), ReadPacer::closed_locally());
      if (!s_.drain_timer_) s_.drain_timer_.emplace(s_.socket_.get_executor());
      s_.drain_timer_->expires_at(TimePoint::max());
      s_.drain_timer_->async_wait([self = std::move(self)](std::error_code) mutable {
        Reader* r = self.get();
        r->step(std::move(self));
      });
    }

    // Paused reading: waits until the queued replies drain to the limit;
    // ends the stream if they do not within the stall timeout.
    void start_pause(Ptr self) {
      if (!s_.drain_timer_) s_.drain_timer_.emplace(s_.socket_.get_executor());
      if (s_.on_pause_) s_.on_pause_(true);
      s_.pacer_.start_pause(Clock::now());
      check_pause(std::move(self));
    }

    void check_pause(Ptr self) {
      auto check = s_.pacer_.check_pause(s_.queued_bytes(), s_.socket_.is_open(), Clock::now());
      if (check.kind == ReadPacer::PauseCheck::wait) {
        s_.drain_timer_->expires_at(s_.pacer_.pause_deadline());
        // Cancelled by progress (wake_reader) or close: look again either way.
        s_.drain_timer_->async_wait([self = std::move(self)](std::error_code) mutable {
          Reader* r = self.get();
          r->check_pause(std::move(self));
        });
        return;
      }
      if (s_.on_pause_) s_.on_pause_(false);
      if (check.kind == ReadPacer::PauseCheck::end) return finish(std::move(self), std::move(check.error));
      step(std::move(self));
    }

    // Completes read_frames. Posted, never called inline: this may run
    // inside async_initiate, before the caller's coroutine has suspended.
    void finish(Ptr self, Error end, std::exception_ptr failure = nullptr) {
      auto ex = s_.socket_.get_executor();
      Handler handler = std::move(handler_);
      self.reset();
      asio::post(ex, [handler = std::move(handler), failure, end = std::move(end)]() mutable {
        std::move(handler)(failure, std::move(end));
      });
    }

    FrameStream& s_;
    OnFrame on_frame_;
    Handler handler_;
    std::size_t space_size_ = 0;  // of the last prepare(): what a read must fill to count as full
  };

  void flush(const std::shared_ptr<void>& owner) {
    flush_scheduled_ = false;
    if (send_failed_) out_.clear();
    if (writing_ || out_.empty() || !socket_.is_open()) return;
    // Try the kernel right away; only what does not fit waits for an async write.
    // Asio's non_blocking(true) is an ioctl(FIONBIO) every time; the flag
    // sticks, so set it once.
    std::error_code ec;
    if (!socket_.non_blocking()) socket_.non_blocking(true, ec);  // one ioctl per socket, not per flush
    std::size_t n = 0;
    if (!ec && !fds_out_.empty()) {
      n = send_with_fds(ec);
      if (ec == std::errc::resource_unavailable_try_again || ec == std::errc::operation_would_block) {
        // Nothing sent: retry the sendmsg (with the fds) once writable.
        writing_ = true;
        socket_.async_wait(Socket::wait_write, [this, owner](std::error_code wec) {
          writing_ = false;
          if (wec) return close();
          flush(owner);
        });
        return;
      }
    } else if (!ec) {
      n = socket_.write_some(asio::buffer(out_), ec);
    }
    if (ec && ec != asio::error::would_block && ec != asio::error::try_again) {
      stop_sending();
      return;
    }
    if (n == out_.size()) {
      out_.clear();
      wake_reader();
      return;
    }
    writing_ = true;
    writing_buf_.assign(out_.begin() + static_cast<std::ptrdiff_t>(n), out_.end());
    out_.clear();
    asio::async_write(socket_, asio::buffer(writing_buf_), [this, owner](std::error_code wec, std::size_t) {
      writing_ = false;
      writing_buf_.clear();
      if (wec) {
        stop_sending();
        return;
      }
      if (!out_.empty()) flush(owner);
      wake_reader();
    });
  }

  // recvmsg into [data, data + size), collecting SCM_RIGHTS fds into fd_sink_.
  std::size_t receive_some(std::byte* data, std::size_t size, std::error_code& ec) {
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_fds_per_message)];
    iovec iov{data, size};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t r;
    do {
      r = ::recvmsg(socket_.native_handle(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
      ec = std::error_code(errno, std::system_category());
      return 0;
    }
    ec.clear();
    if (msg.msg_controllen > 0) take_fds(msg);
    if (r == 0) ec = asio::error::eof;
    return static_cast<std::size_t>(r);
  }

  void take_fds(msghdr& msg) {
    if (msg.msg_flags & MSG_CTRUNC) log::warn("kvlink: more fds arrived with one message than accepted; extras closed");
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (std::size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        UniqueFd owned(fd);
        if (fd_sink_->size() >= max_queued_fds) {
          log::warn("kvlink: {} received fds are waiting for REGISTER_KV_CACHE; closing another", max_queued_fds);
          continue;
        }
        fd_sink_->push_back(std::move(owned));
      }
    }
  }

  // sendmsg of out_ with every fd of fds_out_ attached to its first byte.
  std::size_t send_with_fds(std::error_code& ec) {
    const std::size_t count = std::min(fds_out_.size(), max_fds_per_message);
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_fds_per_message)] = {};
    iovec iov{out_.data(), out_.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * count);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * count);
    for (std::size_t i = 0; i < count; ++i) {
      const int fd = fds_out_[i].get();
      std::memcpy(CMSG_DATA(c) + i * sizeof(int), &fd, sizeof fd);
    }
    ssize_t r;
    do {
      r = ::sendmsg(socket_.native_handle(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
      ec = std::error_code(errno, std::system_category());
      return 0;
    }
    ec.clear();
    // The kernel holds these now; more than one message's worth go with the
    // next flush (still no later than their frames' bytes).
    fds_out_.erase(fds_out_.begin(), fds_out_.begin() + static_cast<std::ptrdiff_t>(count));
    return static_cast<std::size_t>(r);
  }

  // A write failed: the peer closed or reset. Stop sending but keep the
  // read side, so what the peer sent before it went (a refused
  // connection's reason, say) still reaches the frame handler; the reader
  // then ends at the peer's EOF or reset. Closing here would throw those
  // frames away unread.
  void stop_sending() {
    send_failed_ = true;
    out_.clear();
    fds_out_.clear();
    std::error_code ignored;
    socket_.shutdown(Socket::shutdown_send, ignored);
    wake_reader();  // nothing is queued any more
  }

  // Written bytes left the queue: a reader paused by the outbound limit checks again.
  void wake_reader() {
    if (drain_timer_) drain_timer_->cancel();
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
  wire::Bytes out_;          // frames queued since the last flush
  wire::Bytes writing_buf_;  // frames the async write is sending
  bool writing_ = false;
  bool flush_scheduled_ = false;
  bool send_failed_ = false;  // a write failed: queue nothing more
  static constexpr std::size_t max_fds_per_message = 8;
  std::vector<UniqueFd> fds_out_;               // to send with the next flush
  std::deque<UniqueFd>* fd_sink_ = nullptr;     // where received fds go (null: plain reads)
  ReadPacer pacer_;                             // what the reader does next
  std::function<void(bool)> on_pause_;          // limit_outbound's
  std::optional<asio::steady_timer> drain_timer_;  // a paused or held reader waits on it; progress cancels it
};

}  // namespace kvlink::net
