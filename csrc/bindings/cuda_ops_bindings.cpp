// Raw-pointer entry points for the CUDA gather/scatter. membrain/ops.py turns tensors into
// these arguments. They are registered only when the kernels are compiled, so Python can
// test `hasattr(_native, "gather_cuda")` instead of catching "no CUDA" errors.
#include <stdexcept>

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings/layout_args.h"
#include "bindings/registry.h"
#include "cuda/cuda_api.h"

namespace py = pybind11;

namespace membrain::bindings {
void register_cuda_ops(py::module_& m) {
  m.attr("cuda_default_host_mode") =
      cuda::compiled() ? cuda::host_mode_name(cuda::default_host_mode()) : "none";
  if (!cuda::compiled()) return;

  m.def(
      "gather_cuda",
      [](const std::vector<uintptr_t>& layer_ptrs, int64_t num_blocks, int64_t page_bytes,
         int64_t block_stride, const IdArray& ids, uintptr_t out_ptr, std::size_t out_bytes, int device,
         uintptr_t stream, const std::string& mode, int64_t sub_count, int64_t sub_stride, int64_t run_count,
         int64_t run_stride) {
        const PagedLayout layout = make_layout(layer_ptrs, num_blocks, page_bytes, block_stride,
                                               {sub_count, sub_stride, run_count, run_stride});
        const int64_t* id_ptr = id_data(ids);
        const std::size_t n = static_cast<std::size_t>(ids.shape(0));
        const cuda::HostMode host_mode = cuda::parse_host_mode(mode);
        py::gil_scoped_release release;
        cuda::gather(layout, id_ptr, n, reinterpret_cast<void*>(out_ptr), out_bytes, device, stream,
                     host_mode);
      },
      py::arg("layer_ptrs"), py::arg("num_blocks"), py::arg("page_bytes"), py::arg("block_stride"),
      py::arg("block_ids"), py::arg("out_ptr"), py::arg("out_bytes"), py::arg("device"), py::arg("stream"),
      py::arg("mode") = "auto", py::arg("sub_count") = 1, py::arg("sub_stride") = 0, py::arg("run_count") = 1,
      py::arg("run_stride") = 0,
      "Enqueues one gather kernel on `stream` (cudaStream_t as int). out: device or pinned host memory; mode "
      "('auto'|'mapped'|'staged') applies to pinned host memory.");
  m.def(
      "scatter_cuda",
      [](uintptr_t src_ptr, std::size_t src_bytes, const std::vector<uintptr_t>& layer_ptrs,
         int64_t num_blocks, int64_t page_bytes, int64_t block_stride, const IdArray& ids, int device,
         uintptr_t stream, const std::string& mode, int64_t sub_count, int64_t sub_stride, int64_t run_count,
         int64_t run_stride) {
        const PagedLayout layout = make_layout(layer_ptrs, num_blocks, page_bytes, block_stride,
                                               {sub_count, sub_stride, run_count, run_stride});
        const int64_t* id_ptr = id_data(ids);
        const std::size_t n = static_cast<std::size_t>(ids.shape(0));
        const cuda::HostMode host_mode = cuda::parse_host_mode(mode);
        py::gil_scoped_release release;
        cuda::scatter(reinterpret_cast<const void*>(src_ptr), src_bytes, layout, id_ptr, n, device, stream,
                      host_mode);
      },
      py::arg("src_ptr"), py::arg("src_bytes"), py::arg("layer_ptrs"), py::arg("num_blocks"),
      py::arg("page_bytes"), py::arg("block_stride"), py::arg("block_ids"), py::arg("device"),
      py::arg("stream"), py::arg("mode") = "auto", py::arg("sub_count") = 1, py::arg("sub_stride") = 0,
      py::arg("run_count") = 1, py::arg("run_stride") = 0,
      "The inverse of gather_cuda; duplicate ids: the last occurrence wins.");
  m.def(
      "cuda_memcpy",
      [](uintptr_t dst, uintptr_t src, std::size_t nbytes, int device, uintptr_t stream) {
        py::gil_scoped_release release;
        cuda::memcpy_async(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes, device,
                           stream);
      },
      py::arg("dst_ptr"), py::arg("src_ptr"), py::arg("nbytes"), py::arg("device"), py::arg("stream"),
      "cudaMemcpyAsync(cudaMemcpyDefault) on `stream`: the contiguous-copy limit for benchmarks.");
}
}  // namespace membrain::bindings
