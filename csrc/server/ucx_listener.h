// The server's UCX listener: a ucp_listener on a sockaddr beside the TCP port, answering the
// same protocol frames with the same request processing (server/request.h) against the same
// storage. It lives with the server (csrc/server/ucx/); the UCP plumbing it shares with the
// client is in csrc/transport/ucx/ucx_core.h, which knows nothing of the server. Deliberately
// free of UCX headers so the server compiles with or without UCX; when UCX is absent
// (csrc/server/ucx/stub) start() throws.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

namespace membrain::server {

struct ServerContext;

class UcxListener {
 public:
  // Creates the UCP context, worker and listener on host:port (0 = any free port) and starts
  // the progress thread. Throws std::runtime_error with UCX's reason on failure.
  static std::unique_ptr<UcxListener> start(ServerContext& ctx, const std::string& host, uint16_t port);
  virtual ~UcxListener() = default;
  virtual uint16_t port() const = 0;
  // Stops accepting, closes every endpoint and joins the progress thread. Idempotent.
  virtual void stop() = 0;
};

}  // namespace membrain::server
