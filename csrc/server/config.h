// Server configuration: everything the C++ data plane needs, validated once at the binding
// boundary (bindings/server_bindings.cpp) so the event loops can trust it.
#pragma once
#include <cstdint>
#include <string>

#include "transport/protocol.h"

namespace membrain::server {

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
  std::string auth_token;                  // empty = no authentication
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
};

}  // namespace membrain::server
