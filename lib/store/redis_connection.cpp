#include "store/redis_connection.hpp"

#include <hiredis/hiredis.h>

#include <asio/connect.hpp>
#include <asio/dispatch.hpp>
#include <asio/post.hpp>
#include <asio/write.hpp>
#include <fmt/format.h>

namespace kvlink::store {

// ---- RedisValue -------------------------------------------------------------------

RedisValue::Type RedisValue::type() const {
  if (!r_) return Type::none;
  switch (r_->type) {
    case REDIS_REPLY_STRING: return Type::string;
    case REDIS_REPLY_ARRAY: return Type::array;
    case REDIS_REPLY_INTEGER: return Type::integer;
    case REDIS_REPLY_NIL: return Type::nil;
    case REDIS_REPLY_STATUS: return Type::status;
    case REDIS_REPLY_ERROR: return Type::error;
    default: return Type::none;
  }
}

std::string_view RedisValue::str() const {
  const Type t = type();
  if (t != Type::string && t != Type::status && t != Type::error) return {};
  return {r_->str, r_->len};
}

std::span<const std::byte> RedisValue::bytes() const {
  const auto s = str();
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

long long RedisValue::integer() const { return type() == Type::integer ? r_->integer : 0; }
std::size_t RedisValue::size() const { return type() == Type::array ? r_->elements : 0; }
RedisValue RedisValue::operator[](std::size_t i) const { return i < size() ? RedisValue(r_->element[i]) : RedisValue(); }

// ---- RedisConnection --------------------------------------------------------------

RedisConnection::RedisConnection(asio::any_io_executor ex, ClusterNode node)
    : ex_(ex), node_(std::move(node)), socket_(ex), timer_(ex), reader_(redisReaderCreate()) {
  if (!reader_) throw std::bad_alloc();
}

RedisConnection::~RedisConnection() { redisReaderFree(reader_); }

void RedisConnection::connect(asio::any_io_executor ex, const ClusterNode& node, std::string password,
                              Duration timeout, Connected done) {
  std::shared_ptr<RedisConnection> c(new RedisConnection(ex, node));
  // One deadline for the whole connect (and AUTH): it closes the socket,
  // which ends whatever step is running with an error.
  auto timer = std::make_shared<asio::steady_timer>(ex, timeout);
  auto finished = std::make_shared<bool>(false);
  auto finish = [timer, finished, done = std::move(done)](Result<std::shared_ptr<RedisConnection>> r) {
    if (*finished) return;
    *finished = true;
    timer->cancel();
    done(std::move(r));
  };
  timer->async_wait([c, finished](std::error_code ec) {
    if (!ec && !*finished) c->close();
  });
  auto resolver = std::make_shared<asio::ip::tcp::resolver>(ex);
  const std::string what = to_string(node);
  resolver->async_resolve(
      node.host, std::to_string(node.port),
      [c, resolver, password = std::move(password), finish, what, timeout](
          std::error_code ec, asio::ip::tcp::resolver::results_type results) mutable {
        if (ec)
          return finish(Error(errc::not_connected, fmt::format("redis node {}: cannot resolve: {}", what, ec.message())));
        asio::async_connect(c->socket_, results, [c, password = std::move(password), finish, what, timeout](
                                                     std::error_code ec2, const asio::ip::tcp::endpoint&) mutable {
          if (ec2 || !c->open_)
            return finish(Error(errc::not_connected,
                                fmt::format("redis node {}: cannot connect: {}", what,
                                            c->open_ ? ec2.message() : std::string("timed out"))));
          c->socket_.set_option(asio::ip::tcp::no_delay(true));
          c->start_reading();
          if (password.empty()) return finish(c);
          c->send({"AUTH", password}, timeout, [c, finish, what](const Error& err, RedisValue v) mutable {
            if (err) return finish(Error(err.code(), fmt::format("redis node {}: AUTH: {}", what, err.message())));
            if (v.is_error()) {
              c->close();
              return finish(Error(errc::unauthorized,
                                  fmt::format("redis node {} refused the password: {}; check the token file or "
                                              "environment variable given for the cluster",
                                              what, v.str())));
            }
            finish(c);
          });
        });
      });
}

void RedisConnection::FreeCommand::operator()(char* cmd) const { redisFreeCommand(cmd); }

void RedisConnection::send(std::span<const std::string_view> args, Duration deadline, Done done) {
  if (!open_) {
    asio::post(ex_, [done = std::move(done)] {
      done(Error(errc::not_connected, "the redis connection is closed"), RedisValue());
    });
    return;
  }
  std::vector<const char*> argv(args.size());
  std::vector<std::size_t> lens(args.size());
  for (std::size_t i = 0; i < args.size(); ++i) {
    argv[i] = args[i].data();
    lens[i] = args[i].size();
  }
  char* cmd = nullptr;
  const int n = redisFormatCommandArgv(&cmd, static_cast<int>(args.size()), argv.data(), lens.data());
  if (n < 0 || !cmd) throw std::bad_alloc();
  out_.push_back({std::unique_ptr<char, FreeCommand>(cmd), static_cast<std::size_t>(n)});
  out_bytes_ += static_cast<std::size_t>(n);
  pending_.push_back({Clock::now() + deadline, std::move(done), static_cast<std::size_t>(n)});
  arm_timer();
  flush();
}

void RedisConnection::flush() {
  if (writing_ || out_.empty() || !open_) return;
  std::vector<asio::const_buffer> buffers;
  while (!out_.empty() &&
         (unanswered_bytes_ == 0 || unanswered_bytes_ + out_.front().size <= pipeline_window_bytes)) {
    Formatted f = std::move(out_.front());
    out_.pop_front();
    out_bytes_ -= f.size;
    sending_bytes_ += f.size;
    unanswered_bytes_ += f.size;
    buffers.emplace_back(f.bytes.get(), f.size);
    sending_.push_back(std::move(f));
  }
  if (buffers.empty()) return;  // the window is full: a reply makes room
  writing_ = true;
  asio::async_write(socket_, buffers, [self = shared_from_this()](std::error_code ec, std::size_t) {
    self->writing_ = false;
    self->sending_.clear();
    self->sending_bytes_ = 0;
    if (ec) return self->fail_all(Error(errc::not_connected, fmt::format("redis node {}: write failed: {}",
                                                                          to_string(self->node_), ec.message())));
    self->flush();
  });
}

void RedisConnection::start_reading() {
  socket_.async_read_some(asio::buffer(in_), [self = shared_from_this()](std::error_code ec, std::size_t n) {
    if (ec || !self->open_)
      return self->fail_all(Error(errc::not_connected,
                                  fmt::format("redis node {}: connection lost: {}", to_string(self->node_),
                                              ec ? ec.message() : std::string("closed"))));
    if (redisReaderFeed(self->reader_, self->in_.data(), n) != REDIS_OK)
      return self->fail_all(Error(errc::protocol_error, fmt::format("redis node {}: {}", to_string(self->node_),
                                                                     self->reader_->errstr)));
    for (;;) {
      void* raw = nullptr;
      if (redisReaderGetReply(self->reader_, &raw) != REDIS_OK)
        return self->fail_all(Error(errc::protocol_error, fmt::format("redis node {}: unreadable reply: {}",
                                                                       to_string(self->node_), self->reader_->errstr)));
      if (!raw) break;
      std::unique_ptr<redisReply, void (*)(void*)> reply(static_cast<redisReply*>(raw), freeReplyObject);
      if (self->pending_.empty())
        return self->fail_all(Error(errc::protocol_error, fmt::format("redis node {}: a reply nobody asked for",
                                                                       to_string(self->node_))));
      Pending p = std::move(self->pending_.front());
      self->pending_.pop_front();
      self->unanswered_bytes_ -= p.bytes;
      self->complete(p, {}, RedisValue(reply.get()));
      if (!self->open_) return;
    }
    self->arm_timer();
    self->flush();  // replies made room in the pipeline window
    self->start_reading();
  });
}

void RedisConnection::complete(Pending& p, const Error& error, RedisValue value) {
  if (!p.done) return;  // timed out already
  Done done = std::move(p.done);
  p.done = nullptr;
  done(error, value);
}

void RedisConnection::arm_timer() {
  // The earliest deadline of a command still waiting for its answer.
  TimePoint next = TimePoint::max();
  for (const auto& p : pending_)
    if (p.done) next = std::min(next, p.deadline);
  if (next == timer_at_) return;
  timer_at_ = next;
  if (next == TimePoint::max()) {
    timer_.cancel();
    return;
  }
  timer_.expires_at(next);
  timer_.async_wait([weak = weak_from_this(), at = next](std::error_code ec) {
    auto self = weak.lock();
    if (ec || !self || self->timer_at_ != at) return;
    self->timer_at_ = TimePoint::max();
    self->on_timer();
  });
}

void RedisConnection::on_timer() {
  const TimePoint now = Clock::now();
  for (auto& p : pending_)
    if (p.done && p.deadline <= now)
      complete(p, Error(errc::timed_out, fmt::format("redis node {} did not answer in time", to_string(node_))),
               RedisValue());
  arm_timer();
}

void RedisConnection::fail_all(const Error& error) {
  close();
  auto pending = std::move(pending_);
  pending_.clear();
  for (auto& p : pending) complete(p, error, RedisValue());
}

void RedisConnection::close() {
  if (!open_) return;
  open_ = false;
  std::error_code ignored;
  socket_.shutdown(asio::ip::tcp::socket::shutdown_both, ignored);
  socket_.close(ignored);
  timer_.cancel();
  timer_at_ = TimePoint::max();
  // The read handler sees the close and fails what is pending.
  auto self = shared_from_this();
  asio::post(ex_, [self] {
    auto pending = std::move(self->pending_);
    self->pending_.clear();
    for (auto& p : pending)
      self->complete(p, Error(errc::not_connected, fmt::format("redis node {}: closed", to_string(self->node_))),
                     RedisValue());
  });
}

}  // namespace kvlink::store
