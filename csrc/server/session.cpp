#include "server/session.h"

#include "common/checksum.h"

namespace membrain::server {

using proto::Op;
using proto::Status;

namespace {
constexpr uint32_t kMaxTokenBytes = 4096;
}

Status check_request_frame(ServerContext& ctx, const proto::Header& h, bool authed) {
  const uint8_t op = h.opcode;
  if (!proto::is_request_op(op)) {
    Counters::inc(ctx.counters.requests[0]);
    return Status::kBadRequest;
  }
  Counters::inc(ctx.counters.requests[op]);
  if (!authed && op != static_cast<uint8_t>(Op::kHello)) {
    Counters::inc(ctx.counters.auth_failures);
    return Status::kUnauthorized;
  }
  const proto::Limits& limits = ctx.config.limits;
  const uint64_t len = h.payload_len;
  const uint32_t count = h.count;
  if (len > limits.max_payload_bytes) return Status::kTooLarge;
  switch (static_cast<Op>(op)) {
    case Op::kHello:
      return len > 4 + limits.max_namespace_len + kMaxTokenBytes ? Status::kTooLarge : Status::kOk;
    case Op::kPing:
      return len > limits.max_ping_bytes ? Status::kTooLarge : Status::kOk;
    case Op::kStats:
      return len != 0 ? Status::kBadRequest : Status::kOk;
    case Op::kPut:
      if (count > limits.max_batch) return Status::kTooLarge;
      return len < uint64_t{count} * proto::kPutItemBytes ? Status::kBadRequest : Status::kOk;
    default:  // key-list requests
      if (count > limits.max_batch) return Status::kTooLarge;
      if (len > uint64_t{count} * (2 + limits.max_key_len)) return Status::kTooLarge;
      return len < uint64_t{count} * 3 ? Status::kBadRequest : Status::kOk;
  }
}

proto::Header reply_header(const proto::Header& req, uint32_t count, Status st, uint64_t payload_len) {
  proto::Header h;
  h.opcode = static_cast<uint8_t>(req.opcode | proto::kReplyBit);
  h.request_id = req.request_id;
  h.count = count;
  h.status = static_cast<uint32_t>(st);
  h.payload_len = payload_len;
  return h;
}

Status PutFrame::parse(const proto::Header& h, const uint8_t* table, std::size_t keys_base,
                       const proto::Limits& limits) {
  const uint32_t count = h.count;
  items_.clear();
  last_published_.reset();
  items_.resize(count);
  keys_bytes_ = values_bytes_ = 0;
  // The sum is computed without overflow by checking each term against what is left.
  uint64_t left = h.payload_len - uint64_t{count} * proto::kPutItemBytes;
  for (uint32_t i = 0; i < count; ++i) {
    const uint8_t* e = table + std::size_t{i} * proto::kPutItemBytes;
    PutItem& it = items_[i];
    it.key_len = proto::get_u16(e);
    it.value_len = proto::get_u64(e + 8);
    it.checksum = proto::get_u64(e + 16);
    it.status = static_cast<uint8_t>(Status::kOk);
    if (it.key_len > limits.max_key_len) return Status::kTooLarge;
    if (it.key_len == 0 || proto::get_u16(e + 2) != 0 || proto::get_u32(e + 4) != 0)
      it.status = static_cast<uint8_t>(Status::kBadRequest);
    else if (it.value_len > limits.max_value_bytes)
      it.status = static_cast<uint8_t>(Status::kTooLarge);
    if (it.key_len > left || it.value_len > left - it.key_len) return Status::kBadRequest;
    left -= it.key_len + it.value_len;
    it.key_off = keys_base + keys_bytes_;
    keys_bytes_ += it.key_len;
    values_bytes_ += it.value_len;
  }
  return left == 0 ? Status::kOk : Status::kBadRequest;
}

bool PutFrame::reserve(ServerContext& ctx, std::string_view ns, std::size_t i, const uint8_t* keys,
                       bool may_evict) {
  PutItem& it = items_[i];
  if (it.obj) return true;
  if (it.status != static_cast<uint8_t>(Status::kOk)) return false;
  Status why = Status::kNoSpace;
  const std::string_view key(reinterpret_cast<const char*>(keys + it.key_off), it.key_len);
  it.obj = ctx.storage.reserve(ns, key, it.value_len, it.checksum, &why, may_evict);
  if (it.obj) return true;
  if (may_evict) {
    it.status = static_cast<uint8_t>(why);
    Counters::inc(ctx.counters.no_space);
  }
  return false;
}

void PutFrame::refuse(ServerContext& ctx, std::size_t i) {
  items_[i].obj.reset();
  items_[i].status = static_cast<uint8_t>(Status::kNoSpace);
  Counters::inc(ctx.counters.no_space);
}

void PutFrame::landed(ServerContext& ctx, std::size_t i) {
  PutItem& it = items_[i];
  if (!it.obj) return;
  if (checksum64(it.obj->data(), it.value_len) == it.checksum) {
    ctx.storage.publish(it.obj, last_published_.lock());
    last_published_ = it.obj;
  } else {
    it.status = static_cast<uint8_t>(Status::kChecksumMismatch);
    Counters::inc(ctx.counters.checksum_failures);
  }
  it.obj.reset();  // an unpublished chunk goes straight back to the allocator
}

void PutFrame::abandon() {
  for (auto& it : items_) it.obj.reset();
}

std::vector<uint8_t> PutFrame::reply_body() const {
  std::vector<uint8_t> body(items_.size());
  for (std::size_t i = 0; i < items_.size(); ++i) body[i] = items_[i].status;
  return body;
}

}  // namespace membrain::server
