// Placeholder: filled in by the layer that owns these bindings.
#include "bindings/registry.h"

namespace membrain::bindings {
void register_cuda_ops(pybind11::module_&) {}
}  // namespace membrain::bindings
