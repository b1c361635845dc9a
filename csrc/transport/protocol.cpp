#include "transport/protocol.h"

#include "common/checksum.h"

namespace membrain::proto {

const char* op_name(uint8_t op) {
  switch (static_cast<Op>(op & ~kReplyBit)) {
    case Op::kHello:
      return "HELLO";
    case Op::kPut:
      return "PUT";
    case Op::kGet:
      return "GET";
    case Op::kExists:
      return "EXISTS";
    case Op::kLookupPrefix:
      return "LOOKUP_PREFIX";
    case Op::kDelete:
      return "DELETE";
    case Op::kStats:
      return "STATS";
    case Op::kPing:
      return "PING";
  }
  return "UNKNOWN";
}

const char* status_name(uint8_t status) {
  switch (static_cast<Status>(status)) {
    case Status::kOk:
      return "OK";
    case Status::kNotFound:
      return "NOT_FOUND";
    case Status::kBadRequest:
      return "BAD_REQUEST";
    case Status::kUnauthorized:
      return "UNAUTHORIZED";
    case Status::kTooLarge:
      return "TOO_LARGE";
    case Status::kNoSpace:
      return "NO_SPACE";
    case Status::kChecksumMismatch:
      return "CHECKSUM_MISMATCH";
    case Status::kInternal:
      return "INTERNAL";
    case Status::kUnsupportedVersion:
      return "UNSUPPORTED_VERSION";
  }
  return "UNKNOWN";
}

bool is_request_op(uint8_t op) {
  return op >= static_cast<uint8_t>(Op::kHello) && op <= static_cast<uint8_t>(Op::kPing);
}

void encode_header(const Header& h, uint8_t out[kHeaderBytes]) {
  put_u32(out + 0, kMagic);
  out[4] = h.version;
  out[5] = h.opcode;
  put_u16(out + 6, h.flags);
  put_u64(out + 8, h.request_id);
  put_u32(out + 16, h.count);
  put_u32(out + 20, h.status);
  put_u64(out + 24, h.payload_len);
  put_u32(out + 32, 0);
  put_u32(out + 36, static_cast<uint32_t>(checksum64(out, 36)));
}

HeaderError decode_header(const uint8_t in[kHeaderBytes], Header* out) {
  if (get_u32(in + 0) != kMagic) return HeaderError::kBadMagic;
  if (get_u32(in + 36) != static_cast<uint32_t>(checksum64(in, 36))) return HeaderError::kBadChecksum;
  if (get_u32(in + 32) != 0) return HeaderError::kBadReserved;
  out->version = in[4];
  out->opcode = in[5];
  out->flags = get_u16(in + 6);
  out->request_id = get_u64(in + 8);
  out->count = get_u32(in + 16);
  out->status = get_u32(in + 20);
  out->payload_len = get_u64(in + 24);
  if (out->flags != 0) return HeaderError::kBadReserved;
  if (out->version != kVersion) return HeaderError::kBadVersion;
  return HeaderError::kNone;
}

const char* header_error_name(HeaderError e) {
  switch (e) {
    case HeaderError::kNone:
      return "none";
    case HeaderError::kBadMagic:
      return "bad magic";
    case HeaderError::kBadChecksum:
      return "bad header checksum";
    case HeaderError::kBadVersion:
      return "unsupported version";
    case HeaderError::kBadReserved:
      return "non-zero reserved field";
  }
  return "unknown";
}

std::optional<std::vector<std::string_view>> parse_key_list(const uint8_t* data, std::size_t len,
                                                            uint32_t count, const Limits& limits,
                                                            std::string* why) {
  auto fail = [&](std::string reason) -> std::optional<std::vector<std::string_view>> {
    if (why) *why = std::move(reason);
    return std::nullopt;
  };
  if (count > limits.max_batch)
    return fail("count " + std::to_string(count) + " exceeds max_batch " + std::to_string(limits.max_batch));
  std::vector<std::string_view> keys;
  keys.reserve(count);
  std::size_t pos = 0;
  for (uint32_t i = 0; i < count; ++i) {
    if (len - pos < 2) return fail("key list truncated at key " + std::to_string(i));
    const uint16_t klen = get_u16(data + pos);
    pos += 2;
    if (klen == 0) return fail("key " + std::to_string(i) + " is empty");
    if (klen > limits.max_key_len)
      return fail("key " + std::to_string(i) + " is " + std::to_string(klen) + " bytes, max " +
                  std::to_string(limits.max_key_len));
    if (len - pos < klen) return fail("key " + std::to_string(i) + " overruns the payload");
    keys.emplace_back(reinterpret_cast<const char*>(data + pos), klen);
    pos += klen;
  }
  if (pos != len) return fail(std::to_string(len - pos) + " trailing bytes after the key list");
  return keys;
}

void append_key_list(const std::vector<std::string_view>& keys, std::vector<uint8_t>* out) {
  for (auto k : keys) {
    const std::size_t at = out->size();
    out->resize(at + 2 + k.size());
    put_u16(out->data() + at, static_cast<uint16_t>(k.size()));
    std::memcpy(out->data() + at + 2, k.data(), k.size());
  }
}

bool valid_namespace(std::string_view ns, const Limits& limits) {
  if (ns.empty() || ns.size() > limits.max_namespace_len) return false;
  for (char c : ns) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

}  // namespace membrain::proto
