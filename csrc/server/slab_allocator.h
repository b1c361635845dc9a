// Value memory for the server: ONE anonymous mapping of exactly `capacity` bytes (rounded down
// to whole slabs), reserved up front with MAP_NORESERVE and touched lazily. Because every value
// byte lives inside that mapping, the data can never exceed --capacity, whatever happens to
// pins, pending PUTs or eviction - the bound is structural, not bookkeeping.
//
// The region is cut into fixed slabs. A slab, when first needed, is given to one size class
// and carved into equal chunks; classes are power-of-two-ish (2^k x {1, 1.25, 1.5, 1.75}, so at
// most ~20% of a chunk is wasted and exact powers of two - typical KV block sizes - waste
// nothing). A value larger than a slab takes a run of contiguous slabs. A slab whose last chunk
// is freed goes back to the free pool (its pages stay mapped for the next value), so memory
// flows between classes as the workload changes. The allocator never evicts: when a class has
// no free chunk and no slab is free, Storage decides whether to empty another class's slab
// (see Storage::reclaim_slab_locked) so the slab comes back here and the class can take it.
//
// Bookkeeping is charged here too: every object (index entry, key copies, the object itself)
// costs heap memory outside the region, so Storage charges each object's overhead with
// charge_meta(). Charged bytes are backed by whole slabs lent from the region ("meta slabs"):
// their pages are handed back to the kernel (MADV_DONTNEED) and no value may use them, so
// region pages in use + heap bookkeeping stay within capacity whatever the value sizes (600,000
// empty values no longer grow RSS by 300 MiB in a 1 MiB server).
//
// Thread-safe; the mutex is a leaf lock (nothing else is locked while it is held), so objects
// may free their chunk from any thread, including while the storage lock is held.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <set>
#include <vector>

namespace membrain::server {

class SlabAllocator {
 public:
  static constexpr uint32_t kNoClass = 0xFFFFFFFFu;
  static constexpr uint32_t kMetaClass = 0xFFFFFFFEu;  // a slab lent to bookkeeping
  static constexpr uint64_t kMinChunk = 64;

  struct Chunk {
    uint8_t* data = nullptr;
    uint64_t bytes = 0;         // chunk size (>= the value it holds)
    uint32_t klass = kNoClass;  // size class, or large_class() for slab runs
    uint32_t slab = 0;          // first slab
    uint32_t nslabs = 0;        // > 0 only for slab runs
  };

  // Picks a slab size for a capacity: capacity/64 rounded down to a power of two, clamped to
  // [64 KiB, 4 MiB], so small test servers still have dozens of slabs to share between classes.
  static uint64_t auto_slab_bytes(uint64_t capacity);

  SlabAllocator(uint64_t capacity, uint64_t slab_bytes);
  ~SlabAllocator();
  SlabAllocator(const SlabAllocator&) = delete;
  SlabAllocator& operator=(const SlabAllocator&) = delete;

  // A chunk for `bytes` (> 0), or nullopt when no free chunk or slab fits; never evicts.
  std::optional<Chunk> allocate(uint64_t bytes);
  void free(const Chunk& c);

  // Charges `bytes` of bookkeeping against capacity. False when the meta slabs are full and no
  // free slab is left to lend (the caller evicts and tries again); never evicts.
  bool charge_meta(uint64_t bytes);
  // Returns a charge; meta slabs go back to the free pool beyond one slab of slack (so a cache
  // hovering at a boundary does not lend and return a slab each time), all once nothing is charged.
  void uncharge_meta(uint64_t bytes);
  uint64_t meta_bytes() const;
  uint64_t meta_slabs() const;

  // Per slab, for choosing what to evict: its class (kNoClass free, kMetaClass lent to
  // bookkeeping, large_class() for runs), chunks handed out, and for a run's slabs the first one.
  struct SlabState {
    uint32_t klass = kNoClass;
    uint32_t used = 0;
    uint32_t run_first = kNoClass;  // runs: the slab the run starts at
  };
  void snapshot(std::vector<SlabState>* out) const;

  // Size class a value of `bytes` would use (large_class() for slab runs).
  uint32_t class_of(uint64_t bytes) const;
  uint32_t num_classes() const { return static_cast<uint32_t>(class_sizes_.size()) + 1; }
  uint32_t large_class() const { return static_cast<uint32_t>(class_sizes_.size()); }

  // Chunks handed out from slab `slab` (1 for the first slab of a run, 0 for a free slab). The
  // storage compares it with the objects it can see in that slab to know whether evicting them
  // all would really empty the slab (pending PUTs and pinned, evicted values hold chunks too).
  uint32_t chunks_used(uint32_t slab) const;
  uint64_t num_slabs() const { return num_slabs_; }

  uint64_t capacity() const { return num_slabs_ * slab_bytes_; }
  uint64_t slab_bytes() const { return slab_bytes_; }
  uint64_t max_allocation() const { return capacity(); }
  // Bytes of slabs given to classes or runs (what RSS may hold for data).
  uint64_t slab_bytes_in_use() const;
  // Bytes of chunks handed out (>= the values stored in them).
  uint64_t chunk_bytes_in_use() const;

  // Backs the whole region with memory ahead of use (run on a background thread), so PUTs
  // do not pay first-touch page faults inside recv(). Returns early when `stop` turns true.
  void prefault(const std::atomic<bool>& stop);
  uint64_t prefaulted_bytes() const { return prefaulted_bytes_.load(std::memory_order_relaxed); }

 private:
  struct Slab {
    uint32_t klass = kNoClass;  // kNoClass = free
    uint32_t used = 0;          // chunks handed out
    uint32_t next_unused = 0;   // chunks [next_unused, capacity) never handed out yet
    uint32_t run = 0;           // slabs in the run this slab starts (runs only)
    std::vector<uint32_t> free_chunks;
  };

  std::optional<uint32_t> take_free_slab_locked();
  std::optional<uint32_t> take_free_run_locked(uint32_t n);
  void release_slab_locked(uint32_t first, uint32_t n);

  uint8_t* region_ = nullptr;
  uint64_t region_bytes_ = 0;
  uint64_t slab_bytes_ = 0;
  uint64_t num_slabs_ = 0;
  std::vector<uint64_t> class_sizes_;

  mutable std::mutex mutex_;
  std::vector<Slab> slabs_;
  std::set<uint32_t> free_slabs_;            // ordered: runs are found by scanning for neighbours
  std::vector<std::set<uint32_t>> partial_;  // per class: slabs with a free chunk
  uint64_t slabs_in_use_ = 0;
  uint64_t chunk_bytes_in_use_ = 0;
  std::atomic<uint64_t> prefaulted_bytes_{0};
  uint64_t meta_bytes_ = 0;           // bookkeeping charged
  std::vector<uint32_t> meta_slabs_;  // slabs lent to it (klass == kMetaClass)
};

}  // namespace membrain::server
