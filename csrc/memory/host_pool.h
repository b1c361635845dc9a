// One large host region carved into equal slots. The region is mapped once (huge pages when
// the kernel allows) and page-locked for DMA when a CUDA device is present, so the host tier
// and the transport never allocate or pin memory on the hot path.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

namespace membrain {

class HostPool : public std::enable_shared_from_this<HostPool> {
 public:
  struct Options {
    std::size_t slot_bytes = 0;
    std::size_t num_slots = 0;
    bool pin = true;         // cudaHostRegister when a device is present
    bool huge_pages = true;  // MADV_HUGEPAGE on the region
  };

  static std::shared_ptr<HostPool> create(const Options& options);
  ~HostPool();
  HostPool(const HostPool&) = delete;
  HostPool& operator=(const HostPool&) = delete;

  // A free slot with refcount 1, or nullopt when every slot is in use.
  std::optional<uint32_t> try_acquire();
  // All n slots or none.
  std::optional<std::vector<uint32_t>> try_acquire_many(std::size_t n);
  void retain(uint32_t slot);
  // Drops one reference; the slot is free again when the count reaches zero.
  void release(uint32_t slot);
  uint32_t refcount(uint32_t slot) const;
  // Backs slots [first, first + count) with memory now (write faults taken here, not on the
  // first copy into them); contents are unchanged, so slots in use may be included. Returns the
  // bytes populated. Safe to call from any thread while the pool is in use.
  std::size_t prefault(std::size_t first, std::size_t count);

  uint8_t* slot_data(uint32_t slot) const;
  std::size_t slot_bytes() const { return slot_bytes_; }
  std::size_t num_slots() const { return num_slots_; }
  std::size_t free_slots() const;
  std::size_t region_bytes() const { return region_bytes_; }
  uint8_t* region() const { return region_; }
  bool pinned() const { return pinned_; }
  bool huge_pages() const { return huge_pages_; }

 private:
  HostPool() = default;
  void check_slot(uint32_t slot) const;

  uint8_t* region_ = nullptr;
  std::size_t region_bytes_ = 0;
  std::size_t slot_bytes_ = 0;   // as configured
  std::size_t slot_stride_ = 0;  // slot_bytes rounded up to a page
  std::size_t num_slots_ = 0;
  bool pinned_ = false;
  bool huge_pages_ = false;
  mutable std::mutex mutex_;
  std::vector<uint32_t> free_list_;
  std::unique_ptr<std::atomic<uint32_t>[]> refcounts_;
};

}  // namespace membrain
