// The replies of one pipelined batch of Redis GETs, each value received straight into its
// destination (why: membrain/tiers/redis_direct.py).
//
// redis-py owns the connection (connect, AUTH, pooling) and sends the GETs; this reads what
// comes back on that socket. A GET answers a bulk string, nil or an error; RESP3's null and blob
// error are understood too. A value's body is received by the kernel directly into its
// destination, and only headers, the 8-byte checksum trailer and CRLFs pass through a small
// buffer. Any other reply is a protocol violation: the caller must drop the connection.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "transport/request_codec.h"  // MutSpan

namespace membrain::redis {

// Stored values end with the XXH3-64 (little-endian) of what precedes it.
constexpr std::size_t kTrailer = 8;

struct GetBatchResult {
  enum class Failure { none, timed_out, closed, protocol };
  std::vector<uint8_t> hits;        // per key: 1 = the value landed and matched its checksum
  std::vector<std::string> errors;  // error replies (MOVED ..., CLUSTERDOWN ...): misses
  Failure failure = Failure::none;  // not none: the stream is unusable, replies may be unread
  std::string detail;
};

// Reads dests.size() GET replies from `fd` (blocking or not: every read is MSG_DONTWAIT and waits
// in poll) within `timeout_ms`. A value of exactly dests[i].size + kTrailer bytes is received
// into dests[i] and verified; one of another length is skipped unread (dests[i] untouched); one
// that fails its checksum leaves dests[i] undefined. No byte is written after the return.
GetBatchResult read_get_replies(int fd, const std::vector<MutSpan>& dests, int timeout_ms);

}  // namespace membrain::redis
