#include "kvlink/net/connection.hpp"

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/experimental/parallel_group.hpp>
#include <asio/ip/tcp.hpp>
#include <algorithm>
#include <sys/random.h>

#include <cerrno>
#include <system_error>

#include "frame_stream.hpp"

namespace kvlink::net {

namespace {
// Min-heap order for the deadline vector.
constexpr auto later_first = [](const auto& a, const auto& b) { return a.first > b.first; };
}  // namespace

std::shared_ptr<Connection> Connection::start(Socket socket, std::uint32_t max_payload) {
  std::shared_ptr<Connection> self(new Connection(std::move(socket), max_payload));
  asio::co_spawn(self->executor_, [self]() { return self->read_loop(); }, asio::detached);
  return self;
}

Connection::Connection(Socket socket, std::uint32_t max_payload)
    : executor_(socket.get_executor()),
      stream_(std::make_unique<FrameStream>(std::move(socket), max_payload)),
      deadline_timer_(executor_) {
  std::error_code ec;
  const auto local = stream_->socket().local_endpoint(ec);
  is_unix_ = !ec && local.protocol().family() == AF_UNIX;
}

Connection::~Connection() = default;

void Connection::close() {
  asio::dispatch(executor_, [self = shared_from_this()] { self->stream_->close(); });
}

void Connection::set_limits(std::uint32_t max_payload, std::uint32_t max_in_flight) {
  stream_->parser().set_max_payload(std::max(max_payload, wire::min_max_payload));
  max_in_flight_ = std::max<std::uint32_t>(max_in_flight, 1);
}

asio::awaitable<void> Connection::read_loop() {
  auto self = shared_from_this();  // alive until the reader ends
  Error end = co_await stream_->read_frames([this](const wire::Frame& f) { return on_frame(f); });
  stream_->close();
  fail_all(end);
}

std::size_t Connection::queued_bytes() const { return stream_->queued_bytes(); }

void Connection::send_frame(std::uint8_t opcode, std::uint16_t flags, std::uint64_t id, EncodeFn encode,
                            const void* request) {
  stream_->send(opcode, flags, id, [&](wire::Writer& w) { encode(w, request); }, shared_from_this());
}

void Connection::attach_fd(UniqueFd fd) { stream_->attach_fd(std::move(fd)); }

bool Connection::on_frame(const wire::Frame& frame) {
  const wire::Header& h = frame.header;
  if (!h.is_response() && h.opcode == static_cast<std::uint8_t>(wire::Opcode::server_notice) && h.is_one_way()) {
    wire::ServerNotice notice;
    if (Error err = wire::decode(frame.payload, notice, "server notice")) {
      log::warn("kvlink: malformed SERVER_NOTICE ignored: {}", err.message());
      return true;
    }
    if (on_notice_) on_notice_(notice);
    return true;
  }
  if (!h.is_response()) {
    log::warn("kvlink: server sent a request ({}) on a client connection; closing it", wire::opcode_name(h.opcode));
    return false;
  }
  auto it = pending_.find(h.id);
  if (it == pending_.end()) {
    wire::ErrorReply err;
    if (h.is_error() && h.id == 0 && !wire::decode(frame.payload, err, "error reply")) {
      // A connection-level error (a refused connection, bytes the server
      // could not parse): it closes next, and the calls then failing with
      // connection_lost say why through last_error_message().
      log::debug("kvlink: server error on the connection: {}", err.message);
      last_error_message_ = std::move(err.message);
      return true;
    }
    ++stats_.late_replies;  // its deadline passed or it was cancelled
    return true;
  }
  auto call = std::move(it->second);
  pending_.erase(it);
  ++stats_.replies;
  if (h.is_error()) {
    ++stats_.error_replies;
    wire::ErrorReply err;
    if (Error malformed = wire::decode(frame.payload, err, "error reply")) {
      log::warn("kvlink: malformed error reply to {}: {}", wire::opcode_name(h.opcode), malformed.message());
      call->complete(errc::protocol_error, {});
    } else {
      log::debug("kvlink: server rejected {} #{}: {}", wire::opcode_name(h.opcode), h.id, err.message);
      last_error_message_ = std::move(err.message);
      call->complete(from_wire(err.code), {});
    }
  } else {
    call->complete({}, frame.payload);
  }
  return true;
}

void Connection::cancel_call(std::uint64_t id) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;
  auto call = std::move(it->second);
  pending_.erase(it);
  ++stats_.cancelled;
  call->complete(asio::error::operation_aborted, {});
}

void Connection::arm_deadline(Clock::time_point deadline, std::uint64_t id) {
  deadlines_.emplace_back(deadline, id);
  std::push_heap(deadlines_.begin(), deadlines_.end(), later_first);
  // Drop answered calls once they dominate, so the heap stays O(pending).
  if (deadlines_.size() > 1024 && deadlines_.size() > 4 * pending_.size()) {
    std::erase_if(deadlines_, [this](const auto& d) { return !pending_.contains(d.second); });
    std::make_heap(deadlines_.begin(), deadlines_.end(), later_first);
  }
  rearm_deadline_timer();
}

void Connection::rearm_deadline_timer() {
  if (deadlines_.empty() || closed_) return;
  const Clock::time_point next = deadlines_.front().first;
  if (next >= timer_armed_for_) return;  // the timer fires earlier anyway
  timer_armed_for_ = next;
  deadline_timer_.expires_at(next);
  deadline_timer_.async_wait([self = shared_from_this()](std::error_code ec) {
    if (ec != asio::error::operation_aborted) self->on_deadline_timer();
  });
}

void Connection::on_deadline_timer() {
  timer_armed_for_ = Clock::time_point::max();
  const auto now = Clock::now();
  while (!deadlines_.empty() && deadlines_.front().first <= now) {
    const std::uint64_t id = deadlines_.front().second;
    std::pop_heap(deadlines_.begin(), deadlines_.end(), later_first);
    deadlines_.pop_back();
    auto it = pending_.find(id);
    if (it == pending_.end()) continue;  // answered already
    auto call = std::move(it->second);
    pending_.erase(it);
    ++stats_.timeouts;
    call->complete(errc::timed_out, {});
  }
  rearm_deadline_timer();
}

void Connection::fail_all(const Error& end) {
  if (closed_) return;
  closed_ = true;
  deadline_timer_.cancel();
  deadlines_.clear();
  auto pending = std::move(pending_);
  pending_.clear();
  for (auto& [id, call] : pending) call->complete(errc::connection_lost, {});
  if (on_close_) {
    auto handler = std::move(on_close_);
    handler(end);
  }
}

asio::awaitable<ConnectResult> connect(asio::any_io_executor ex, Endpoint endpoint, wire::HelloRequest hello,
                                       Clock::duration timeout) {
  using asio::experimental::deferred;
  ConnectResult result;
  const auto deadline = Clock::now() + timeout;
  Protocol::endpoint asio_ep;
  try {
    asio_ep = endpoint.asio_endpoint();
  } catch (const std::system_error& e) {
    result.error = Error(errc::bad_request, fmt::format("{}: {}", endpoint.to_string(), e.what()));
    co_return result;
  }

  Socket socket(ex);
  asio::steady_timer timer(ex, deadline);
  auto [order, connect_ec, timer_ec] =
      co_await asio::experimental::make_parallel_group(socket.async_connect(asio_ep, deferred), timer.async_wait(deferred))
          .async_wait(asio::experimental::wait_for_one(), asio::use_awaitable);
  (void)timer_ec;
  if (order[0] != 0) {
    result.error = Error(errc::timed_out, fmt::format("connecting to {} timed out", endpoint.to_string()));
    co_return result;
  }
  if (connect_ec) {
    result.error = Error(errc::not_connected, fmt::format("cannot connect to {}: {} (is kvlink-server running there?)",
                                                         endpoint.to_string(), connect_ec.message()));
    co_return result;
  }
  if (!endpoint.is_unix()) {
    std::error_code ignored;
    socket.set_option(asio::ip::tcp::no_delay(true), ignored);
  }

  auto conn = Connection::start(std::move(socket));
  const auto left = std::max(deadline - Clock::now(), Clock::duration::zero());
  auto [ec, reply] = co_await conn->async_call(hello, left, asio::experimental::as_tuple(asio::use_awaitable));
  if (ec) {
    conn->close();
    result.error = Error(ec, fmt::format("HELLO to {} failed: {}", endpoint.to_string(),
                                         conn->last_error_message().empty() ? ec.message() : conn->last_error_message()));
    co_return result;
  }
  conn->set_limits(reply.max_payload, reply.max_in_flight);
  result.connection = std::move(conn);
  result.hello = std::move(reply);
  co_return result;
}

// Straight from the kernel at every draw: no generator state that a fork()
// would copy into the child, so parent and children never share an id.
std::uint64_t random_instance_id() {
  std::uint64_t id = 0;
  while (id == 0) {
    std::uint64_t raw = 0;
    if (::getrandom(&raw, sizeof raw, 0) != static_cast<ssize_t>(sizeof raw))
      throw std::system_error(errno, std::generic_category(), "getrandom for an instance id");
    id = raw >> 1;
  }
  return id;
}

std::string random_instance_secret() {
  std::string secret(wire::min_instance_secret, '\0');
  if (::getrandom(secret.data(), secret.size(), 0) != static_cast<ssize_t>(secret.size()))
    throw std::system_error(errno, std::generic_category(), "getrandom for an instance secret");
  return secret;
}

}  // namespace kvlink::net
