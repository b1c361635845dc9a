#include <pybind11/stl.h>

#include "bindings/registry.h"
#include "cuda/cuda_api.h"

namespace py = pybind11;

namespace membrain::bindings {
void register_info(py::module_& m) {
  m.def(
      "native_info",
      []() {
        py::dict info;
        info["version"] = MEMBRAIN_VERSION;
        info["cuda_compiled"] = cuda::compiled();
        const int devices = cuda::device_count();
        info["cuda_devices"] = devices;
        py::list names;
        for (int d = 0; d < devices; ++d) names.append(cuda::device_name(d));
        info["cuda_device_names"] = names;
        info["ucx"] = static_cast<bool>(MEMBRAIN_WITH_UCX);
        return info;
      },
      "Build and runtime facts: version, cuda_compiled, cuda_devices, cuda_device_names, ucx.");
}
}  // namespace membrain::bindings
