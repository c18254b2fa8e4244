// The decisions of FrameStream's read loop, without sockets or timers:
// how much to read, whether a recvmsg is worth trying before the socket is
// readable, when to stop handing over frames and reading (a hold while a
// request finishes in slices, a peer that does not read its replies), when
// such a pause has lasted too long, and when to ask the inbound bound.
// FrameStream's Reader asks, then makes the Asio call; time comes in as
// `now`, so the tests drive it with fake time. Everything on the path of
// every read is inline and allocates nothing: a PING's round trip is a
// product target.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"

namespace kvlink::net {

class ReadPacer {
 public:
  // Start with small reads so an idle connection holds little memory (the
  // parser's buffer is zero-filled, so its size is resident); grow while
  // reads come back full, up to max_read_size.
  static constexpr std::size_t initial_read_size = 2048;
  static constexpr std::size_t max_read_size = 64 * 1024;

  // What the read loop does next.
  enum class Next {
    wait_hold,      // held: wait for release_hold() (or close)
    pause,          // over the outbound limit: start_pause(), then check_pause() on each wake-up
    handle_frames,  // a hold or pause stopped a turn with frames parsed: hand those over first
    read,           // read up to read_size() bytes (Asio's read: it tries at once, then waits)
    receive,        // recvmsg at once: the last one filled its buffer, more is likely waiting
    wait_readable,  // recvmsg once readable: the last one came back short
  };

  // `queued`: bytes waiting to be sent. `recvmsg`: the loop reads with
  // recvmsg itself (fd passing) instead of Asio's reads.
  Next next(std::size_t queued, bool recvmsg) const noexcept {
    if (held_) return Next::wait_hold;
    if (over_limit(queued)) return Next::pause;
    if (frames_left_) return Next::handle_frames;
    if (!recvmsg) return Next::read;
    // Like Asio's reactor: a speculative read only when the last read
    // filled its buffer; after a short read, wait for readability first
    // instead of paying for a recvmsg that finds nothing.
    return maybe_more_ ? Next::receive : Next::wait_readable;
  }

  std::size_t read_size() const noexcept { return read_size_; }
  // A read returned `n` bytes into a buffer of `space`: a full one grows the
  // next read and makes a speculative recvmsg worth it.
  void on_read(std::size_t n, std::size_t space) noexcept {
    maybe_more_ = n == space;
    if (maybe_more_ && read_size_ < max_read_size) read_size_ *= 2;
  }

  // The frames of one read are one turn. After each frame handled: true if
  // the turn stops there (held, or over the outbound limit); the frames
  // still parsed wait (next() says handle_frames once the stop is over).
  void begin_turn() noexcept { frames_left_ = false; }
  bool stop_turn(std::size_t queued) noexcept {
    if (held_ || over_limit(queued)) frames_left_ = true;
    return frames_left_;
  }

  // Holds the next frames while their owner finishes a request in slices.
  // No deadline: the owner's sliced request always finishes.
  void hold() noexcept { held_ = true; }
  void release_hold() noexcept { held_ = false; }
  bool held() const noexcept { return held_; }

  // Back-pressure against a peer that does not read its replies: more than
  // `bytes` queued pauses reading; `stall_timeout` of that ends the stream.
  // 0 bytes: no limit.
  void limit_outbound(std::size_t bytes, Duration stall_timeout) noexcept {
    outbound_limit_ = bytes;
    stall_timeout_ = stall_timeout;
  }
  bool over_limit(std::size_t queued) const noexcept { return outbound_limit_ > 0 && queued > outbound_limit_; }

  // Reading paused at `now` (next() said pause).
  void start_pause(TimePoint now) noexcept { pause_deadline_ = now + stall_timeout_; }
  TimePoint pause_deadline() const noexcept { return pause_deadline_; }
  // On each wake-up of a pause (progress, close, or the deadline): resume
  // once the queue is down to the limit; wait on while it is above and
  // time is left; end (with why) if the socket closed or the deadline came.
  struct PauseCheck {
    enum Kind { resume, wait, end } kind;
    Error error;  // end: why
  };
  PauseCheck check_pause(std::size_t queued, bool open, TimePoint now) const;
  // How a stream closed on this side ends.
  static Error closed_locally() { return {errc::connection_lost, "connection closed locally"}; }

  // Bound on what a frame still arriving may make the buffer hold:
  // `admit(pending_payload)` says whether it may (a failure ends the stream
  // with it). Asked after the frames of a read are handled, unless a stop
  // left some (the frame at the front is then a whole one).
  void limit_inbound(std::function<Error(std::uint32_t pending_payload)> admit) { admit_ = std::move(admit); }
  bool checks_inbound() const noexcept { return admit_ && !frames_left_; }
  Error admit_inbound(std::uint32_t pending_payload) const { return admit_(pending_payload); }

 private:
  std::size_t read_size_ = initial_read_size;
  bool maybe_more_ = false;   // the last read filled its buffer
  bool held_ = false;
  bool frames_left_ = false;  // a stop ended a turn with frames still parsed
  std::size_t outbound_limit_ = 0;
  Duration stall_timeout_{};
  TimePoint pause_deadline_{};
  std::function<Error(std::uint32_t)> admit_;  // empty: no bound
};

}  // namespace kvlink::net
