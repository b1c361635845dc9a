#include "bindings/registry.h"

PYBIND11_MODULE(_native, m) {
  m.doc() = "Membrain native core: KV page gather/scatter, host block pool, checksums, transport, server";
  using namespace membrain::bindings;
  register_info(m);
  register_checksum(m);
  register_ops(m);
  register_cuda_ops(m);
  register_pool(m);
  register_transport(m);
  register_server(m);
  register_ucx(m);
  register_policy(m);
  register_redis(m);
}
