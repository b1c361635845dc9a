// Placeholder: filled in by the layer that owns these bindings.
#include "bindings/registry.h"

namespace membrain::bindings {
void register_transport(pybind11::module_&) {}
}  // namespace membrain::bindings
