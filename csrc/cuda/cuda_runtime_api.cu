// Device discovery and host-memory pinning through the CUDA runtime.
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

#include "cuda/cuda_api.h"

namespace membrain::cuda {

bool compiled() {
  return true;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the sticky error, report none
    return 0;
  }
  return n;
}

std::string device_name(int device) {
  if (device < 0 || device >= device_count())
    throw std::out_of_range("CUDA device " + std::to_string(device) + " does not exist (" +
                            std::to_string(device_count()) + " present)");
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("cudaGetDeviceProperties failed for device " + std::to_string(device));
  }
  return prop.name;
}

bool host_register(void* ptr, std::size_t bytes) {
  if (cudaHostRegister(ptr, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return true;
}

void host_unregister(void* ptr) {
  if (cudaHostUnregister(ptr) != cudaSuccess) cudaGetLastError();
}

void* host_alloc_pinned(std::size_t bytes) {
  void* p = nullptr;
  if (cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return p;
}

void host_free_pinned(void* ptr) {
  if (ptr != nullptr && cudaFreeHost(ptr) != cudaSuccess) cudaGetLastError();
}

}  // namespace membrain::cuda
