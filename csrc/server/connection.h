// One client connection: a non-blocking socket driven by its worker's epoll, parsing frames
// with an explicit state machine (never blocking, never trusting a length before checking it)
// and answering each request in arrival order.
//
// Input: small things (headers, key lists, the PUT item table) go through a fixed 64 KiB
// buffer; PUT value bytes are received straight into their storage chunk (only the few bytes
// that arrive read-ahead in the buffer are copied). Output: each reply is a small owned head
// (header + table) plus pinned storage chunks, gathered with sendmsg() - GET never copies a
// value. A connection with more than output_backlog_bytes queued stops reading until the peer
// catches up, so a client that pipelines without reading cannot grow server memory.
#pragma once
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <sys/uio.h>

#include "common/unique_fd.h"
#include "server/config.h"
#include "server/context.h"
#include "server/session.h"
#include "server/stats.h"
#include "server/storage.h"
#include "transport/protocol.h"

namespace membrain::server {

class Connection {
 public:
  // Headers, key lists and read-ahead only; values bypass it. Allocated uninitialised, so an
  // idle connection's untouched pages cost no RSS.
  static constexpr std::size_t kInputBufferBytes = 64 << 10;
  static constexpr int64_t kLingerNs = 2'000'000'000;  // wait for the peer's FIN after an error reply

  Connection(UniqueFd fd, ServerContext& ctx, int64_t now_ns);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  int fd() const { return fd_.get(); }
  // Socket events. After either, check done() and wants_*().
  void on_readable(int64_t now);
  void on_writable(int64_t now);
  void on_timer(int64_t now);  // idle / slow-frame / slow-reader / linger deadlines; budget waits
  // Server shutdown: finish the frame being received and the queued replies, then close.
  void begin_drain();
  // The socket reported an error or hang-up and nothing is left to send.
  void hang_up() { done_ = true; }

  bool done() const { return done_; }
  bool wants_read() const;  // false while a PUT value waits for the pending-bytes budget
  bool wants_write() const { return !out_.empty(); }

 private:
  enum class Phase { kHeader, kPayload, kPutTable, kPutKeys, kPutValue, kLinger };
  // kWait: the current PUT value waits for its bytes to arrive (SO_RCVLOWAT wakes us) or for
  // the pending-bytes budget (rechecked on the timer); nothing is read meanwhile.
  enum class Step { kProgress, kNeedBytes, kWait, kStop };

  struct OutMsg {
    std::vector<uint8_t> head;    // header + reply table
    std::vector<ObjectRef> pins;  // values sent after head, in order
    std::size_t seg = 0;          // 0 = head, i >= 1 = pins[i - 1]
    std::size_t seg_off = 0;
  };

  void pump(int64_t now);
  bool can_consume() const;
  Step step();
  Step step_header();
  Step fill_payload();  // copies buffered bytes into payload_ until payload_need_
  Step step_put_value();
  Step reserve_value();                   // storage for items_[item_], evicting only for landed bytes
  bool admit_pending(uint64_t unlanded);  // takes budget for reserved-but-unreceived bytes
  void account_received();                // shrinks pending_unreceived_ as value bytes arrive
  void release_pending();                 // drops the frame's reservations and their budget
  void set_rcvlowat(int bytes);
  bool peer_closed() const;  // the peer sent FIN (or the socket is no longer established)
  void start_frame();
  void execute();  // a complete non-PUT request is in payload_
  void finish_put_table();
  void finish_put();
  void release_frame_buffers();

  void queue_reply(uint8_t op, uint32_t count, proto::Status st, std::vector<uint8_t> body,
                   std::vector<ObjectRef> pins = {});
  void protocol_error(proto::Status st, const char* why);
  void flush(int64_t now);
  void enter_linger(int64_t now);
  void close_now() { done_ = true; }

  std::size_t buffered() const { return in_w_ - in_r_; }
  std::size_t buffered_read_limit() const;
  std::size_t value_read_limit() const;
  bool frame_ends_in_small_values() const;
  bool receive_in_place() const;
  void compact();

  UniqueFd fd_;
  ServerContext& ctx_;
  const proto::Limits& limits_;

  Phase phase_ = Phase::kHeader;
  bool authed_;
  bool closing_ = false;  // an error reply is queued: stop reading, flush, linger, close
  bool draining_ = false;
  bool peer_eof_ = false;
  bool done_ = false;
  std::string ns_ = "default";
  const TokenGrant* grant_ = nullptr;  // the token this connection authenticated with (auth on)

  std::unique_ptr<uint8_t[]> in_;
  std::size_t in_r_ = 0, in_w_ = 0;

  proto::Header hdr_;
  std::vector<uint8_t> payload_;
  std::size_t payload_have_ = 0, payload_need_ = 0;

  PutFrame put_;  // the PUT frame being received (server/session.h)
  // Per PUT frame, for reads that stop where a large value begins: small_run_bytes_[i] is the
  // size of the run of values under kDirectRecvMin starting at item i (0 at a large one, and at
  // the end), small_tail_begin_ the first item of the frame's trailing run of small values.
  std::vector<uint64_t> small_run_bytes_;
  std::size_t small_tail_begin_ = 0;
  std::size_t item_ = 0;
  bool value_started_ = false;
  uint64_t value_have_ = 0;
  // Storage chunk the current PUT value is being received into (nullptr: none, drained).
  Object* pending() const {
    return phase_ == Phase::kPutValue && item_ < put_.items().size() ? put_.items()[item_].obj.get()
                                                                     : nullptr;
  }
  uint64_t pending_unreceived_ = 0;  // of pending()'s bytes, those counted in counters.pending_put_bytes
  bool tried_free_space_ = false;    // this value already tried storage without eviction
  bool waiting_budget_ = false;      // kWait for the pending-bytes budget (not for bytes)
  int rcvlowat_ = 1;
  bool woke_readable_ =
      false;  // pump() runs for an EPOLLIN wake-up                 // SO_RCVLOWAT now set on the socket

  std::deque<OutMsg> out_;
  uint64_t out_bytes_ = 0;

  int64_t last_activity_ns_;
  int64_t accepted_ns_;          // for the authentication deadline
  int64_t frame_since_ns_ = 0;   // first byte of the frame being received; 0 = between frames
  int64_t out_progress_ns_ = 0;  // last time a queued reply finished (or the queue became non-empty)
  int64_t linger_since_ns_ = 0;
};

}  // namespace membrain::server
