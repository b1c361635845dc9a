// Argument helpers shared by the CPU (ops_bindings.cpp) and CUDA (cuda_ops_bindings.cpp)
// gather/scatter bindings. Both take the same raw arguments from membrain/ops.py, so they must
// build the layout and check block ids identically; keeping one copy guarantees that.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/numpy.h>

#include "common/paged_layout.h"

namespace membrain::bindings {

// Block ids as a C-contiguous int64 array; forcecast converts other integer arrays/lists once.
using IdArray = pybind11::array_t<int64_t, pybind11::array::c_style | pybind11::array::forcecast>;

// The run description beyond (page_bytes, block_stride), as keyword arguments: kernel blocks per
// KV block and byte runs per kernel block with their strides. Defaults: a page is one run.
struct RunArgs {
  int64_t sub_count = 1;
  int64_t sub_stride = 0;
  int64_t run_count = 1;
  int64_t run_stride = 0;
};

inline PagedLayout make_layout(const std::vector<uintptr_t>& layer_ptrs, int64_t num_blocks,
                               int64_t page_bytes, int64_t block_stride, const RunArgs& runs) {
  return make_paged_layout(layer_ptrs, num_blocks, page_bytes, block_stride, runs.sub_count, runs.sub_stride,
                           runs.run_count, runs.run_stride);
}

// Pointer to the ids; the kernels index it as a flat list, so anything but 1-D is rejected.
inline const int64_t* id_data(const IdArray& ids) {
  if (ids.ndim() != 1)
    throw std::invalid_argument("block ids must be one-dimensional, got ndim=" + std::to_string(ids.ndim()));
  return ids.data();
}

}  // namespace membrain::bindings
