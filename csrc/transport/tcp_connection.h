// One client-side TCP connection to a Membrain server speaking protocol v1 (docs/protocol.md).
//
// Calls are blocking and batched, each bounded by a deadline. The socket is non-blocking and
// every wait goes through poll() with the time left, so a slow or vanished server can never
// hold a caller past its deadline. Any timeout, I/O error or protocol violation marks the
// connection broken (the byte stream may be out of sync) and throws TransportError; the owner
// (the Python pool) then discards it and reconnects.
//
// Values move without intermediate copies: PUT sends straight from the caller's buffers with
// writev, GET reads straight into the caller's buffers with readv, and checksums are computed
// and verified on those same bytes.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <sys/uio.h>

#include "common/deadline.h"
#include "common/unique_fd.h"
#include "transport/protocol.h"
#include "transport/request_codec.h"  // ConstSpan, MutSpan, ValuePlacer, validate_key, KeyListCall

namespace membrain {

// A transport failure: connect/HELLO failure, timeout, reset, protocol violation. The
// connection that raised it is unusable afterwards.
class TransportError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class TcpConnection {
 public:
  struct Options {
    std::string host;
    uint16_t port = 0;
    std::string ns = "default";
    std::optional<std::string> auth_token;
    int connect_timeout_ms = 2000;
  };

  // Connects, sets socket options and completes HELLO; throws TransportError on failure.
  explicit TcpConnection(Options options);
  TcpConnection(const TcpConnection&) = delete;
  TcpConnection& operator=(const TcpConnection&) = delete;

  // Item statuses (proto::Status values), one per key. Values longer than the server's
  // max_value_bytes get TOO_LARGE locally and are not sent.
  std::vector<uint8_t> put(const std::vector<std::string_view>& keys, const std::vector<ConstSpan>& values,
                           int timeout_ms);

  // See ValuePlacer. Used by get() to allocate Python bytes of the exact size under the GIL.
  using Placer = ValuePlacer;

  // Statuses: OK (value landed and its checksum matched), NOT_FOUND, TOO_LARGE (value longer
  // than its buffer: drained, buffer untouched), CHECKSUM_MISMATCH (bytes landed but are bad),
  // or the server's item status. `lengths` (when non-null) receives each value's length.
  std::vector<uint8_t> get_into(const std::vector<std::string_view>& keys,
                                const std::vector<MutSpan>& buffers, int timeout_ms,
                                std::vector<uint64_t>* lengths = nullptr);
  std::vector<uint8_t> get_with(const std::vector<std::string_view>& keys, const Placer& placer,
                                int timeout_ms, std::vector<uint64_t>* lengths);

  std::vector<uint8_t> exists(const std::vector<std::string_view>& keys, int timeout_ms);
  // Number of leading keys present. Batches above max_batch are asked chunk by chunk and the
  // walk stops at the first chunk that is not fully present.
  uint32_t lookup_prefix(const std::vector<std::string_view>& keys, int timeout_ms);
  uint32_t del(const std::vector<std::string_view>& keys, int timeout_ms);
  std::string stats(int timeout_ms);
  // Round trip with a small payload; returns the seconds it took.
  double ping(int timeout_ms);

  // Cumulative seconds per phase, so benchmarks can say where the time of a call goes:
  // checksum (PUT hashing), send, wait (request sent -> reply header received, i.e. server
  // work plus network), recv (reply payload), verify (GET checksum verification).
  struct Timings {
    double checksum = 0, send = 0, wait = 0, recv = 0, verify = 0;
    uint64_t frames = 0;
  };
  Timings timings();
  void reset_timings();

  bool broken() const { return broken_; }
  void close();
  const proto::Limits& limits() const { return limits_; }
  const std::string& host() const { return opts_.host; }
  uint16_t port() const { return opts_.port; }

 private:
  void connect_socket();
  void hello();
  void fail(const std::string& what);  // marks broken, throws TransportError
  void break_stream();                 // marks broken and closes, without throwing
  void send_all(::iovec* iov, std::size_t iovcnt, const Deadline& dl);
  // `spin`: the wait is for a reply header, so poll briefly before sleeping (reply_spin_us() in
  // the .cpp); recv_reply() spins unless told not to, for replies that wait on bulk transfers.
  void recv_exact(uint8_t* dst, std::size_t n, const Deadline& dl, bool spin = false);
  void recv_vec(::iovec* iov, std::size_t iovcnt, const Deadline& dl, bool spin = false);
  void wait_fd(short events, const Deadline& dl, bool spin = false);
  proto::Header recv_reply(uint8_t op, uint64_t request_id, const Deadline& dl, bool spin = true);
  // Sends a request whose payload is one contiguous buffer; returns its request id.
  uint64_t send_request(proto::Op op, uint32_t count, const std::vector<uint8_t>& payload,
                        const Deadline& dl);
  // Sends a request whose payload is one contiguous buffer and reads the reply payload.
  std::vector<uint8_t> simple_call(proto::Op op, uint32_t count, const std::vector<uint8_t>& payload,
                                   const Deadline& dl, proto::Header* reply_header = nullptr);
  // This transport's part of EXISTS, LOOKUP_PREFIX and DELETE (see KeyListCall): the lock, one
  // deadline for all the chunks, and its round trip.
  template <class Result>
  Result run_key_list(Result (*op)(const KeyListCall&), const std::vector<std::string_view>& keys,
                      int timeout_ms);
  void check_usable();
  // [begin, end) chunks of a batch honouring max_batch and, when sizes are given, the
  // per-frame payload limit; a chunk also ends once its values reach target_value_bytes.
  std::vector<std::pair<std::size_t, std::size_t>> chunks(const std::vector<std::string_view>& keys,
                                                          const std::vector<std::size_t>* value_sizes,
                                                          std::size_t per_item_overhead,
                                                          uint64_t target_value_bytes = UINT64_MAX) const;

  Options opts_;
  Timings timings_;
  UniqueFd fd_;
  proto::Limits limits_;
  uint64_t next_id_ = 1;
  std::atomic<bool> broken_{false};
  std::mutex mu_;  // one call at a time; the stream is strictly request/reply ordered
};

}  // namespace membrain
