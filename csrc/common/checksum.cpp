#include "common/checksum.h"

#define XXH_INLINE_ALL
#include "xxhash/xxhash.h"

namespace membrain {
uint64_t checksum64(const void* data, std::size_t bytes, uint64_t seed) {
  return XXH3_64bits_withSeed(data, bytes, seed);
}
}  // namespace membrain
