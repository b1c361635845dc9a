// Built instead of the .cu files when CUDA is off: every answer is "no CUDA here".
#include <stdexcept>
#include <string>

#include "cuda/cuda_api.h"

namespace membrain::cuda {
bool compiled() { return false; }
int device_count() { return 0; }
std::string device_name(int device) {
  throw std::out_of_range("CUDA device " + std::to_string(device) +
                          " does not exist: this build of membrain._native has no CUDA support");
}
bool host_register(void*, std::size_t) { return false; }
void host_unregister(void*) {}
void* host_alloc_pinned(std::size_t) { return nullptr; }
void host_free_pinned(void*) {}
}  // namespace membrain::cuda
