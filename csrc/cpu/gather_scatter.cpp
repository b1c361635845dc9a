#include "cpu/gather_scatter.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include "cpu/stream_copy.h"
#include "cpu/thread_pool.h"

namespace membrain::cpu {
namespace {

// Below this a single thread beats the wake-up cost of the pool.
constexpr std::size_t kMinBytesPerThread = 256 * 1024;
// Copies at least this large bypass the cache (see stream_copy.h); smaller ones stay cached,
// since the transport usually reads a fresh gather right away.
constexpr std::size_t kStreamingThreshold = 8u << 20;

// Splits the packed byte range evenly over the threads. Each part walks the runs of the copy
// plan (see paged_layout.h) that intersect its range, so runs larger than a part are split
// between threads and the packed side is always touched sequentially. `skip[i]` (optional)
// leaves block i alone. When a block of all layers is one run and the next id is the next
// block, the run continues into it: adjacent ids become one copy.
template <typename CopyFn>
void for_each_packed_range(const PagedLayout& plan, const int64_t* ids, std::size_t n_ids,
                           const std::vector<char>* skip, std::size_t max_threads, CopyFn&& copy) {
  const std::size_t layers = plan.num_layers();
  const std::size_t run = static_cast<std::size_t>(plan.run_bytes);
  const std::size_t runs_per_page = static_cast<std::size_t>(plan.runs_per_page());
  const std::size_t total = n_ids * layers * runs_per_page * run;
  if (total == 0) return;
  const bool ids_can_merge = layers == 1 && runs_per_page == 1 && plan.block_stride == plan.run_bytes;
  auto pool = copy_pool();
  std::size_t parts = std::max<std::size_t>(1, std::min(pool->size(), total / kMinBytesPerThread));
  if (max_threads > 0) parts = std::min(parts, max_threads);  // 1 part runs on this thread alone
  pool->parallel_for(parts, [&](std::size_t part) {
    const std::size_t begin = total * part / parts;
    const std::size_t end = total * (part + 1) / parts;
    std::size_t pos = begin;
    const bool streaming = total >= kStreamingThreshold;
    while (pos < end) {
      const std::size_t flat_run = pos / run;  // = (i * layers + l) * runs_per_page + k
      const std::size_t in_run = pos - flat_run * run;
      const std::size_t flat_page = flat_run / runs_per_page;
      const std::size_t k = flat_run - flat_page * runs_per_page;
      std::size_t i = flat_page / layers;
      const std::size_t l = flat_page - i * layers;
      std::size_t len = std::min(run - in_run, end - pos);
      const bool skipped = skip != nullptr && (*skip)[i];
      if (!skipped) {
        uint8_t* paged = reinterpret_cast<uint8_t*>(plan.layer_base[l]) + ids[i] * plan.block_stride +
                         plan.run_offset(static_cast<int64_t>(k)) + in_run;
        if (ids_can_merge) {
          while (pos + len < end && i + 1 < n_ids && ids[i + 1] == ids[i] + 1 &&
                 (skip == nullptr || !(*skip)[i + 1])) {
            len += std::min(run, end - pos - len);
            ++i;
          }
        }
        copy(paged, pos, len, streaming);
      }
      pos += len;
    }
    if (streaming) stream_fence();
  });
}

}  // namespace

void gather(const PagedLayout& layout, const int64_t* ids, std::size_t n_ids, void* out,
            std::size_t out_bytes, std::size_t max_threads) {
  const PagedLayout plan = copy_plan(layout);  // validates
  validate_addresses(layout);
  validate_block_ids(ids, n_ids, layout.num_blocks);
  validate_packed_size(out_bytes, layout.packed_bytes(n_ids), "gather output");
  if (n_ids > 0 && out == nullptr) throw std::invalid_argument("gather output pointer is null");
  auto* dst = static_cast<uint8_t*>(out);
  for_each_packed_range(plan, ids, n_ids, nullptr, max_threads,
                        [&](const uint8_t* from, std::size_t pos, std::size_t len, bool streaming) {
                          if (streaming) {
                            stream_copy(dst + pos, from, len);
                          } else {
                            std::memcpy(dst + pos, from, len);
                          }
                        });
}

void scatter(const void* src, std::size_t src_bytes, const PagedLayout& layout, const int64_t* ids,
             std::size_t n_ids, std::size_t max_threads) {
  const PagedLayout plan = copy_plan(layout);  // validates
  validate_addresses(layout);
  validate_block_ids(ids, n_ids, layout.num_blocks);
  validate_packed_size(src_bytes, layout.packed_bytes(n_ids), "scatter source");
  if (n_ids > 0 && src == nullptr) throw std::invalid_argument("scatter source pointer is null");

  // Parallel writers to the same page would race; keep only each id's last occurrence.
  std::vector<char> skip;
  {
    std::unordered_map<int64_t, std::size_t> last;
    last.reserve(n_ids * 2);
    bool dup = false;
    for (std::size_t i = 0; i < n_ids; ++i) {
      auto [it, inserted] = last.emplace(ids[i], i);
      if (!inserted) {
        it->second = i;
        dup = true;
      }
    }
    if (dup) {
      skip.assign(n_ids, 1);
      for (const auto& kv : last) skip[kv.second] = 0;
    }
  }
  const auto* from = static_cast<const uint8_t*>(src);
  for_each_packed_range(plan, ids, n_ids, skip.empty() ? nullptr : &skip, max_threads,
                        [&](uint8_t* to, std::size_t pos, std::size_t len, bool streaming) {
                          if (streaming) {
                            stream_copy(to, from + pos, len);
                          } else {
                            std::memcpy(to, from + pos, len);
                          }
                        });
}

}  // namespace membrain::cpu

namespace membrain::cpu {
void parallel_memcpy(void* dst, const void* src, std::size_t bytes, bool streaming) {
  if (bytes == 0) return;
  if (dst == nullptr || src == nullptr) throw std::invalid_argument("parallel_memcpy: null pointer");
  auto pool = copy_pool();
  const std::size_t parts = std::max<std::size_t>(1, std::min(pool->size(), bytes / kMinBytesPerThread));
  pool->parallel_for(parts, [&](std::size_t part) {
    const std::size_t begin = bytes * part / parts;
    const std::size_t end = bytes * (part + 1) / parts;
    auto* to = static_cast<uint8_t*>(dst) + begin;
    const auto* from = static_cast<const uint8_t*>(src) + begin;
    if (streaming) {
      stream_copy(to, from, end - begin);
      stream_fence();
    } else {
      std::memcpy(to, from, end - begin);
    }
  });
}
}  // namespace membrain::cpu
