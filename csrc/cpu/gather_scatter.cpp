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

// Splits the packed byte range evenly over the threads. Each part walks the (block, layer)
// pages that intersect its range, so pages larger than a part are split between threads and
// the packed side is always touched sequentially.
template <typename CopyFn>
void for_each_packed_range(const PagedLayout& layout, std::size_t n_ids, CopyFn&& copy) {
  const std::size_t layers = layout.num_layers();
  const std::size_t page = static_cast<std::size_t>(layout.page_bytes);
  const std::size_t total = n_ids * layers * page;
  if (total == 0) return;
  auto pool = copy_pool();
  const std::size_t parts = std::max<std::size_t>(1, std::min(pool->size(), total / kMinBytesPerThread));
  pool->parallel_for(parts, [&](std::size_t part) {
    const std::size_t begin = total * part / parts;
    const std::size_t end = total * (part + 1) / parts;
    std::size_t pos = begin;
    const bool streaming = total >= kStreamingThreshold;
    while (pos < end) {
      const std::size_t flat_page = pos / page;  // = i * layers + l
      const std::size_t in_page = pos - flat_page * page;
      const std::size_t len = std::min(page - in_page, end - pos);
      copy(flat_page / layers, flat_page % layers, in_page, pos, len, streaming);
      pos += len;
    }
    if (streaming) stream_fence();
  });
}

inline uint8_t* page_addr(const PagedLayout& layout, std::size_t layer, int64_t block) {
  return reinterpret_cast<uint8_t*>(layout.layer_base[layer]) + block * layout.block_stride;
}

}  // namespace

void gather(const PagedLayout& layout, const int64_t* ids, std::size_t n_ids, void* out,
            std::size_t out_bytes) {
  validate_layout(layout);
  validate_block_ids(ids, n_ids, layout.num_blocks);
  validate_packed_size(out_bytes, layout.packed_bytes(n_ids), "gather output");
  if (n_ids > 0 && out == nullptr) throw std::invalid_argument("gather output pointer is null");
  auto* dst = static_cast<uint8_t*>(out);
  for_each_packed_range(layout, n_ids,
                        [&](std::size_t i, std::size_t l, std::size_t in_page, std::size_t pos,
                            std::size_t len, bool streaming) {
                          const uint8_t* from = page_addr(layout, l, ids[i]) + in_page;
                          if (streaming) {
                            stream_copy(dst + pos, from, len);
                          } else {
                            std::memcpy(dst + pos, from, len);
                          }
                        });
}

void scatter(const void* src, std::size_t src_bytes, const PagedLayout& layout, const int64_t* ids,
             std::size_t n_ids) {
  validate_layout(layout);
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
  for_each_packed_range(layout, n_ids,
                        [&](std::size_t i, std::size_t l, std::size_t in_page, std::size_t pos,
                            std::size_t len, bool streaming) {
                          if (!skip.empty() && skip[i]) return;
                          uint8_t* to = page_addr(layout, l, ids[i]) + in_page;
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
