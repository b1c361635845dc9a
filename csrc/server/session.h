// What every transport does with a frame, written once: the per-opcode frame limits, the PUT
// item table, reserving, verifying and publishing PUT values, and the reply header. The TCP
// connection (server/connection.cpp) and the UCX listener (server/ucx/ucx_listener.cpp) only
// move bytes around these calls; complete non-PUT requests go to execute_request (request.h).
//
// A PUT runs in two phases on any transport:
//   1. header + item table + keys are in: check_request_frame(), then PutFrame::parse() -
//      everything validated before anything is reserved;
//   2. per value: PutFrame::reserve() says where it lands (a storage chunk, or nowhere: drain
//      it), and once its bytes are there PutFrame::landed() verifies the checksum and publishes;
//      PutFrame::reply_body() is the reply.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "server/context.h"
#include "server/object.h"
#include "transport/protocol.h"

namespace membrain::server {

// Checks a decoded request header before any of its payload is read: a known request opcode,
// authentication, payload and count limits for that opcode. Counts the request (by opcode) and
// auth failures. kOk, or the status to refuse the frame with (then close).
proto::Status check_request_frame(ServerContext& ctx, const proto::Header& h, bool authed);

// The header of the reply to `req` carrying `payload_len` bytes.
proto::Header reply_header(const proto::Header& req, uint32_t count, proto::Status st, uint64_t payload_len);

struct PutItem {
  uint16_t key_len = 0;
  uint8_t status = 0;  // proto::Status; not OK = the value is drained and dropped
  uint64_t value_len = 0;
  uint64_t checksum = 0;
  std::size_t key_off = 0;  // offset of the key in the caller's table-and-keys buffer
  ObjectRef obj;            // reserved storage, not yet visible (between reserve and landed)
};

class PutFrame {
 public:
  // Phase 1. `table` holds count x 24-byte entries; keys follow at `keys_base` in the caller's
  // buffer (key_off is relative to that buffer). Frame-level errors (a key over max_key_len,
  // lengths that do not add up to payload_len) return their status; item-level ones (empty key,
  // reserved bits, value over max_value_bytes) mark the item. Sets keys_bytes/values_bytes.
  proto::Status parse(const proto::Header& h, const uint8_t* table, std::size_t keys_base,
                      const proto::Limits& limits);

  // Phase 2a: storage for item i, keys at `keys`. False when the item is not stored (already
  // refused, or storage said NO_SPACE/TOO_LARGE: counted, the item takes the reason); its bytes
  // must still be drained. With may_evict false only free space is used, and a failure leaves
  // the item OK for a later try.
  bool reserve(ServerContext& ctx, std::string_view ns, std::size_t i, const uint8_t* keys,
               bool may_evict = true);
  // Marks item i NO_SPACE without asking storage (a transport-level budget said no).
  void refuse(ServerContext& ctx, std::size_t i);
  // Phase 2b: item i's bytes are all in its chunk: verify the checksum, publish (or drop).
  void landed(ServerContext& ctx, std::size_t i);
  // Drops every reservation not yet published (frame abandoned).
  void abandon();

  std::vector<uint8_t> reply_body() const;  // one status byte per item
  std::vector<PutItem>& items() { return items_; }
  const std::vector<PutItem>& items() const { return items_; }
  uint64_t keys_bytes() const { return keys_bytes_; }
  uint64_t values_bytes() const { return values_bytes_; }

 private:
  std::vector<PutItem> items_;
  uint64_t keys_bytes_ = 0, values_bytes_ = 0;
  // The value this frame published last: the next one is ordered just behind it for eviction
  // (a frame is a prefix chain in order; Storage::publish). Weak: it pins nothing.
  std::weak_ptr<Object> last_published_;
};

}  // namespace membrain::server
