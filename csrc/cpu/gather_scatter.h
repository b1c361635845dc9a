// Multi-threaded CPU gather/scatter between vLLM's paged KV layout and the packed block-major
// form. Validates everything before the first byte moves.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/paged_layout.h"

namespace membrain::cpu {

// Copies block ids[i], layer l into out + (i * L + l) * page_bytes() for every i, l (the runs of
// a page in (kernel block, head) order).
void gather(const PagedLayout& layout, const int64_t* ids, std::size_t n_ids, void* out,
            std::size_t out_bytes);
// The inverse. With duplicate ids the last occurrence wins, as a sequential loop would do.
void scatter(const void* src, std::size_t src_bytes, const PagedLayout& layout, const int64_t* ids,
             std::size_t n_ids);

}  // namespace membrain::cpu

namespace membrain::cpu {
// One contiguous copy split over the same thread pool: the physical limit the gather is
// measured against in benchmarks. `streaming` uses the same non-temporal stores as large
// gathers instead of glibc's memcpy, so the limit is the better of the two.
void parallel_memcpy(void* dst, const void* src, std::size_t bytes, bool streaming = false);
}  // namespace membrain::cpu
