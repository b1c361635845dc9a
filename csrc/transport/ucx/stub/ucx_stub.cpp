// Built when UCX is absent; the UCX layer replaces this folder's role with csrc/transport/ucx/*.cpp.
#include <stdexcept>

#include "transport/ucx/ucx_server.h"

namespace membrain::ucx {
bool compiled() {
  return false;
}

std::unique_ptr<UcxServer> UcxServer::start(server::ServerContext&, const std::string&, uint16_t) {
  throw std::runtime_error("this membrain build has no UCX transport (rebuild with libucx-dev installed)");
}
}  // namespace membrain::ucx
