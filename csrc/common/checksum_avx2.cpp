// XXH3-64 compiled for AVX2. Only this file gets -mavx2 (CMakeLists.txt), and checksum.cpp
// calls it only on CPUs that report AVX2. Nothing but the hash lives here: with
// XXH_INLINE_ALL every xxhash function is static, so no AVX2 instruction can end up in an
// inline function the linker shares with code that runs on other CPUs.
#if defined(MEMBRAIN_XXH3_AVX2)
#include <cstddef>
#include <cstdint>

#define XXH_INLINE_ALL
#define XXH_VECTOR XXH_AVX2
#include "xxhash/xxhash.h"

namespace membrain::detail {
uint64_t checksum64_avx2(const void* data, std::size_t bytes, uint64_t seed) {
  return XXH3_64bits_withSeed(data, bytes, seed);
}
}  // namespace membrain::detail
#endif
