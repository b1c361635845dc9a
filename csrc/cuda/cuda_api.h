// The only doorway from host C++ to CUDA. Implemented by csrc/cuda/*.cu when the kernels are
// compiled, and by csrc/cuda/stub/cuda_stub.cpp otherwise, so callers never need #ifdefs.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

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

}  // namespace membrain::cuda
