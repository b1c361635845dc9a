#include "server/request.h"

#include <algorithm>

namespace membrain::server {

using proto::Op;
using proto::Status;

bool equal_constant_time(const uint8_t* a, std::size_t alen, const std::string& b) {
  const std::size_t n = std::max(alen, b.size());
  volatile uint8_t diff = static_cast<uint8_t>(alen != b.size());
  for (std::size_t i = 0; i < n; ++i) {
    const uint8_t x = i < alen ? a[i] : 0;
    const uint8_t y = i < b.size() ? static_cast<uint8_t>(b[i]) : 0;
    diff = diff | static_cast<uint8_t>(x ^ y);
  }
  return diff == 0;
}

namespace {
Reply refuse(Status st) {
  Reply r;
  r.status = st;
  r.close = true;
  return r;
}
Reply reply(uint32_t count, Status st, std::vector<uint8_t> body, std::vector<ObjectRef> pins = {}) {
  Reply r;
  r.count = count;
  r.status = st;
  r.body = std::move(body);
  r.pins = std::move(pins);
  return r;
}
}  // namespace

Reply execute_request(ServerContext& ctx, const proto::Header& hdr, const uint8_t* p, std::size_t len,
                      std::string* ns_, bool* authed_, const TokenGrant** grant_) {
  const Op op = static_cast<Op>(hdr.opcode);
  const proto::Limits& limits_ = ctx.config.limits;
  switch (op) {
    case Op::kHello: {
      if (len < 4) return refuse(Status::kBadRequest);
      const uint16_t ns_len = proto::get_u16(p), tok_len = proto::get_u16(p + 2);
      if (std::size_t{4} + ns_len + tok_len != len) return refuse(Status::kBadRequest);
      const std::string_view ns(reinterpret_cast<const char*>(p + 4), ns_len);
      const TokenGrant* grant = nullptr;
      if (ctx.config.auth_enabled()) {
        // Every token is compared (constant time each), so timing does not tell which matched.
        for (const TokenGrant& g : ctx.config.tokens) {
          if (equal_constant_time(p + 4 + ns_len, tok_len, g.token) && !grant) grant = &g;
        }
        if (!grant) {
          Counters::inc(ctx.counters.auth_failures);
          return refuse(Status::kUnauthorized);
        }
      }
      if (!proto::valid_namespace(ns, limits_)) return refuse(Status::kBadRequest);
      if (grant && !grant->allows(ns)) {  // a valid token, but not for this namespace
        Counters::inc(ctx.counters.auth_failures);
        return refuse(Status::kUnauthorized);
      }
      *grant_ = grant;
      *authed_ = true;
      ns_->assign(ns);
      std::vector<uint8_t> body(32, 0);
      proto::put_u32(body.data() + 0, proto::kVersion);
      proto::put_u32(body.data() + 4, limits_.max_batch);
      proto::put_u32(body.data() + 8, limits_.max_key_len);
      proto::put_u64(body.data() + 16, limits_.max_value_bytes);
      proto::put_u64(body.data() + 24, limits_.max_payload_bytes);
      return reply(0, Status::kOk, std::move(body));
    }
    case Op::kPing:
      return reply(0, Status::kOk, std::vector<uint8_t>(p, p + len));
    case Op::kStats: {
      const std::string js = *grant_ && !(*grant_)->all() ? ctx.namespace_stats_json(*ns_) : ctx.stats_json();
      return reply(0, Status::kOk, std::vector<uint8_t>(js.begin(), js.end()));
    }
    default:
      break;
  }
  std::string why;
  auto keys = proto::parse_key_list(p, len, hdr.count, limits_, &why);
  if (!keys) return refuse(Status::kBadRequest);
  const uint32_t count = hdr.count;
  switch (op) {
    case Op::kGet: {
      std::vector<ObjectRef> found;
      ctx.storage.get_many(*ns_, *keys, &found);
      std::vector<uint8_t> body(std::size_t{count} * proto::kGetItemBytes, 0);
      std::vector<ObjectRef> pins;
      pins.reserve(count);
      for (uint32_t i = 0; i < count; ++i) {
        uint8_t* e = body.data() + std::size_t{i} * proto::kGetItemBytes;
        if (!found[i]) {
          e[0] = static_cast<uint8_t>(Status::kNotFound);
          continue;
        }
        e[0] = static_cast<uint8_t>(Status::kOk);
        proto::put_u64(e + 8, found[i]->value_len);
        proto::put_u64(e + 16, found[i]->checksum);
        pins.push_back(std::move(found[i]));
      }
      return reply(count, Status::kOk, std::move(body), std::move(pins));
    }
    case Op::kExists: {
      std::vector<uint8_t> present;
      ctx.storage.exists_many(*ns_, *keys, &present);
      for (auto& b : present) b = static_cast<uint8_t>(b ? Status::kOk : Status::kNotFound);
      return reply(count, Status::kOk, std::move(present));
    }
    case Op::kLookupPrefix:
    case Op::kDelete: {
      const uint32_t n = op == Op::kLookupPrefix ? ctx.storage.lookup_prefix(*ns_, *keys)
                                                 : ctx.storage.erase_many(*ns_, *keys);
      std::vector<uint8_t> body(4);
      proto::put_u32(body.data(), n);
      return reply(count, Status::kOk, std::move(body));
    }
    default:
      return refuse(Status::kBadRequest);
  }
}

}  // namespace membrain::server
