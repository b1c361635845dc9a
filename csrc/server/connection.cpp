#include "server/connection.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include "server/request.h"
#include "server/session.h"

namespace membrain::server {

using proto::Op;
using proto::Status;

namespace {
constexpr int kMaxIov = 256;
constexpr std::size_t kReadBudget = 32 << 20;     // per readiness event, for fairness between connections
constexpr std::size_t kDirectRecvMin = 16 << 10;  // smaller values go through the buffer, several per recv
// Read-ahead past a frame header, before its table says where large values begin: room for a
// few pipelined small requests in one recv, while a PUT frame's first value loses at most this.
constexpr std::size_t kHeaderReadAhead = 4 << 10;

}  // namespace

Connection::Connection(UniqueFd fd, ServerContext& ctx, int64_t now_ns)
    : fd_(std::move(fd)),
      ctx_(ctx),
      limits_(ctx.config.limits),
      authed_(!ctx.config.auth_enabled()),
      in_(new uint8_t[kInputBufferBytes]),  // not value-initialised: see kInputBufferBytes
      last_activity_ns_(now_ns),
      accepted_ns_(now_ns) {}

Connection::~Connection() {
  release_pending();
  ctx_.counters.connections_current.fetch_sub(1, std::memory_order_relaxed);
}

bool Connection::can_consume() const {
  if (closing_ || peer_eof_ || done_ || phase_ == Phase::kLinger) return false;
  if (out_bytes_ >= ctx_.config.output_backlog_bytes) return false;
  if (draining_ && phase_ == Phase::kHeader) return false;  // finish started frames only
  return true;
}

bool Connection::wants_read() const {
  if (done_) return false;
  if (phase_ == Phase::kLinger) return true;
  return can_consume() && !waiting_budget_;
}

void Connection::compact() {
  if (in_r_ == 0) return;
  const std::size_t n = buffered();
  if (n) std::memmove(in_.get(), in_.get() + in_r_, n);
  in_r_ = 0;
  in_w_ = n;
}

void Connection::on_readable(int64_t now) {
  if (phase_ == Phase::kLinger) {
    // Discard whatever the peer still sends until it closes, so our close does not turn into
    // an RST that could destroy the error reply before the peer reads it.
    uint8_t sink[16 << 10];
    for (;;) {
      ssize_t n = ::recv(fd_.get(), sink, sizeof sink, 0);
      if (n > 0) continue;
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      close_now();
      return;
    }
  }
  woke_readable_ = true;
  pump(now);
  woke_readable_ = false;
  if (!done_ && !out_.empty()) flush(now);
}

void Connection::on_writable(int64_t now) {
  flush(now);
  // Buffered requests do not raise EPOLLIN again: resume them now that the backlog shrank.
  if (!done_ && can_consume()) pump(now);
  if (!done_ && !out_.empty()) flush(now);
}

void Connection::begin_drain() {
  draining_ = true;
  if (phase_ == Phase::kHeader && out_.empty()) close_now();
}

void Connection::pump(int64_t now) {
  std::size_t budget = kReadBudget;
  while (can_consume()) {
    const Step s = step();
    if (s == Step::kProgress) continue;
    if (s == Step::kStop || s == Step::kWait) break;
    if (budget == 0) break;
    // Need bytes from the socket. Large PUT values are received in place (receive_in_place()).
    ssize_t n;
    const bool direct = phase_ == Phase::kPutValue && pending() && buffered() == 0 && receive_in_place();
    if (direct) {
      const uint64_t want = std::min<uint64_t>(put_.items()[item_].value_len - value_have_, budget);
      n = ::recv(fd_.get(), pending()->data() + value_have_, want, 0);
      if (n > 0) {
        value_have_ += static_cast<uint64_t>(n);
        account_received();
      }
    } else {
      if (in_w_ == kInputBufferBytes) compact();
      n = ::recv(fd_.get(), in_.get() + in_w_, std::min(kInputBufferBytes - in_w_, buffered_read_limit()), 0);
      if (n > 0) in_w_ += static_cast<std::size_t>(n);
    }
    if (n > 0) {
      Counters::inc(ctx_.counters.bytes_in, static_cast<uint64_t>(n));
      last_activity_ns_ = now;
      budget -= std::min<std::size_t>(budget, static_cast<std::size_t>(n));
      continue;
    }
    if (n == 0) {
      // Peer closed its side. Replies already queued are still sent (it may be half-closed).
      peer_eof_ = true;
      if (out_.empty()) close_now();
      break;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    close_now();
    return;
  }
  // Slow-frame deadline: starts at the first byte of a frame, ends when it is processed.
  if (phase_ == Phase::kHeader && buffered() == 0)
    frame_since_ns_ = 0;
  else if (frame_since_ns_ == 0)
    frame_since_ns_ = now;
  if (draining_ && phase_ == Phase::kHeader && out_.empty()) close_now();
}

// Bytes of a large PUT value that land in the input buffer are copied a second time, into
// their slot: reading the whole 64 KiB buffer after each frame header sent 1 in 16 bytes of a
// 1 MiB-value PUT stream through memcpy. Reads into the buffer therefore never cross into a
// value of kDirectRecvMin or more whose place in the stream is known (the frame's table has
// been read), and read only kHeaderReadAhead past a frame header, where nothing is known yet.
// Elsewhere - inside request payloads, and after a frame that ends in small values - they read
// as far as the buffer allows, so pipelined small requests still come many per recv().

bool Connection::frame_ends_in_small_values() const {
  // ...and no large value lies between the current one and the end of the frame.
  return small_tail_begin_ < put_.items().size() && item_ + 1 >= small_tail_begin_;
}

std::size_t Connection::value_read_limit() const {
  const uint64_t rest = put_.items()[item_].value_len - value_have_ + small_run_bytes_[item_ + 1];
  const uint64_t ahead = frame_ends_in_small_values() ? kInputBufferBytes : 0;
  return static_cast<std::size_t>(std::min<uint64_t>(rest + ahead, kInputBufferBytes));
}

bool Connection::receive_in_place() const {
  // A large value always (even its last few bytes: one recv either way, no copy); a small one
  // when a buffered read would stop at its end anyway.
  return put_.items()[item_].value_len >= kDirectRecvMin ||
         value_read_limit() <= put_.items()[item_].value_len - value_have_;
}

std::size_t Connection::buffered_read_limit() const {
  std::size_t limit = kInputBufferBytes;
  switch (phase_) {
    case Phase::kHeader:
      limit = kHeaderReadAhead;
      break;
    case Phase::kPutTable:
    case Phase::kPutKeys:  // exactly the table, then exactly the keys: values follow them
      limit = payload_need_ - payload_have_;
      break;
    case Phase::kPutValue:
      limit = value_read_limit();
      break;
    default:  // the rest of a request payload (no values in it) and what follows
      break;
  }
  return std::max<std::size_t>(limit, 1);
}

Connection::Step Connection::step() {
  switch (phase_) {
    case Phase::kHeader:
      return step_header();
    case Phase::kPayload:
    case Phase::kPutTable:
    case Phase::kPutKeys: {
      const Step s = fill_payload();
      if (s != Step::kProgress) return s;
      if (phase_ == Phase::kPutTable)
        finish_put_table();
      else if (phase_ == Phase::kPutKeys) {
        item_ = 0;
        value_started_ = false;
        phase_ = Phase::kPutValue;
      } else
        execute();
      return Step::kProgress;
    }
    case Phase::kPutValue:
      return step_put_value();
    case Phase::kLinger:
      return Step::kStop;
  }
  return Step::kStop;
}

Connection::Step Connection::step_header() {
  if (buffered() < proto::kHeaderBytes) {
    if (in_r_ + proto::kHeaderBytes > kInputBufferBytes) compact();
    return Step::kNeedBytes;
  }
  const uint8_t* h = in_.get() + in_r_;
  const proto::HeaderError err = proto::decode_header(h, &hdr_);
  in_r_ += proto::kHeaderBytes;
  frame_since_ns_ = frame_since_ns_ ? frame_since_ns_ : last_activity_ns_;
  if (err != proto::HeaderError::kNone) {
    if (err == proto::HeaderError::kBadMagic) {
      hdr_ = proto::Header{};  // nothing in it can be trusted, not even the request id
    } else {
      hdr_.request_id = proto::get_u64(h + 8);
      hdr_.opcode = h[5];
    }
    protocol_error(err == proto::HeaderError::kBadVersion ? Status::kUnsupportedVersion : Status::kBadRequest,
                   proto::header_error_name(err));
    return Step::kStop;
  }
  start_frame();
  return closing_ ? Step::kStop : Step::kProgress;
}

void Connection::start_frame() {
  const Status st = check_request_frame(ctx_, hdr_, authed_);  // opcode, auth, per-op limits
  if (st != Status::kOk) return protocol_error(st, "frame refused");
  if (hdr_.opcode == static_cast<uint8_t>(Op::kPut)) {
    payload_.resize(std::size_t{hdr_.count} * proto::kPutItemBytes);
    payload_have_ = 0;
    payload_need_ = payload_.size();
    phase_ = Phase::kPutTable;
    return;
  }
  payload_.resize(hdr_.payload_len);  // bounded by check_request_frame: a key list or a few KiB
  payload_have_ = 0;
  payload_need_ = hdr_.payload_len;
  phase_ = Phase::kPayload;
}

Connection::Step Connection::fill_payload() {
  const std::size_t want = payload_need_ - payload_have_;
  const std::size_t n = std::min(want, buffered());
  if (n) {
    std::memcpy(payload_.data() + payload_have_, in_.get() + in_r_, n);
    payload_have_ += n;
    in_r_ += n;
  }
  return payload_have_ == payload_need_ ? Step::kProgress : Step::kNeedBytes;
}

void Connection::finish_put_table() {
  // Everything is validated before any storage is reserved (server/session.h).
  const std::size_t table = std::size_t{hdr_.count} * proto::kPutItemBytes;
  const Status st = put_.parse(hdr_, payload_.data(), table, limits_);
  if (st != Status::kOk) return protocol_error(st, "PUT table refused");
  const auto& items = put_.items();
  small_run_bytes_.assign(items.size() + 1, 0);
  small_tail_begin_ = items.size();
  for (std::size_t i = items.size(); i-- > 0;) {
    const bool small = items[i].value_len < kDirectRecvMin;
    small_run_bytes_[i] = small ? items[i].value_len + small_run_bytes_[i + 1] : 0;
    if (small && small_tail_begin_ == i + 1) small_tail_begin_ = i;
  }
  payload_.resize(table + put_.keys_bytes());
  payload_need_ = payload_.size();
  phase_ = Phase::kPutKeys;
}

// Nothing is evicted for bytes that have not arrived. A value is first offered free space
// (no eviction) within the pending-bytes budget; failing that, it waits until its bytes have
// landed - all of a small value in the input buffer, or as much of a large one as the socket
// can hold (a quarter of SO_RCVBUF) in the kernel's receive queue, woken by SO_RCVLOWAT - and
// only then may storage evict for it. What is reserved but not yet received counts against
// --max-pending-put-bytes(-per-connection); a value that can never fit that budget is
// NO_SPACE (drained), one that could later waits for it.
Connection::Step Connection::reserve_value() {
  PutItem& it = put_.items()[item_];
  const uint64_t rest = it.value_len - value_have_;
  const uint64_t in_buf = std::min<uint64_t>(buffered(), rest);
  if (!tried_free_space_) {
    tried_free_space_ = true;
    if (admit_pending(rest - in_buf)) {
      if (put_.reserve(ctx_, ns_, item_, payload_.data(), /*may_evict=*/false)) {
        pending_unreceived_ = rest - in_buf;
        return Step::kProgress;
      }
      ctx_.counters.pending_put_bytes.fetch_sub(rest - in_buf, std::memory_order_relaxed);
    }
  }
  uint64_t landed = in_buf;
  if (it.value_len < kDirectRecvMin) {
    // Small: it fits the input buffer, so wait there for all of it.
    if (landed < rest) return Step::kNeedBytes;
  } else if (landed < rest) {
    int queued = 0;
    if (::ioctl(fd_.get(), FIONREAD, &queued) == 0 && queued > 0) landed += static_cast<uint64_t>(queued);
    int rcvbuf = 0;
    socklen_t sl = sizeof rcvbuf;
    ::getsockopt(fd_.get(), SOL_SOCKET, SO_RCVBUF, &rcvbuf, &sl);
    const uint64_t window = std::max<uint64_t>(4096, static_cast<uint64_t>(std::max(rcvbuf, 0)) / 4);
    const uint64_t need = std::min(rest, window);
    // Woken by EPOLLIN while SO_RCVLOWAT was set: the kernel found the queue at the low-water
    // mark or its window (nearly) closed - either way, all that can land now has.
    const bool full = woke_readable_ && rcvlowat_ > 1 && landed > in_buf;
    if (landed < need && !full) {
      if (peer_closed()) {  // the rest can never arrive (its FIN raises EPOLLIN, which would spin)
        peer_eof_ = true;
        if (out_.empty()) close_now();
        return Step::kStop;
      }
      if (rcvlowat_ == 1) Counters::inc(ctx_.counters.put_land_waits);
      set_rcvlowat(static_cast<int>(need - in_buf));
      return Step::kWait;
    }
    landed = std::min(landed, rest);
  }
  set_rcvlowat(1);
  const uint64_t unlanded = rest - landed;
  if (!admit_pending(unlanded)) {
    if (unlanded > ctx_.config.max_pending_put_bytes_per_connection ||
        unlanded > ctx_.config.max_pending_put_bytes) {
      put_.refuse(ctx_, item_);  // can never fit the budget: drained
      return Step::kProgress;
    }
    waiting_budget_ = true;  // others hold the budget: retried on the timer
    return Step::kWait;
  }
  waiting_budget_ = false;
  if (!put_.reserve(ctx_, ns_, item_, payload_.data())) {
    ctx_.counters.pending_put_bytes.fetch_sub(unlanded, std::memory_order_relaxed);
    return Step::kProgress;
  }
  pending_unreceived_ = unlanded;
  return Step::kProgress;
}

bool Connection::admit_pending(uint64_t unlanded) {
  if (unlanded == 0) return true;
  if (unlanded > ctx_.config.max_pending_put_bytes_per_connection) return false;
  auto& total = ctx_.counters.pending_put_bytes;
  uint64_t cur = total.load(std::memory_order_relaxed);
  do {
    if (cur + unlanded > ctx_.config.max_pending_put_bytes) return false;
  } while (!total.compare_exchange_weak(cur, cur + unlanded, std::memory_order_relaxed));
  return true;
}

void Connection::account_received() {
  const uint64_t rest = put_.items()[item_].value_len - value_have_;
  if (pending_unreceived_ > rest) {
    ctx_.counters.pending_put_bytes.fetch_sub(pending_unreceived_ - rest, std::memory_order_relaxed);
    pending_unreceived_ = rest;
  }
}

void Connection::release_pending() {
  if (pending_unreceived_)
    ctx_.counters.pending_put_bytes.fetch_sub(pending_unreceived_, std::memory_order_relaxed);
  pending_unreceived_ = 0;
  put_.abandon();  // unpublished chunks go straight back to the allocator
}

bool Connection::peer_closed() const {
  tcp_info ti{};
  socklen_t sl = sizeof ti;
  if (::getsockopt(fd_.get(), IPPROTO_TCP, TCP_INFO, &ti, &sl) != 0) return true;
  return ti.tcpi_state != TCP_ESTABLISHED;
}

void Connection::set_rcvlowat(int bytes) {
  bytes = std::max(bytes, 1);
  if (bytes == rcvlowat_) return;
  ::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVLOWAT, &bytes, sizeof bytes);
  rcvlowat_ = bytes;
}

Connection::Step Connection::step_put_value() {
  while (item_ < put_.items().size()) {
    PutItem& it = put_.items()[item_];
    if (!value_started_) {
      value_started_ = true;
      value_have_ = 0;
      tried_free_space_ = false;
    }
    if (it.status == static_cast<uint8_t>(Status::kOk) && !pending()) {
      const Step s = reserve_value();
      if (s != Step::kProgress) return s;
    }
    const uint64_t remaining = it.value_len - value_have_;
    if (remaining > 0) {
      const std::size_t n = static_cast<std::size_t>(std::min<uint64_t>(remaining, buffered()));
      if (n == 0) return Step::kNeedBytes;
      if (pending()) {
        std::memcpy(pending()->data() + value_have_, in_.get() + in_r_, n);  // small values and read-ahead
        Counters::inc(ctx_.counters.put_bytes_buffered, n);
      }
      in_r_ += n;
      value_have_ += n;
      if (pending()) account_received();
      if (value_have_ < it.value_len) return Step::kNeedBytes;
    }
    put_.landed(ctx_, item_);  // verify and publish (or drop)
    ++item_;
    value_started_ = false;
  }
  finish_put();
  return Step::kProgress;
}

void Connection::release_frame_buffers() {
  // A max-size key list or PUT table (~150 KiB) should not stay resident on an idle connection.
  if (payload_.capacity() > kInputBufferBytes) std::vector<uint8_t>().swap(payload_);
}

void Connection::finish_put() {
  release_frame_buffers();
  queue_reply(hdr_.opcode, static_cast<uint32_t>(put_.items().size()), Status::kOk, put_.reply_body());
  phase_ = Phase::kHeader;
  frame_since_ns_ = 0;
}

void Connection::execute() {
  phase_ = Phase::kHeader;
  frame_since_ns_ = 0;
  Reply r = execute_request(ctx_, hdr_, payload_.data(), payload_.size(), &ns_, &authed_, &grant_);
  release_frame_buffers();  // the reply no longer refers to payload_
  if (r.close) return protocol_error(r.status, "request refused");
  queue_reply(hdr_.opcode, r.count, r.status, std::move(r.body), std::move(r.pins));
}

void Connection::queue_reply(uint8_t op, uint32_t count, Status st, std::vector<uint8_t> body,
                             std::vector<ObjectRef> pins) {
  uint64_t payload = body.size();
  for (const auto& o : pins) payload += o->value_len;
  proto::Header req = hdr_;
  req.opcode = op;
  const proto::Header h = reply_header(req, count, st, payload);
  OutMsg m;
  m.head.resize(proto::kHeaderBytes + body.size());
  proto::encode_header(h, m.head.data());
  if (!body.empty()) std::memcpy(m.head.data() + proto::kHeaderBytes, body.data(), body.size());
  m.pins = std::move(pins);
  if (out_.empty()) out_progress_ns_ = last_activity_ns_;
  out_bytes_ += proto::kHeaderBytes + payload;
  out_.push_back(std::move(m));
  if (out_bytes_ > ctx_.config.max_reply_bytes_per_connection) {
    // A client that does not read its replies may not pin more than this: close it (the
    // replies and their pins go with the connection).
    Counters::inc(ctx_.counters.reply_limit_closes);
    close_now();
  }
}

void Connection::protocol_error(Status st, const char* /*why: counted, not logged per frame*/) {
  if (st != Status::kUnauthorized) Counters::inc(ctx_.counters.protocol_errors);
  queue_reply(hdr_.opcode ? hdr_.opcode : 0, 0, st, {});
  closing_ = true;
  release_pending();
  waiting_budget_ = false;
  phase_ = Phase::kHeader;
}

void Connection::flush(int64_t now) {
  while (!out_.empty()) {
    iovec iov[kMaxIov];
    int n = 0;
    for (auto mi = out_.begin(); mi != out_.end() && n < kMaxIov; ++mi) {
      for (std::size_t s = mi->seg; s <= mi->pins.size() && n < kMaxIov; ++s) {
        const uint8_t* base = s == 0 ? mi->head.data() : mi->pins[s - 1]->data();
        std::size_t len = s == 0 ? mi->head.size() : mi->pins[s - 1]->value_len;
        const std::size_t off = s == mi->seg ? mi->seg_off : 0;
        if (len == off) continue;
        iov[n].iov_base = const_cast<uint8_t*>(base + off);
        iov[n].iov_len = len - off;
        ++n;
      }
    }
    std::size_t w = 0;
    if (n > 0) {
      msghdr mh{};
      mh.msg_iov = iov;
      mh.msg_iovlen = static_cast<std::size_t>(n);
      const ssize_t r = ::sendmsg(fd_.get(), &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (r < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        close_now();
        return;
      }
      w = static_cast<std::size_t>(r);
      Counters::inc(ctx_.counters.bytes_out, w);
      out_bytes_ -= w;
      last_activity_ns_ = now;
    }
    // Advance over what was written; finished replies drop their pins here.
    while (!out_.empty()) {
      OutMsg& m = out_.front();
      while (m.seg <= m.pins.size()) {
        const std::size_t len = m.seg == 0 ? m.head.size() : m.pins[m.seg - 1]->value_len;
        const std::size_t rem = len - m.seg_off;
        if (w < rem) {
          m.seg_off += w;
          w = 0;
          break;
        }
        w -= rem;
        ++m.seg;
        m.seg_off = 0;
      }
      if (m.seg <= m.pins.size()) break;
      out_.pop_front();
      out_progress_ns_ = now;
    }
  }
  if (closing_ || peer_eof_)
    enter_linger(now);
  else if (draining_ && phase_ == Phase::kHeader)
    close_now();
}

void Connection::enter_linger(int64_t now) {
  if (peer_eof_) {
    close_now();
    return;
  }
  if (phase_ == Phase::kLinger) return;
  ::shutdown(fd_.get(), SHUT_WR);
  phase_ = Phase::kLinger;
  linger_since_ns_ = now;
}

void Connection::on_timer(int64_t now) {
  if (done_) return;
  if (waiting_budget_ && phase_ == Phase::kPutValue) {
    pump(now);  // the pending-bytes budget may have come free
    if (!done_ && !out_.empty()) flush(now);
    if (done_) return;
  }
  if (phase_ == Phase::kLinger) {
    if (now - linger_since_ns_ > kLingerNs) close_now();
    return;
  }
  const int64_t auth_limit = static_cast<int64_t>(ctx_.config.auth_timeout_s * 1e9);
  if (!authed_ && auth_limit > 0 && now - accepted_ns_ > auth_limit) {
    // Auth on and no successful HELLO yet: unauthenticated peers do not get to hold a slot.
    Counters::inc(ctx_.counters.timeouts);
    Counters::inc(ctx_.counters.auth_failures);
    close_now();
    return;
  }
  const int64_t limit = static_cast<int64_t>(ctx_.config.idle_timeout_s * 1e9);
  if (limit <= 0) return;
  const bool idle = now - last_activity_ns_ > limit;
  const bool slow_frame = frame_since_ns_ != 0 && now - frame_since_ns_ > limit;
  const bool slow_reader = !out_.empty() && now - out_progress_ns_ > limit;
  if (idle || slow_frame || slow_reader) {
    Counters::inc(ctx_.counters.timeouts);
    close_now();
  }
}

}  // namespace membrain::server
