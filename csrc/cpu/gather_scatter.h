// Multi-threaded CPU gather/scatter between vLLM's paged KV layout and the packed block-major
// form. Validates everything before the first byte moves.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/paged_layout.h"

namespace membrain::cpu {

// Copies block ids[i], layer l into out + (i * L + l) * page_bytes() for every i, l (the runs of
// a page in (kernel block, head) order). `max_threads` caps the threads the copy is split over
// (0: the whole copy pool); 1 copies on the calling thread only, never waiting for the pool,
// which background work uses so it takes no CPU at the pool's priority.
void gather(const PagedLayout& layout, const int64_t* ids, std::size_t n_ids, void* out,
            std::size_t out_bytes, std::size_t max_threads = 0);
// The inverse. With duplicate ids the last occurrence wins, as a sequential loop would do.
void scatter(const void* src, std::size_t src_bytes, const PagedLayout& layout, const int64_t* ids,
             std::size_t n_ids, std::size_t max_threads = 0);

}  // namespace membrain::cpu

namespace membrain::cpu {
// One contiguous copy split over the same thread pool: the physical limit the gather is
// measured against in benchmarks. `streaming` uses the same non-temporal stores as large
// gathers instead of glibc's memcpy, so the limit is the better of the two.
void parallel_memcpy(void* dst, const void* src, std::size_t bytes, bool streaming = false);
}  // namespace membrain::cpu
