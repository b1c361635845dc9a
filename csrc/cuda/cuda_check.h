// Error handling and small RAII owners for CUDA runtime objects (only included by .cu files).
#pragma once
#include <memory>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

namespace membrain::cuda {

// Every CUDA call goes through this: a failure becomes a C++ exception naming the call, which
// pybind11 turns into a Python RuntimeError. cudaGetLastError() clears non-sticky errors so
// the next, unrelated call does not report this one again.
inline void check(cudaError_t err, const char* call, const char* file, int line) {
  if (err == cudaSuccess) return;
  cudaGetLastError();
  throw std::runtime_error(std::string("CUDA call ") + call + " failed: " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ") at " + file + ":" + std::to_string(line));
}

}  // namespace membrain::cuda

#define MEMBRAIN_CUDA_CHECK(call) ::membrain::cuda::check((call), #call, __FILE__, __LINE__)
// After a <<<>>> launch: launch-configuration errors only surface through cudaGetLastError.
#define MEMBRAIN_CUDA_CHECK_LAUNCH(name) ::membrain::cuda::check(cudaGetLastError(), name, __FILE__, __LINE__)

namespace membrain::cuda {

// Deleters ignore errors: they run on cleanup paths (including interpreter exit, after the
// runtime may have started unloading) where throwing is not an option.
struct DeviceFree {
  void operator()(void* p) const noexcept { cudaFree(p); }
};
struct PinnedHostFree {
  void operator()(void* p) const noexcept { cudaFreeHost(p); }
};
struct EventDestroy {
  void operator()(cudaEvent_t e) const noexcept { cudaEventDestroy(e); }
};
struct MemPoolDestroy {
  void operator()(cudaMemPool_t p) const noexcept { cudaMemPoolDestroy(p); }
};

using DeviceBuffer = std::unique_ptr<void, DeviceFree>;
using PinnedHostBuffer = std::unique_ptr<void, PinnedHostFree>;
using Event = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDestroy>;
using MemPool = std::unique_ptr<std::remove_pointer_t<cudaMemPool_t>, MemPoolDestroy>;

// Makes `device` current for the scope and restores the caller's device afterwards, so a call
// from a thread that torch set to another device leaves that thread as it found it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    MEMBRAIN_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) MEMBRAIN_CUDA_CHECK(cudaSetDevice(device));
    current_ = device;
  }
  ~DeviceGuard() {
    if (previous_ != current_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  int current_ = 0;
};

}  // namespace membrain::cuda
