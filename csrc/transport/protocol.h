// Membrain wire protocol v1: constants and header/key-list codecs shared by the client and
// the server transports. docs/protocol.md is the specification; keep the two in step.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace membrain::proto {

constexpr uint32_t kMagic = 0x4E52424D;  // "MBRN" little-endian
constexpr uint8_t kVersion = 1;
constexpr std::size_t kHeaderBytes = 40;
constexpr std::size_t kPutItemBytes = 24;
constexpr std::size_t kGetItemBytes = 24;
constexpr uint8_t kReplyBit = 0x80;

enum class Op : uint8_t {
  kHello = 1,
  kPut = 2,
  kGet = 3,
  kExists = 4,
  kLookupPrefix = 5,
  kDelete = 6,
  kStats = 7,
  kPing = 8,
};

enum class Status : uint8_t {
  kOk = 0,
  kNotFound = 1,
  kBadRequest = 2,
  kUnauthorized = 3,
  kTooLarge = 4,
  kNoSpace = 5,
  kChecksumMismatch = 6,
  kInternal = 7,
  kUnsupportedVersion = 8,
};

const char* op_name(uint8_t op);
const char* status_name(uint8_t status);
bool is_request_op(uint8_t op);

struct Limits {
  uint32_t max_key_len = 128;
  uint32_t max_batch = 1024;
  uint64_t max_value_bytes = 256ull << 20;
  uint64_t max_payload_bytes = 1ull << 30;
  uint32_t max_namespace_len = 64;
  uint32_t max_ping_bytes = 4096;
};

struct Header {
  uint8_t version = kVersion;
  uint8_t opcode = 0;
  uint16_t flags = 0;
  uint64_t request_id = 0;
  uint32_t count = 0;
  uint32_t status = 0;
  uint64_t payload_len = 0;
};

// Writes the 40-byte wire form, checksum included.
void encode_header(const Header& h, uint8_t out[kHeaderBytes]);

enum class HeaderError { kNone, kBadMagic, kBadChecksum, kBadVersion, kBadReserved };
// Parses and verifies magic, checksum, reserved fields and version. The version check comes
// after the checksum so a corrupted header is reported as such.
HeaderError decode_header(const uint8_t in[kHeaderBytes], Header* out);
const char* header_error_name(HeaderError e);

// Little-endian helpers (the protocol is little-endian on every host).
inline void put_u16(uint8_t* p, uint16_t v) {
  std::memcpy(p, &v, 2);
}
inline void put_u32(uint8_t* p, uint32_t v) {
  std::memcpy(p, &v, 4);
}
inline void put_u64(uint8_t* p, uint64_t v) {
  std::memcpy(p, &v, 8);
}
inline uint16_t get_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline uint32_t get_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t get_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Parses a key list of exactly `count` keys filling exactly `len` bytes. Returns nullopt (and
// a reason) on any overrun, empty or oversized key, or trailing bytes. Views point into `data`.
std::optional<std::vector<std::string_view>> parse_key_list(const uint8_t* data, std::size_t len,
                                                            uint32_t count, const Limits& limits,
                                                            std::string* why);
// Appends the wire form of a key list.
void append_key_list(const std::vector<std::string_view>& keys, std::vector<uint8_t>* out);

// True for 1..max_namespace_len bytes of [A-Za-z0-9._-].
bool valid_namespace(std::string_view ns, const Limits& limits);

}  // namespace membrain::proto
