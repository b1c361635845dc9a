#include "transport/request_codec.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "common/checksum.h"

namespace membrain {

using proto::Header;
using proto::Op;
using proto::Status;

namespace {

constexpr uint8_t kOk = static_cast<uint8_t>(Status::kOk);

// LOOKUP_PREFIX and DELETE answer with a single u32 whatever the batch size.
std::string parse_u32_reply(const char* op, const std::vector<uint8_t>& reply, uint32_t* value) {
  if (reply.size() != 4)
    return std::string(op) + " reply is " + std::to_string(reply.size()) + " bytes, expected 4";
  *value = proto::get_u32(reply.data());
  return {};
}

uint8_t settled_status(const GetFrame& f, uint32_t j) {
  if (f.status[j] != kOk) return f.status[j];
  if (f.length[j] > 0 && !f.dest[j]) return static_cast<uint8_t>(Status::kTooLarge);  // drained
  // Bad bytes are already in the caller's buffer, but must never be reported as a hit.
  if (checksum64(f.dest[j], f.length[j]) != f.checksum[j])
    return static_cast<uint8_t>(Status::kChecksumMismatch);
  return kOk;
}

}  // namespace

void validate_key(std::string_view key, std::size_t index, uint32_t max_key_len) {
  if (key.empty() || key.size() > max_key_len) {
    throw std::invalid_argument("key " + std::to_string(index) + " is " + std::to_string(key.size()) +
                                " bytes; keys must be 1.." + std::to_string(max_key_len) + " bytes");
  }
}

void validate_keys(const std::vector<std::string_view>& keys, uint32_t max_key_len) {
  for (std::size_t i = 0; i < keys.size(); ++i) validate_key(keys[i], i, max_key_len);
}

Header request_header(Op op, uint64_t request_id, uint32_t count, uint64_t payload_len) {
  Header h;
  h.opcode = static_cast<uint8_t>(op);
  h.request_id = request_id;
  h.count = count;
  h.payload_len = payload_len;
  return h;
}

std::string check_reply_header(const uint8_t* raw, uint8_t op, uint64_t request_id, Header* reply) {
  const auto err = proto::decode_header(raw, reply);
  if (err != proto::HeaderError::kNone)
    return std::string("bad reply header: ") + proto::header_error_name(err);
  const Header& h = *reply;
  if (h.opcode != (op | proto::kReplyBit)) {
    return std::string("reply opcode ") + proto::op_name(h.opcode) + " does not answer " + proto::op_name(op);
  }
  if (h.request_id != request_id) {
    return "reply for request " + std::to_string(h.request_id) + ", expected " + std::to_string(request_id);
  }
  if (h.status != static_cast<uint32_t>(Status::kOk)) {
    // Frame-level failures (auth, malformed, limits) end the session on the server side.
    return std::string(proto::op_name(op)) +
           " refused by server: " + proto::status_name(static_cast<uint8_t>(h.status));
  }
  return {};
}

std::vector<uint8_t> key_list_payload(const std::vector<std::string_view>& keys, std::size_t b,
                                      std::size_t e) {
  std::vector<uint8_t> out;
  const std::vector<std::string_view> part(keys.begin() + b, keys.begin() + e);
  proto::append_key_list(part, &out);
  return out;
}

std::vector<uint8_t> hello_payload(std::string_view ns, std::string_view token) {
  std::vector<uint8_t> payload(4 + ns.size() + token.size());
  proto::put_u16(payload.data(), static_cast<uint16_t>(ns.size()));
  proto::put_u16(payload.data() + 2, static_cast<uint16_t>(token.size()));
  std::memcpy(payload.data() + 4, ns.data(), ns.size());
  if (!token.empty()) std::memcpy(payload.data() + 4 + ns.size(), token.data(), token.size());
  return payload;
}

std::string parse_hello_reply(const std::vector<uint8_t>& reply, proto::Limits* limits) {
  if (reply.size() < 32) return "HELLO reply too short (" + std::to_string(reply.size()) + " bytes)";
  const uint32_t version = proto::get_u32(reply.data());
  if (version != proto::kVersion) return "server speaks protocol version " + std::to_string(version);
  // A max_batch of 0 would make every batch unsendable; treat it as 1.
  limits->max_batch = std::max<uint32_t>(1, proto::get_u32(reply.data() + 4));
  limits->max_key_len = proto::get_u32(reply.data() + 8);
  limits->max_value_bytes = proto::get_u64(reply.data() + 16);
  limits->max_payload_bytes = proto::get_u64(reply.data() + 24);
  return {};
}

PutPlan plan_put(const std::vector<std::string_view>& keys, const std::vector<ConstSpan>& values,
                 const proto::Limits& limits) {
  if (keys.size() != values.size()) {
    throw std::invalid_argument("put: " + std::to_string(keys.size()) + " keys but " +
                                std::to_string(values.size()) + " values");
  }
  validate_keys(keys, limits.max_key_len);
  PutPlan plan;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const uint64_t frame = proto::kPutItemBytes + keys[i].size() + values[i].size;
    if (values[i].size > limits.max_value_bytes || frame > limits.max_payload_bytes) continue;
    plan.index.push_back(i);
    plan.keys.push_back(keys[i]);
    plan.values.push_back(values[i]);
    plan.sizes.push_back(values[i].size);
  }
  return plan;
}

std::vector<uint8_t> put_statuses(std::size_t batch) {
  return std::vector<uint8_t>(batch, static_cast<uint8_t>(Status::kTooLarge));
}

uint64_t encode_put_meta(const PutPlan& plan, std::size_t b, std::size_t e, uint64_t request_id,
                         std::vector<uint8_t>* meta) {
  const uint32_t n = static_cast<uint32_t>(e - b);
  std::size_t key_bytes = 0;
  uint64_t value_bytes = 0;
  for (std::size_t j = b; j < e; ++j) {
    key_bytes += plan.keys[j].size();
    value_bytes += plan.sizes[j];
  }
  const std::size_t table_bytes = proto::kPutItemBytes * n;
  meta->assign(proto::kHeaderBytes + table_bytes + key_bytes, 0);
  proto::encode_header(request_header(Op::kPut, request_id, n, table_bytes + key_bytes + value_bytes),
                       meta->data());
  uint8_t* row = meta->data() + proto::kHeaderBytes;
  uint8_t* kp = row + table_bytes;
  for (std::size_t j = b; j < e; ++j, row += proto::kPutItemBytes) {
    const ConstSpan& v = plan.values[j];
    proto::put_u16(row, static_cast<uint16_t>(plan.keys[j].size()));
    proto::put_u64(row + 8, v.size);
    proto::put_u64(row + 16, checksum64(v.data, v.size));
    std::memcpy(kp, plan.keys[j].data(), plan.keys[j].size());
    kp += plan.keys[j].size();
  }
  return value_bytes;
}

std::string check_status_count(Op op, uint64_t got, std::size_t expected) {
  if (got == expected) return {};
  return std::string(proto::op_name(static_cast<uint8_t>(op))) + " reply carries " + std::to_string(got) +
         " statuses for " + std::to_string(expected) + (op == Op::kPut ? " items" : " keys");
}

std::string parse_lookup_prefix_reply(const std::vector<uint8_t>& reply, std::size_t asked,
                                      uint32_t* present) {
  std::string why = parse_u32_reply("LOOKUP_PREFIX", reply, present);
  if (why.empty() && *present > asked) why = "LOOKUP_PREFIX reply counts more keys than were asked";
  return why;
}

std::string parse_delete_reply(const std::vector<uint8_t>& reply, uint32_t* deleted) {
  return parse_u32_reply("DELETE", reply, deleted);
}

namespace {

std::vector<uint8_t> ask_chunk(const KeyListCall& call, Op op, std::size_t b, std::size_t e) {
  return call.round_trip(op, static_cast<uint32_t>(e - b), key_list_payload(call.keys, b, e));
}

void check(const KeyListCall& call, const std::string& why) {
  if (!why.empty()) call.fail(why);
}

}  // namespace

std::vector<uint8_t> exists_in_chunks(const KeyListCall& call) {
  std::vector<uint8_t> out;
  out.reserve(call.keys.size());
  for (const auto& [b, e] : call.chunks) {
    const auto st = ask_chunk(call, Op::kExists, b, e);
    check(call, check_status_count(Op::kExists, st.size(), e - b));
    out.insert(out.end(), st.begin(), st.end());
  }
  return out;
}

uint32_t lookup_prefix_in_chunks(const KeyListCall& call) {
  uint32_t total = 0;
  for (const auto& [b, e] : call.chunks) {
    uint32_t n = 0;
    check(call, parse_lookup_prefix_reply(ask_chunk(call, Op::kLookupPrefix, b, e), e - b, &n));
    total += n;
    if (n < e - b) break;
  }
  return total;
}

uint32_t delete_in_chunks(const KeyListCall& call) {
  uint32_t total = 0;
  for (const auto& [b, e] : call.chunks) {
    uint32_t n = 0;
    check(call, parse_delete_reply(ask_chunk(call, Op::kDelete, b, e), &n));
    total += n;
  }
  return total;
}

std::vector<uint8_t> get_statuses(std::size_t batch, std::vector<uint64_t>* lengths) {
  if (lengths) lengths->assign(batch, 0);
  return std::vector<uint8_t>(batch, static_cast<uint8_t>(Status::kNotFound));
}

std::string check_get_reply(const Header& reply, uint32_t n) {
  if (reply.count == n && reply.payload_len >= uint64_t(proto::kGetItemBytes) * n) return {};
  return "GET reply does not carry an item table for " + std::to_string(n) + " keys";
}

std::string parse_get_table(const Header& reply, const uint8_t* table, uint32_t n, std::size_t first,
                            uint64_t max_value_bytes, GetFrame* frame) {
  GetFrame& f = *frame;
  f.first = first;
  f.status.resize(n);
  f.length.resize(n);
  f.checksum.resize(n);
  f.dest.assign(n, nullptr);
  f.value_bytes = 0;
  for (uint32_t j = 0; j < n; ++j) {
    const uint8_t* row = table + proto::kGetItemBytes * j;
    f.status[j] = row[0];
    f.length[j] = f.status[j] == kOk ? proto::get_u64(row + 8) : 0;
    f.checksum[j] = proto::get_u64(row + 16);
    // A length the server could never have stored is a corrupt or hostile reply; checking it
    // also keeps the sum below from wrapping around to a plausible payload_len.
    if (f.length[j] > max_value_bytes) {
      return "GET reply item " + std::to_string(j) + " claims " + std::to_string(f.length[j]) +
             " bytes, over the server's max_value_bytes of " + std::to_string(max_value_bytes);
    }
    if (f.value_bytes > UINT64_MAX - f.length[j]) return "GET reply value lengths overflow";
    f.value_bytes += f.length[j];
  }
  if (reply.payload_len != uint64_t(proto::kGetItemBytes) * n + f.value_bytes) {
    return "GET reply length does not match its item table";
  }
  return {};
}

void place_values(const ValuePlacer& placer, GetFrame* frame) {
  placer(frame->first, frame->status, frame->length, &frame->dest);
}

void settle_values(const GetFrame& frame, uint32_t from, uint32_t to, std::vector<uint8_t>* status,
                   std::vector<uint64_t>* lengths) {
  for (uint32_t j = from; j < to; ++j) {
    (*status)[frame.first + j] = settled_status(frame, j);
    if (lengths) (*lengths)[frame.first + j] = frame.length[j];
  }
}

ValuePlacer buffer_placer(const std::vector<std::string_view>& keys, const std::vector<MutSpan>& buffers) {
  if (keys.size() != buffers.size()) {
    throw std::invalid_argument("get_into: " + std::to_string(keys.size()) + " keys but " +
                                std::to_string(buffers.size()) + " buffers");
  }
  // Zero-length hits need a non-null destination so they are not mistaken for "drain"; any
  // valid pointer will do since nothing is written.
  static uint8_t empty_sink;
  return [&buffers](std::size_t first, const std::vector<uint8_t>&, const std::vector<uint64_t>& len,
                    std::vector<uint8_t*>* dest) {
    for (std::size_t j = 0; j < len.size(); ++j) {
      const MutSpan& buf = buffers[first + j];
      if (len[j] <= buf.size) (*dest)[j] = buf.data ? buf.data : &empty_sink;
    }
  };
}

}  // namespace membrain
