// The transport-independent half of the client calls (docs/protocol.md is the spec): what a
// request frame carries and how a reply is judged. TcpConnection and ucx::UcxConnection only
// differ in how the bytes travel (a byte stream vs UCP active messages), so both build their
// frames and check their replies here and the wire format, with its error messages, lives in
// one place.
//
// Reply checks return an empty string when the reply is well formed and the reason otherwise:
// only the connection knows how to tear its transport down, so it passes the reason to its own
// fail() rather than having an exception thrown through it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "transport/protocol.h"

namespace membrain {

// Caller memory a value is sent from (ConstSpan) or received into (MutSpan).
struct ConstSpan {
  const uint8_t* data;
  std::size_t size;
};
struct MutSpan {
  uint8_t* data;
  std::size_t size;
};

// Called once per GET frame, after the item table arrives: given the value lengths of the
// hits (0 for misses), returns where each value should land; a null pointer means "drain".
using ValuePlacer = std::function<void(std::size_t first, const std::vector<uint8_t>& statuses,
                                       const std::vector<uint64_t>& lengths, std::vector<uint8_t*>* dest)>;

// Throws std::invalid_argument unless the key is 1..max_key_len bytes.
void validate_key(std::string_view key, std::size_t index, uint32_t max_key_len);
void validate_keys(const std::vector<std::string_view>& keys, uint32_t max_key_len);

proto::Header request_header(proto::Op op, uint64_t request_id, uint32_t count, uint64_t payload_len);
// Decodes a reply's 40-byte header into *reply and checks that it answers request `request_id`
// of opcode `op` and that the server did not refuse the frame.
std::string check_reply_header(const uint8_t* raw, uint8_t op, uint64_t request_id, proto::Header* reply);
// The key-list payload of keys[b, e) (GET, EXISTS, LOOKUP_PREFIX, DELETE).
std::vector<uint8_t> key_list_payload(const std::vector<std::string_view>& keys, std::size_t b,
                                      std::size_t e);

std::vector<uint8_t> hello_payload(std::string_view ns, std::string_view token);
// Takes the server's limits from a HELLO reply.
std::string parse_hello_reply(const std::vector<uint8_t>& reply, proto::Limits* limits);

// The items of a PUT batch that are sent. Those over the server's limits are never sent (the
// server would refuse the whole frame) and keep the TOO_LARGE status put_statuses() starts with.
struct PutPlan {
  std::vector<std::size_t> index;  // position of each sent item in the caller's batch
  std::vector<std::string_view> keys;
  std::vector<ConstSpan> values;
  std::vector<std::size_t> sizes;  // values[i].size, in the shape the chunkers take
};
// Checks the arguments (throws std::invalid_argument) and picks the items to send.
PutPlan plan_put(const std::vector<std::string_view>& keys, const std::vector<ConstSpan>& values,
                 const proto::Limits& limits);
std::vector<uint8_t> put_statuses(std::size_t batch);
// Writes the contiguous start of the PUT frame for plan items [b, e) into *meta: header, item
// table (with the values' checksums) and keys. The values follow it on the wire, in order,
// straight from the caller's memory. Returns their total size.
uint64_t encode_put_meta(const PutPlan& plan, std::size_t b, std::size_t e, uint64_t request_id,
                         std::vector<uint8_t>* meta);

// PUT and EXISTS replies carry one status per item.
std::string check_status_count(proto::Op op, uint64_t got, std::size_t expected);
// LOOKUP_PREFIX: the leading keys of the `asked` that are present. DELETE: keys deleted.
std::string parse_lookup_prefix_reply(const std::vector<uint8_t>& reply, std::size_t asked,
                                      uint32_t* present);
std::string parse_delete_reply(const std::vector<uint8_t>& reply, uint32_t* deleted);

// EXISTS, LOOKUP_PREFIX and DELETE ask about a batch chunk by chunk, one round trip per chunk,
// and of that only the chunking and the round trip depend on the transport. A connection
// describes the call with its chunks of the batch, a blocking round trip that returns the
// reply payload (under its lock and the call's deadline) and its fail(), which must throw:
// after a bad reply the connection is unusable and no later chunk may be asked.
struct KeyListCall {
  const std::vector<std::string_view>& keys;
  std::vector<std::pair<std::size_t, std::size_t>> chunks;
  std::function<std::vector<uint8_t>(proto::Op op, uint32_t count, const std::vector<uint8_t>& payload)>
      round_trip;
  std::function<void(const std::string& why)> fail;
};
std::vector<uint8_t> exists_in_chunks(const KeyListCall& call);
// Keys past the first chunk that is not fully present cannot be part of the prefix, so they
// are not asked about.
uint32_t lookup_prefix_in_chunks(const KeyListCall& call);
uint32_t delete_in_chunks(const KeyListCall& call);

// One GET frame's item table, the destinations the placer chose, and the values' fate.
struct GetFrame {
  std::size_t first = 0;  // batch index of the frame's first key
  std::vector<uint8_t> status;
  std::vector<uint64_t> length;  // 0 for misses: only hits carry bytes
  std::vector<uint64_t> checksum;
  std::vector<uint8_t*> dest;
  uint64_t value_bytes = 0;
};
std::vector<uint8_t> get_statuses(std::size_t batch, std::vector<uint64_t>* lengths);
// Checked before the table is read: the reply must echo the count and have room for a table.
std::string check_get_reply(const proto::Header& reply, uint32_t n);
// Parses the item table of a GET reply to keys [first, first + n) and checks that no value is
// longer than max_value_bytes and that the reply's length is the table plus the hits' values.
std::string parse_get_table(const proto::Header& reply, const uint8_t* table, uint32_t n, std::size_t first,
                            uint64_t max_value_bytes, GetFrame* frame);
// Asks the placer where values go; dest stays null for those to drain.
void place_values(const ValuePlacer& placer, GetFrame* frame);
// Once values [from, to) of the frame have landed: verifies them and records their statuses
// and lengths in the batch's results.
void settle_values(const GetFrame& frame, uint32_t from, uint32_t to, std::vector<uint8_t>* status,
                   std::vector<uint64_t>* lengths);
// get_into's placer: each value lands in its own buffer, or is drained (TOO_LARGE) when it
// does not fit. Throws std::invalid_argument unless there is one buffer per key.
ValuePlacer buffer_placer(const std::vector<std::string_view>& keys, const std::vector<MutSpan>& buffers);

}  // namespace membrain
