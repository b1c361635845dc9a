#include "memory/host_pool.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include <sys/mman.h>

#include "common/populate.h"
#include "cuda/cuda_api.h"

namespace membrain {
namespace {
constexpr std::size_t kHugePage = 2u << 20;

std::size_t round_up(std::size_t v, std::size_t to) {
  return (v + to - 1) / to * to;
}
}  // namespace

std::shared_ptr<HostPool> HostPool::create(const Options& options) {
  if (options.slot_bytes == 0) throw std::invalid_argument("host pool slot_bytes must be positive");
  if (options.num_slots == 0) throw std::invalid_argument("host pool num_slots must be positive");
  if (options.num_slots > std::numeric_limits<uint32_t>::max())
    throw std::invalid_argument("host pool num_slots " + std::to_string(options.num_slots) +
                                " exceeds 2^32-1");
  // Slots start on 4 KiB boundaries so DMA engines and O_DIRECT-style users get aligned buffers.
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  const std::size_t slot_stride = round_up(options.slot_bytes, page);
  if (slot_stride > std::numeric_limits<std::size_t>::max() / options.num_slots)
    throw std::invalid_argument("host pool size overflows: slot_bytes x num_slots");

  std::shared_ptr<HostPool> pool(new HostPool());
  pool->slot_bytes_ = options.slot_bytes;
  pool->slot_stride_ = slot_stride;
  pool->num_slots_ = options.num_slots;
  pool->region_bytes_ = round_up(slot_stride * options.num_slots, options.huge_pages ? kHugePage : page);

  void* mem = mmap(nullptr, pool->region_bytes_, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) {
    throw std::bad_alloc();
  }
  pool->region_ = static_cast<uint8_t*>(mem);
  if (options.huge_pages) {
    pool->huge_pages_ = madvise(mem, pool->region_bytes_, MADV_HUGEPAGE) == 0;
  }
  if (options.pin && cuda::device_count() > 0) {
    pool->pinned_ = cuda::host_register(mem, pool->region_bytes_);
  }
  pool->refcounts_ = std::make_unique<std::atomic<uint32_t>[]>(options.num_slots);
  pool->free_list_.reserve(options.num_slots);
  // Hand out low slots first: keeps the touched part of the region small when lightly used.
  for (std::size_t i = options.num_slots; i-- > 0;) {
    pool->refcounts_[i].store(0, std::memory_order_relaxed);
    pool->free_list_.push_back(static_cast<uint32_t>(i));
  }
  return pool;
}

HostPool::~HostPool() {
  if (region_ == nullptr) return;
  if (pinned_) cuda::host_unregister(region_);
  munmap(region_, region_bytes_);
}

void HostPool::check_slot(uint32_t slot) const {
  if (slot >= num_slots_)
    throw std::out_of_range("host pool slot " + std::to_string(slot) + " out of range [0, " +
                            std::to_string(num_slots_) + ")");
}

std::optional<uint32_t> HostPool::try_acquire() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (free_list_.empty()) return std::nullopt;
  const uint32_t slot = free_list_.back();
  free_list_.pop_back();
  refcounts_[slot].store(1, std::memory_order_release);
  return slot;
}

std::optional<std::vector<uint32_t>> HostPool::try_acquire_many(std::size_t n) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (free_list_.size() < n) return std::nullopt;
  std::vector<uint32_t> out(free_list_.end() - static_cast<std::ptrdiff_t>(n), free_list_.end());
  free_list_.resize(free_list_.size() - n);
  for (uint32_t s : out) refcounts_[s].store(1, std::memory_order_release);
  return out;
}

void HostPool::retain(uint32_t slot) {
  check_slot(slot);
  uint32_t cur = refcounts_[slot].load(std::memory_order_acquire);
  do {
    if (cur == 0) throw std::logic_error("host pool slot " + std::to_string(slot) + " retained while free");
  } while (!refcounts_[slot].compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel));
}

void HostPool::release(uint32_t slot) {
  check_slot(slot);
  uint32_t cur = refcounts_[slot].load(std::memory_order_acquire);
  do {
    if (cur == 0) throw std::logic_error("host pool slot " + std::to_string(slot) + " released while free");
  } while (!refcounts_[slot].compare_exchange_weak(cur, cur - 1, std::memory_order_acq_rel));
  if (cur == 1) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_list_.push_back(slot);
  }
}

uint32_t HostPool::refcount(uint32_t slot) const {
  check_slot(slot);
  return refcounts_[slot].load(std::memory_order_acquire);
}

std::size_t HostPool::prefault(std::size_t first, std::size_t count) {
  if (first >= num_slots_ || count == 0) return 0;
  count = std::min(count, num_slots_ - first);
  const std::size_t bytes = count * slot_stride_;
  return populate_for_write(region_ + first * slot_stride_, bytes) ? bytes : 0;
}

uint8_t* HostPool::slot_data(uint32_t slot) const {
  check_slot(slot);
  return region_ + static_cast<std::size_t>(slot) * slot_stride_;
}

std::size_t HostPool::free_slots() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return free_list_.size();
}

}  // namespace membrain
