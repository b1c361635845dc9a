// Per-device state the gather/scatter launches reuse: SM count, cached occupancy, a pool of
// small metadata staging buffers, and a stream-ordered memory pool for larger scratch.
//
// Nothing here synchronizes a stream or the device on the hot path. Reuse is ordered by CUDA
// events (metadata) or by the stream-ordered allocator (scratch), so concurrent calls on
// different streams never share a buffer that one of them may still read.
#pragma once
#include <cstddef>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <cuda_runtime.h>

#include "cuda/cuda_check.h"

namespace membrain::cuda {

class DeviceResources {
 public:
  // The state of `device`, created on first use. The caller must have made `device` current
  // (DeviceGuard) and checked the ordinal.
  static DeviceResources& get(int device);

  int device() const { return device_; }
  int sm_count() const { return sm_count_; }
  // Resident CTAs per SM for `kernel` at `threads` threads; computed once per kernel.
  int ctas_per_sm(const void* kernel, int threads);

  // A pinned host buffer and a device buffer of at least `bytes` each, exclusively the lease
  // holder's. On destruction the lease records an event on its stream; the pair is handed out
  // again only once that event has completed, i.e. once the stream has consumed the
  // metadata, so the host may rewrite it without any synchronization.
  class MetaLease {
   public:
    MetaLease(DeviceResources* owner, std::size_t slot, cudaStream_t stream, void* host, void* dev)
        : owner_(owner), slot_(slot), stream_(stream), host_(host), dev_(dev) {}
    ~MetaLease();
    MetaLease(const MetaLease&) = delete;
    MetaLease& operator=(const MetaLease&) = delete;
    void* host() const { return host_; }
    void* dev() const { return dev_; }

   private:
    DeviceResources* owner_;
    std::size_t slot_;
    cudaStream_t stream_;
    void* host_;
    void* dev_;
  };
  std::unique_ptr<MetaLease> lease_meta(std::size_t bytes, cudaStream_t stream);

  // Device scratch from this device's memory pool, allocated and freed in stream order
  // (cudaMallocFromPoolAsync / cudaFreeAsync on the same stream), so its lifetime follows
  // the work queued on the stream rather than the host call.
  class Scratch {
   public:
    Scratch(void* ptr, cudaStream_t stream) : ptr_(ptr), stream_(stream) {}
    ~Scratch() {
      if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    void* get() const { return ptr_; }

   private:
    void* ptr_;
    cudaStream_t stream_;
  };
  // nullptr when the pool cannot supply `bytes` (out of memory); throws on other errors.
  std::unique_ptr<Scratch> try_alloc_scratch(std::size_t bytes, cudaStream_t stream);

 private:
  explicit DeviceResources(int device);

  struct MetaSlot {
    PinnedHostBuffer host;
    DeviceBuffer dev;
    Event done;  // recorded after the last launch that read this slot
    std::size_t capacity = 0;
    bool leased = false;
  };
  void return_meta(std::size_t slot, cudaStream_t stream);

  int device_;
  int sm_count_ = 0;
  MemPool pool_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<MetaSlot>> meta_slots_;
  std::unordered_map<const void*, int> occupancy_;
};

}  // namespace membrain::cuda
