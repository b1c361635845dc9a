// Each layer registers its own Python bindings; module.cpp only calls these in order.
#pragma once
#include <pybind11/pybind11.h>

namespace membrain::bindings {
void register_info(pybind11::module_& m);       // info_bindings.cpp
void register_checksum(pybind11::module_& m);   // checksum_bindings.cpp
void register_ops(pybind11::module_& m);        // ops_bindings.cpp (CPU gather/scatter)
void register_cuda_ops(pybind11::module_& m);   // cuda_ops_bindings.cpp (CUDA gather/scatter)
void register_pool(pybind11::module_& m);       // pool_bindings.cpp
void register_transport(pybind11::module_& m);  // transport_bindings.cpp (client connections)
void register_server(pybind11::module_& m);     // server_bindings.cpp
void register_ucx(pybind11::module_& m);        // ucx_bindings.cpp
void register_policy(pybind11::module_& m);     // policy_bindings.cpp
void register_redis(pybind11::module_& m);      // redis_bindings.cpp (Redis GET reply reader)
}  // namespace membrain::bindings
