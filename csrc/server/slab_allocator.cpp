#include "server/slab_allocator.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

#include <sys/mman.h>

#include "common/populate.h"

namespace membrain::server {

uint64_t SlabAllocator::auto_slab_bytes(uint64_t capacity) {
  uint64_t target = capacity / 256;
  uint64_t s = 64ull << 10;
  while (s * 2 <= target && s < (4ull << 20)) s *= 2;
  return s;
}

SlabAllocator::SlabAllocator(uint64_t capacity, uint64_t slab_bytes) : slab_bytes_(slab_bytes) {
  if (slab_bytes_ < 4096 || (slab_bytes_ & (slab_bytes_ - 1)) != 0)
    throw std::invalid_argument("slab size " + std::to_string(slab_bytes) +
                                " must be a power of two >= 4096");
  num_slabs_ = capacity / slab_bytes_;
  if (num_slabs_ == 0)
    throw std::invalid_argument("capacity " + std::to_string(capacity) + " is smaller than one slab (" +
                                std::to_string(slab_bytes_) + " bytes)");
  if (num_slabs_ > 0xFFFFFFF0ull)
    throw std::invalid_argument("capacity " + std::to_string(capacity) + " needs too many slabs");
  region_bytes_ = num_slabs_ * slab_bytes_;
  // MAP_NORESERVE: reserve address space only; pages are backed when a value is written.
  void* p = ::mmap(nullptr, region_bytes_, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED)
    throw std::runtime_error("cannot reserve " + std::to_string(region_bytes_) +
                             " bytes of address space for storage: " + std::strerror(errno));
  region_ = static_cast<uint8_t*>(p);
#ifdef MADV_HUGEPAGE
  // Fewer page faults and TLB misses when 1 MiB values stream in; harmless if THP is off.
  if (slab_bytes_ >= (2ull << 20)) ::madvise(region_, region_bytes_, MADV_HUGEPAGE);
#endif
  // Classes 2^k x {1, 1.25, 1.5, 1.75} from 64 bytes up to one slab.
  for (uint64_t base = kMinChunk; base <= slab_bytes_; base *= 2) {
    for (uint64_t q = 4; q < 8; ++q) {
      const uint64_t s = base * q / 4;
      if (s > slab_bytes_) break;
      class_sizes_.push_back(s);
    }
  }
  slabs_.resize(num_slabs_);
  partial_.resize(class_sizes_.size());
  for (uint32_t i = 0; i < num_slabs_; ++i) free_slabs_.insert(free_slabs_.end(), i);
}

SlabAllocator::~SlabAllocator() {
  if (region_) ::munmap(region_, region_bytes_);
}

uint32_t SlabAllocator::class_of(uint64_t bytes) const {
  if (bytes > slab_bytes_) return large_class();
  auto it = std::lower_bound(class_sizes_.begin(), class_sizes_.end(), bytes);
  return static_cast<uint32_t>(it - class_sizes_.begin());
}

std::optional<uint32_t> SlabAllocator::take_free_slab_locked() {
  if (free_slabs_.empty()) return std::nullopt;
  const uint32_t s = *free_slabs_.begin();  // lowest first keeps high addresses free for runs
  free_slabs_.erase(free_slabs_.begin());
  ++slabs_in_use_;
  return s;
}

std::optional<uint32_t> SlabAllocator::take_free_run_locked(uint32_t n) {
  if (free_slabs_.size() < n) return std::nullopt;
  // Highest-address first fit: small classes grow from the bottom, runs from the top.
  uint32_t run_end = 0, run_len = 0;
  for (auto it = free_slabs_.rbegin(); it != free_slabs_.rend(); ++it) {
    if (run_len > 0 && *it == run_end - run_len) {
      ++run_len;
    } else {
      run_end = *it;
      run_len = 1;
    }
    if (run_len == n) {
      const uint32_t first = *it;
      for (uint32_t i = 0; i < n; ++i) free_slabs_.erase(first + i);
      slabs_in_use_ += n;
      return first;
    }
  }
  return std::nullopt;
}

std::optional<SlabAllocator::Chunk> SlabAllocator::allocate(uint64_t bytes) {
  if (bytes == 0 || bytes > region_bytes_) return std::nullopt;
  std::lock_guard<std::mutex> lock(mutex_);
  const uint32_t k = class_of(bytes);
  if (k == large_class()) {
    const uint64_t n64 = (bytes + slab_bytes_ - 1) / slab_bytes_;
    auto first = take_free_run_locked(static_cast<uint32_t>(n64));
    if (!first) return std::nullopt;
    Slab& s = slabs_[*first];
    s.klass = k;
    s.run = static_cast<uint32_t>(n64);
    s.used = 1;
    Chunk c{region_ + static_cast<uint64_t>(*first) * slab_bytes_, n64 * slab_bytes_, k, *first,
            static_cast<uint32_t>(n64)};
    chunk_bytes_in_use_ += c.bytes;
    return c;
  }
  const uint64_t csize = class_sizes_[k];
  const uint32_t per_slab = static_cast<uint32_t>(slab_bytes_ / csize);
  uint32_t sid;
  if (!partial_[k].empty()) {
    sid = *partial_[k].begin();
  } else {
    auto fresh = take_free_slab_locked();
    if (!fresh) return std::nullopt;
    sid = *fresh;
    Slab& s = slabs_[sid];
    s.klass = k;
    s.used = 0;
    s.next_unused = 0;
    s.run = 0;
    s.free_chunks.clear();
    partial_[k].insert(sid);
  }
  Slab& s = slabs_[sid];
  uint32_t idx;
  if (!s.free_chunks.empty()) {
    idx = s.free_chunks.back();
    s.free_chunks.pop_back();
  } else {
    idx = s.next_unused++;
  }
  ++s.used;
  if (s.free_chunks.empty() && s.next_unused >= per_slab) partial_[k].erase(sid);
  chunk_bytes_in_use_ += csize;
  return Chunk{region_ + static_cast<uint64_t>(sid) * slab_bytes_ + static_cast<uint64_t>(idx) * csize, csize,
               k, sid, 0};
}

void SlabAllocator::release_slab_locked(uint32_t first, uint32_t n) {
  for (uint32_t i = 0; i < n; ++i) {
    Slab& s = slabs_[first + i];
    s.klass = kNoClass;
    s.used = 0;
    s.run = 0;
    s.next_unused = 0;
    std::vector<uint32_t>().swap(s.free_chunks);
    free_slabs_.insert(first + i);
  }
  slabs_in_use_ -= n;
  // The pages stay mapped: a cache at capacity frees and refills slabs all the time, and
  // handing pages back would make every refill pay page faults and zeroing inside recv().
  // RSS is bounded by the region (= capacity) either way.
}

void SlabAllocator::prefault(const std::atomic<bool>& stop) {
  // Populates the region in steps so a stop request is honoured quickly; safe beside live
  // values (populate_for_write leaves contents alone). Where the kernel cannot, values keep
  // faulting in on first write.
  constexpr uint64_t kStep = 64ull << 20;
  for (uint64_t off = 0; off < region_bytes_ && !stop.load(std::memory_order_relaxed); off += kStep) {
    const uint64_t len = std::min(kStep, region_bytes_ - off);
    if (!populate_for_write(region_ + off, len)) return;
    {
      // Slabs lent to bookkeeping meanwhile must not stay resident.
      std::lock_guard<std::mutex> lock(mutex_);
      for (uint32_t s : meta_slabs_) {
        const uint64_t at = static_cast<uint64_t>(s) * slab_bytes_;
        if (at < off + len && at + slab_bytes_ > off) ::madvise(region_ + at, slab_bytes_, MADV_DONTNEED);
      }
    }
    prefaulted_bytes_.store(off + len, std::memory_order_relaxed);
  }
}

void SlabAllocator::free(const Chunk& c) {
  if (!c.data) return;
  std::lock_guard<std::mutex> lock(mutex_);
  chunk_bytes_in_use_ -= c.bytes;
  if (c.nslabs > 0) {
    release_slab_locked(c.slab, c.nslabs);
    return;
  }
  Slab& s = slabs_[c.slab];
  const uint64_t offset =
      static_cast<uint64_t>(c.data - region_) - static_cast<uint64_t>(c.slab) * slab_bytes_;
  --s.used;
  if (s.used == 0) {
    partial_[c.klass].erase(c.slab);
    release_slab_locked(c.slab, 1);
    return;
  }
  s.free_chunks.push_back(static_cast<uint32_t>(offset / c.bytes));
  partial_[c.klass].insert(c.slab);
}

bool SlabAllocator::charge_meta(uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  while (meta_bytes_ + bytes > meta_slabs_.size() * slab_bytes_) {
    auto s = take_free_slab_locked();
    if (!s) return false;
    slabs_[*s].klass = kMetaClass;
    meta_slabs_.push_back(*s);
    // The heap holds the bookkeeping; the slab's pages go back to the kernel so the two are
    // not both resident.
    ::madvise(region_ + static_cast<uint64_t>(*s) * slab_bytes_, slab_bytes_, MADV_DONTNEED);
  }
  meta_bytes_ += bytes;
  return true;
}

void SlabAllocator::uncharge_meta(uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  meta_bytes_ -= std::min(bytes, meta_bytes_);
  // Keep what the charge needs plus one slab of slack (none once nothing is charged).
  const uint64_t needed = (meta_bytes_ + slab_bytes_ - 1) / slab_bytes_;
  while (meta_slabs_.size() > (needed ? needed + 1 : 0)) {
    const uint32_t s = meta_slabs_.back();
    meta_slabs_.pop_back();
    release_slab_locked(s, 1);
  }
}

void SlabAllocator::snapshot(std::vector<SlabState>* out) const {
  std::lock_guard<std::mutex> lock(mutex_);
  out->assign(slabs_.size(), SlabState{});
  for (uint32_t i = 0; i < slabs_.size(); ++i) {
    const Slab& s = slabs_[i];
    SlabState& o = (*out)[i];
    if (o.run_first != kNoClass) continue;  // inside a run seen already
    o.klass = s.klass;
    o.used = s.used;
    if (s.run > 0) {
      for (uint32_t j = 0; j < s.run && i + j < slabs_.size(); ++j) {
        (*out)[i + j].klass = s.klass;
        (*out)[i + j].run_first = i;
      }
      (*out)[i].used = s.used;
    }
  }
}

uint64_t SlabAllocator::meta_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return meta_bytes_;
}

uint64_t SlabAllocator::meta_slabs() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return meta_slabs_.size();
}

uint32_t SlabAllocator::chunks_used(uint32_t slab) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return slab < slabs_.size() ? slabs_[slab].used : 0;
}

uint64_t SlabAllocator::slab_bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return slabs_in_use_ * slab_bytes_;
}

uint64_t SlabAllocator::chunk_bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return chunk_bytes_in_use_;
}

}  // namespace membrain::server
