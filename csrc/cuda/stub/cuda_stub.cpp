// Built instead of the .cu files when CUDA is off: every answer is "no CUDA here".
#include <stdexcept>
#include <string>

#include "cuda/cuda_api.h"

namespace membrain::cuda {
bool compiled() {
  return false;
}
int device_count() {
  return 0;
}
std::string device_name(int device) {
  throw std::out_of_range("CUDA device " + std::to_string(device) +
                          " does not exist: this build of membrain._native has no CUDA support");
}
bool host_register(void*, std::size_t) {
  return false;
}
void host_unregister(void*) {}
void* host_alloc_pinned(std::size_t) {
  return nullptr;
}
void host_free_pinned(void*) {}

namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw std::runtime_error(std::string(what) + ": this build of membrain._native has no CUDA support");
}
}  // namespace

HostMode parse_host_mode(const std::string&) {
  no_cuda("parse_host_mode");
}
const char* host_mode_name(HostMode) {
  return "none";
}
HostMode default_host_mode() {
  return HostMode::kAuto;
}
void gather(const PagedLayout&, const int64_t*, std::size_t, void*, std::size_t, int, std::uintptr_t,
            HostMode) {
  no_cuda("gather_cuda");
}
void scatter(const void*, std::size_t, const PagedLayout&, const int64_t*, std::size_t, int, std::uintptr_t,
             HostMode) {
  no_cuda("scatter_cuda");
}
void memcpy_async(void*, const void*, std::size_t, int, std::uintptr_t) {
  no_cuda("cuda_memcpy");
}
}  // namespace membrain::cuda
