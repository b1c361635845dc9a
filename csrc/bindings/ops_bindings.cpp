// Raw-pointer entry points for the CPU gather/scatter. membrain/ops.py turns tensors into
// these arguments; this layer re-validates everything because it is callable directly.
#include <stdexcept>

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings/layout_args.h"
#include "bindings/registry.h"
#include "cpu/gather_scatter.h"
#include "cpu/thread_pool.h"

namespace py = pybind11;

namespace membrain::bindings {
void register_ops(py::module_& m) {
  m.def(
      "gather_cpu",
      [](const std::vector<uintptr_t>& layer_ptrs, int64_t num_blocks, int64_t page_bytes,
         int64_t block_stride, const IdArray& ids, uintptr_t out_ptr, std::size_t out_bytes,
         int64_t sub_count, int64_t sub_stride, int64_t run_count, int64_t run_stride,
         std::size_t max_threads) {
        const PagedLayout layout = make_layout(layer_ptrs, num_blocks, page_bytes, block_stride,
                                               {sub_count, sub_stride, run_count, run_stride});
        const int64_t* id_ptr = id_data(ids);
        const std::size_t n = static_cast<std::size_t>(ids.shape(0));
        py::gil_scoped_release release;
        cpu::gather(layout, id_ptr, n, reinterpret_cast<void*>(out_ptr), out_bytes, max_threads);
      },
      py::arg("layer_ptrs"), py::arg("num_blocks"), py::arg("page_bytes"), py::arg("block_stride"),
      py::arg("block_ids"), py::arg("out_ptr"), py::arg("out_bytes"), py::arg("sub_count") = 1,
      py::arg("sub_stride") = 0, py::arg("run_count") = 1, py::arg("run_stride") = 0,
      py::arg("max_threads") = 0);
  m.def(
      "scatter_cpu",
      [](uintptr_t src_ptr, std::size_t src_bytes, const std::vector<uintptr_t>& layer_ptrs,
         int64_t num_blocks, int64_t page_bytes, int64_t block_stride, const IdArray& ids, int64_t sub_count,
         int64_t sub_stride, int64_t run_count, int64_t run_stride, std::size_t max_threads) {
        const PagedLayout layout = make_layout(layer_ptrs, num_blocks, page_bytes, block_stride,
                                               {sub_count, sub_stride, run_count, run_stride});
        const int64_t* id_ptr = id_data(ids);
        const std::size_t n = static_cast<std::size_t>(ids.shape(0));
        py::gil_scoped_release release;
        cpu::scatter(reinterpret_cast<const void*>(src_ptr), src_bytes, layout, id_ptr, n, max_threads);
      },
      py::arg("src_ptr"), py::arg("src_bytes"), py::arg("layer_ptrs"), py::arg("num_blocks"),
      py::arg("page_bytes"), py::arg("block_stride"), py::arg("block_ids"), py::arg("sub_count") = 1,
      py::arg("sub_stride") = 0, py::arg("run_count") = 1, py::arg("run_stride") = 0,
      py::arg("max_threads") = 0);
  m.def(
      "describe_paged_layout",
      [](const std::vector<uintptr_t>& layer_ptrs, int64_t num_blocks, int64_t page_bytes,
         int64_t block_stride, int64_t sub_count, int64_t sub_stride, int64_t run_count, int64_t run_stride) {
        const PagedLayout merged =
            merge_page_runs(make_layout(layer_ptrs, num_blocks, page_bytes, block_stride,
                                        {sub_count, sub_stride, run_count, run_stride}));
        py::dict d;
        d["sub_count"] = merged.sub_count;
        d["sub_stride"] = merged.sub_stride;
        d["run_count"] = merged.run_count;
        d["run_stride"] = merged.run_stride;
        d["run_bytes"] = merged.run_bytes;
        d["block_is_one_run"] = block_is_one_run(merged);
        return d;
      },
      py::arg("layer_ptrs"), py::arg("num_blocks"), py::arg("page_bytes"), py::arg("block_stride"),
      py::arg("sub_count") = 1, py::arg("sub_stride") = 0, py::arg("run_count") = 1,
      py::arg("run_stride") = 0,
      "Validates a run description exactly as gather/scatter do (layer_ptrs may be offsets: nothing is "
      "read) and returns it merged into the fewest runs, plus whether a block of all layers is one run.");
  m.def(
      "memcpy_cpu",
      [](uintptr_t dst, uintptr_t src, std::size_t bytes, bool streaming) {
        py::gil_scoped_release release;
        cpu::parallel_memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes,
                             streaming);
      },
      py::arg("dst_ptr"), py::arg("src_ptr"), py::arg("nbytes"), py::arg("streaming") = false,
      "Contiguous copy on the gather thread pool (the benchmark's limit).");
  m.def(
      "set_num_threads",
      [](std::size_t n) {
        py::gil_scoped_release release;
        cpu::set_num_threads(n);
      },
      py::arg("n"), "Threads used by CPU gather/scatter; 0 restores the default.");
  m.def("get_num_threads", &cpu::num_threads);
}
}  // namespace membrain::bindings
