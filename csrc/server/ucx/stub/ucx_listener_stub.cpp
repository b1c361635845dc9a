// Built when UCX is absent, in place of csrc/server/ucx/ucx_listener.cpp.
#include <stdexcept>

#include "server/ucx_listener.h"

namespace membrain::server {

std::unique_ptr<UcxListener> UcxListener::start(ServerContext&, const std::string&, uint16_t) {
  throw std::runtime_error("this membrain build has no UCX transport (rebuild with libucx-dev installed)");
}

}  // namespace membrain::server
