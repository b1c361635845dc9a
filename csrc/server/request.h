// Transport-independent execution of one complete protocol request (everything but PUT, whose
// values stream into storage and so stay with each transport): HELLO/auth, PING, STATS, GET,
// EXISTS, LOOKUP_PREFIX, DELETE. Shared by the TCP connection (server/connection.cpp) and the
// UCX listener (server/ucx/ucx_listener.cpp) so both answer identically.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "server/context.h"
#include "transport/protocol.h"

namespace membrain::server {

struct Reply {
  uint32_t count = 0;
  proto::Status status = proto::Status::kOk;
  std::vector<uint8_t> body;    // reply payload before the values (GET: the item table)
  std::vector<ObjectRef> pins;  // GET: the hits, whose bytes follow the body in order
  bool close = false;           // frame-level refusal: send `status` with no body, then close
};

// Executes a request whose payload is complete. `ns`, `authed` and `grant` are the session
// state HELLO updates (grant: the token it authenticated with, when auth is on). Counts auth
// failures; the caller counts protocol errors when close is set.
Reply execute_request(ServerContext& ctx, const proto::Header& hdr, const uint8_t* payload, std::size_t len,
                      std::string* ns, bool* authed, const TokenGrant** grant);

// Constant-time comparison: the time taken depends on the lengths only, never on where the
// first differing byte is.
bool equal_constant_time(const uint8_t* a, std::size_t alen, const std::string& b);

}  // namespace membrain::server
