// The only doorway from host C++ to CUDA. Implemented by csrc/cuda/*.cu when the kernels are
// compiled, and by csrc/cuda/stub/cuda_stub.cpp otherwise, so callers never need #ifdefs.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/paged_layout.h"

namespace membrain::cuda {

// True when this build compiled the CUDA kernels.
bool compiled();
// Number of usable devices; 0 without a driver or device (never throws).
int device_count();
// Device name, e.g. "NVIDIA H100 80GB HBM3"; throws std::out_of_range for a bad ordinal.
std::string device_name(int device);

// Page-locks [ptr, ptr+bytes) for DMA (cudaHostRegister, portable + mapped). Returns false
// (never throws) when there is no device or the driver refuses; the memory stays usable.
bool host_register(void* ptr, std::size_t bytes);
void host_unregister(void* ptr);
// Page-locked, mapped allocation (cudaHostAlloc); nullptr when unavailable.
void* host_alloc_pinned(std::size_t bytes);
void host_free_pinned(void* ptr);

// How a gather/scatter reaches a packed buffer that lives in pinned host memory (ignored when
// the packed buffer is device memory):
//   kMapped: the kernel reads/writes the host bytes directly through the mapped pointer;
//   kStaged: the kernel uses a device scratch buffer and one cudaMemcpyAsync moves it;
//   kAuto:   default_host_mode(), falling back to kMapped when the scratch cannot be allocated.
enum class HostMode { kAuto, kMapped, kStaged };
// "auto" | "mapped" | "staged"; throws std::invalid_argument otherwise.
HostMode parse_host_mode(const std::string& mode);
const char* host_mode_name(HostMode mode);
// What kAuto resolves to (one constant in csrc/cuda/gather_scatter.cu, set from benchmarks).
HostMode default_host_mode();

// One kernel launch on `stream` (a cudaStream_t as an integer; 0 = legacy default stream) for
// all (block, layer) pages; returns once the work is enqueued. `layout` describes device
// memory on `device`; the packed side is device memory on `device` or pinned host memory
// (pageable host memory -> std::invalid_argument). Everything is validated before anything is
// enqueued: bad ids -> std::out_of_range, sizes/pointers/devices -> std::invalid_argument,
// CUDA failures -> std::runtime_error naming the call.
void gather(const PagedLayout& layout, const int64_t* ids, std::size_t n_ids, void* out,
            std::size_t out_bytes, int device, std::uintptr_t stream, HostMode mode);
// The exact inverse; with duplicate ids the last occurrence wins (resolved on the host).
void scatter(const void* src, std::size_t src_bytes, const PagedLayout& layout, const int64_t* ids,
             std::size_t n_ids, int device, std::uintptr_t stream, HostMode mode);
// cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream) on `device` (benchmark limits).
void memcpy_async(void* dst, const void* src, std::size_t bytes, int device, std::uintptr_t stream);

}  // namespace membrain::cuda
