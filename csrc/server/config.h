// Server configuration: everything the C++ data plane needs, validated once at the binding
// boundary (bindings/server_bindings.cpp) so the event loops can trust it.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "transport/protocol.h"

namespace membrain::server {

// A token and the namespaces it opens: glob patterns over namespace names (`*` any run, `?` one
// character). A token whose patterns include "*" reaches every namespace and all statistics.
struct TokenGrant {
  std::string token;
  std::vector<std::string> namespaces;
  bool all() const;
  bool allows(std::string_view ns) const;
};

// Glob match of a namespace name against a pattern ('*' and '?').
bool glob_match(std::string_view pattern, std::string_view s);

struct ServerConfig {
  std::string host = "127.0.0.1";
  uint16_t port = 9201;                    // 0 = let the kernel pick
  int ucx_port = -1;                       // UCX listener beside TCP: -1 = off, 0 = pick a free port
  uint64_t capacity_bytes = 256ull << 20;  // hard bound on value storage (one reserved region)
  uint64_t slab_bytes = 0;                 // 0 = derive from capacity (see SlabAllocator::auto_slab_bytes)
  int threads = 2;                         // event-loop workers, each with its own epoll
  int max_connections = 1024;              // excess connections are accepted and closed at once
  double idle_timeout_s = 60.0;            // no traffic, or one frame taking longer, closes the connection
  double ttl_s = 0.0;                      // 0 = objects never expire
  std::string auth_token;                  // one token for every namespace (kept in `tokens` as "*")
  std::vector<TokenGrant> tokens;          // per-namespace tokens; none (and no auth_token) = no auth
  double auth_timeout_s = 10.0;            // auth on: a connection not authenticated by then is closed
  bool prefault = true;                    // back the storage region with memory in the background at start
  int socket_buffer_bytes = 4 << 20;       // SO_RCVBUF (listener, inherited) and SO_SNDBUF; 0 = autotuning
  uint64_t output_backlog_bytes = 8ull << 20;  // stop reading a connection while this much reply is queued
  // Reply bytes one connection may have queued and unsent (GET values stay pinned until sent);
  // past it the connection is closed, like Redis' client-output-buffer-limit.
  uint64_t max_reply_bytes_per_connection = 1ull << 30;
  // PUT value bytes reserved in storage but not yet received (declared, not arrived): bounded
  // per connection and in total, so clients that declare values and stall cannot make the
  // server evict or hold more than this. 0 = default: per connection max_value_bytes, in total
  // max(max_value_bytes, capacity / 4).
  uint64_t max_pending_put_bytes = 0;
  uint64_t max_pending_put_bytes_per_connection = 0;
  proto::Limits limits;
  std::string eviction_policy = "slru";  // make_eviction_policy(): "lru" or "slru"
  // Retention priority by namespace glob, first match wins (0..3; eviction_policy.h).
  std::vector<std::pair<std::string, uint8_t>> namespace_priority;

  bool auth_enabled() const { return !tokens.empty(); }  // after validation, auth_token is in tokens
};

}  // namespace membrain::server
