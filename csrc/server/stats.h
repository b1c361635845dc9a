// Event counters shared by all workers. Relaxed atomics: they are monotonic counters read by
// the metrics thread, never used for synchronisation, so the data path pays one uncontended
// add per event and nothing else.
#pragma once
#include <atomic>
#include <cstdint>

namespace membrain::server {

constexpr int kNumOps = 9;  // opcodes 1..8; index 0 counts unknown opcodes

struct Counters {
  std::atomic<uint64_t> requests[kNumOps] = {};
  std::atomic<uint64_t> bytes_in{0};
  std::atomic<uint64_t> bytes_out{0};
  std::atomic<uint64_t> connections_current{0};
  std::atomic<uint64_t> connections_total{0};
  std::atomic<uint64_t> connections_rejected{0};  // over --max-connections, or shed out of fds
  std::atomic<uint64_t> accept_pauses{0};         // accept() ran out of file descriptors
  std::atomic<uint64_t> protocol_errors{0};       // frame-level BAD_REQUEST/TOO_LARGE/version
  std::atomic<uint64_t> auth_failures{0};
  std::atomic<uint64_t> timeouts{0};
  std::atomic<uint64_t> reply_limit_closes{
      0};  // closed past --max-reply-bytes-per-connection           // idle, slow frame or slow reader
  std::atomic<uint64_t> checksum_failures{0};  // PUT values whose bytes did not match
  std::atomic<uint64_t> no_space{0};           // PUT values refused for capacity
  // PUT value bytes copied out of the input buffer rather than received straight into their
  // slot: each such byte costs a second copy, so a large-value stream should keep this small.
  std::atomic<uint64_t> put_bytes_buffered{0};
  // Gauge: PUT value bytes reserved in storage and not yet received (--max-pending-put-bytes).
  std::atomic<uint64_t> pending_put_bytes{0};
  // PUT values that waited for their bytes to arrive before storage would evict for them.
  std::atomic<uint64_t> put_land_waits{0};

  static void inc(std::atomic<uint64_t>& c, uint64_t n = 1) { c.fetch_add(n, std::memory_order_relaxed); }
  static uint64_t get(const std::atomic<uint64_t>& c) { return c.load(std::memory_order_relaxed); }
};

}  // namespace membrain::server
