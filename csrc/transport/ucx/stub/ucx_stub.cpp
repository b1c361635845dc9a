// Built when UCX is absent; the UCX layer replaces this folder's role with csrc/transport/ucx/*.cpp.
namespace membrain::ucx {
bool compiled() { return false; }
}  // namespace membrain::ucx
