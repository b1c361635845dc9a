// Backing anonymous memory with pages ahead of use, so a hot path's first write into it does not
// take a page fault (and the kernel's zeroing) per 4 KiB.
#pragma once
#include <cstddef>

#include <sys/mman.h>

namespace membrain {

// Faults [addr, addr + len) in for writing without changing its contents, so it is safe beside
// threads copying into the same range. False where the kernel cannot (MADV_POPULATE_WRITE is
// Linux 5.14+; older kernels return EINVAL) or memory is short: those pages then fault in on
// first write, as without this call.
inline bool populate_for_write(void* addr, std::size_t len) {
#ifdef MADV_POPULATE_WRITE
  return ::madvise(addr, len, MADV_POPULATE_WRITE) == 0;
#else
  (void)addr;
  (void)len;
  return false;
#endif
}

}  // namespace membrain
