#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/device_resources.h"

namespace membrain::cuda {
namespace {

// Metadata slots start at this size and grow in powers of two, so a handful of slots serves
// every call size after warm-up.
constexpr std::size_t kMinMetaBytes = 64 * 1024;
// Scratch the pool keeps cached across synchronizations instead of returning it to the driver.
// Bounded because vLLM hands most of the GPU to its KV cache; larger staged transfers still
// work, their excess is released when the pool next trims.
constexpr std::uint64_t kPoolReleaseThreshold = 256ull << 20;

std::size_t round_up_pow2(std::size_t v) {
  std::size_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

}  // namespace

DeviceResources& DeviceResources::get(int device) {
  // Deliberately never destroyed: it owns CUDA events, buffers and a memory pool, and static
  // destructors may run after the CUDA runtime has started unloading at interpreter exit.
  static auto& registry = *new std::vector<std::unique_ptr<DeviceResources>>();
  static std::mutex registry_mutex;
  std::lock_guard<std::mutex> lock(registry_mutex);
  if (registry.empty()) {
    int n = 0;
    MEMBRAIN_CUDA_CHECK(cudaGetDeviceCount(&n));
    registry.resize(static_cast<std::size_t>(n));
  }
  if (device < 0 || static_cast<std::size_t>(device) >= registry.size())
    throw std::invalid_argument("CUDA device " + std::to_string(device) + " does not exist (" +
                                std::to_string(registry.size()) + " present)");
  auto& slot = registry[static_cast<std::size_t>(device)];
  if (!slot) slot.reset(new DeviceResources(device));  // private constructor: no make_unique
  return *slot;
}

DeviceResources::DeviceResources(int device) : device_(device) {
  MEMBRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device));
  int pools_supported = 0;
  MEMBRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&pools_supported, cudaDevAttrMemoryPoolsSupported, device));
  if (pools_supported) {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool = nullptr;
    MEMBRAIN_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
    pool_.reset(pool);
    std::uint64_t threshold = kPoolReleaseThreshold;
    MEMBRAIN_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  }
}

int DeviceResources::ctas_per_sm(const void* kernel, int threads) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = occupancy_.find(kernel);
  if (it != occupancy_.end()) return it->second;
  int ctas = 0;
  MEMBRAIN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, threads, 0));
  ctas = std::max(ctas, 1);
  occupancy_.emplace(kernel, ctas);
  return ctas;
}

std::unique_ptr<DeviceResources::MetaLease> DeviceResources::lease_meta(std::size_t bytes,
                                                                        cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (std::size_t i = 0; i < meta_slots_.size(); ++i) {
    MetaSlot& s = *meta_slots_[i];
    if (s.leased || s.capacity < bytes) continue;
    const cudaError_t state = cudaEventQuery(s.done.get());
    if (state == cudaErrorNotReady) {
      cudaGetLastError();  // not an error: the slot is still being read by queued work
      continue;
    }
    MEMBRAIN_CUDA_CHECK(state);
    s.leased = true;
    return std::make_unique<MetaLease>(this, i, stream, s.host.get(), s.dev.get());
  }
  // All slots busy or too small: add one. Happens during warm-up or under deep concurrency;
  // old slots are kept (freeing device memory would synchronize the device).
  auto slot = std::make_unique<MetaSlot>();
  slot->capacity = round_up_pow2(std::max(bytes, kMinMetaBytes));
  void* host = nullptr;
  MEMBRAIN_CUDA_CHECK(cudaHostAlloc(&host, slot->capacity, cudaHostAllocPortable));
  slot->host.reset(host);
  void* dev = nullptr;
  MEMBRAIN_CUDA_CHECK(cudaMalloc(&dev, slot->capacity));
  slot->dev.reset(dev);
  cudaEvent_t ev = nullptr;
  MEMBRAIN_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  slot->done.reset(ev);
  slot->leased = true;
  meta_slots_.push_back(std::move(slot));
  const std::size_t i = meta_slots_.size() - 1;
  return std::make_unique<MetaLease>(this, i, stream, meta_slots_[i]->host.get(), meta_slots_[i]->dev.get());
}

void DeviceResources::return_meta(std::size_t slot, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  MetaSlot& s = *meta_slots_[slot];
  // Whatever was queued on the stream with this slot (the H2D copy, the kernel) precedes the
  // event. If recording fails the stream is unusable; keep the slot leased forever rather
  // than risk handing out memory that queued work may still read.
  if (cudaEventRecord(s.done.get(), stream) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  s.leased = false;
}

DeviceResources::MetaLease::~MetaLease() {
  owner_->return_meta(slot_, stream_);
}

std::unique_ptr<DeviceResources::Scratch> DeviceResources::try_alloc_scratch(std::size_t bytes,
                                                                             cudaStream_t stream) {
  void* p = nullptr;
  const cudaError_t err =
      pool_ ? cudaMallocFromPoolAsync(&p, bytes, pool_.get(), stream) : cudaMallocAsync(&p, bytes, stream);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    return nullptr;
  }
  MEMBRAIN_CUDA_CHECK(err);
  return std::make_unique<Scratch>(p, stream);
}

}  // namespace membrain::cuda
