#include <stdexcept>
#include <string_view>

#include "bindings/registry.h"
#include "common/checksum.h"

namespace py = pybind11;

namespace membrain::bindings {
void register_checksum(py::module_& m) {
  m.def(
      "checksum64",
      [](py::buffer data, uint64_t seed) {
        py::buffer_info info = data.request();
        if (info.ndim > 1) {
          // Strided views would hash bytes the caller did not mean; require a flat run.
          bool contiguous = true;
          py::ssize_t expected = info.itemsize;
          for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
            if (info.shape[d] > 1 && info.strides[d] != expected) contiguous = false;
            expected *= info.shape[d];
          }
          if (!contiguous) throw std::invalid_argument("checksum64 needs a C-contiguous buffer");
        }
        const std::size_t bytes = static_cast<std::size_t>(info.size) * info.itemsize;
        py::gil_scoped_release release;
        return checksum64(info.ptr, bytes, seed);
      },
      py::arg("data"), py::arg("seed") = 0, "XXH3-64 of a contiguous buffer (GIL released while hashing).");
  m.def(
      "checksum64_ptr",
      [](uintptr_t ptr, std::size_t bytes, uint64_t seed) {
        if (ptr == 0 && bytes != 0)
          throw std::invalid_argument("checksum64_ptr: null pointer with non-zero length");
        py::gil_scoped_release release;
        return checksum64(reinterpret_cast<const void*>(ptr), bytes, seed);
      },
      py::arg("ptr"), py::arg("nbytes"), py::arg("seed") = 0,
      "XXH3-64 of host memory at a raw address (for torch tensors via data_ptr()).");
  m.def(
      "_checksum64_all_paths",
      [](const py::bytes& data, uint64_t seed) {
        const std::string_view v = data;
        py::dict out;
        for (const auto& [name, h] : checksum64_all_paths(v.data(), v.size(), seed)) out[py::str(name)] = h;
        return out;
      },
      py::arg("data"), py::arg("seed") = 0,
      "Test hook: the XXH3-64 of `data` from each implementation usable on this CPU, by name.");
}
}  // namespace membrain::bindings
