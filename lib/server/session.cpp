#include "kvlink/server/session.hpp"

namespace kvlink::server {

void reply_error(ReplySink& sink, const wire::Header& req, std::error_code code, std::string_view message) {
  wire::ErrorReply err{to_wire(code), std::string(message)};
  wire::FrameBuilder(sink.buffer()).add(req.opcode, wire::flag::response | wire::flag::error, req.id,
                                        [&](wire::Writer& w) { wire::encode(w, err); });
  sink.flush();
}

void run_sliced(SessionState& session, ReplySink& sink, TimePoint now, UnfinishedWork work) {
  std::size_t budget = keys_per_slice;
  if (!work(sink, now, budget)) session.unfinished = std::move(work);
}

bool continue_work(SessionState& session, ReplySink& sink, TimePoint now) {
  if (!session.unfinished) return true;
  std::size_t budget = keys_per_slice;
  if (!session.unfinished(sink, now, budget)) return false;
  session.unfinished = nullptr;
  return true;
}

}  // namespace kvlink::server
