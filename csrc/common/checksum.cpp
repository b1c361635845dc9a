#include "common/checksum.h"

#define XXH_INLINE_ALL
#include "xxhash/xxhash.h"

namespace membrain {
namespace detail {
#if defined(MEMBRAIN_XXH3_AVX2)
uint64_t checksum64_avx2(const void* data, std::size_t bytes, uint64_t seed);
#endif
}  // namespace detail

namespace {
using HashFn = uint64_t (*)(const void*, std::size_t, uint64_t);

// Baseline x86-64 (SSE2), or whatever the target's default vector unit is.
uint64_t checksum64_base(const void* data, std::size_t bytes, uint64_t seed) {
  return XXH3_64bits_withSeed(data, bytes, seed);
}

#if defined(MEMBRAIN_XXH3_AVX2)
uint64_t checksum64_wide(const void* data, std::size_t bytes, uint64_t seed) {
  return detail::checksum64_avx2(data, bytes, seed);
}
#endif

// Every PUT and GET hashes its values on both ends; on data still in cache (a value just
// received) AVX2 hashes ~1.7x faster than SSE2 (39 vs 23 GB/s measured here), so the
// portable build picks the widest unit the CPU has at run time.
HashFn pick() {
#if defined(MEMBRAIN_XXH3_AVX2)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) return checksum64_wide;
#endif
  return checksum64_base;
}
}  // namespace

uint64_t checksum64(const void* data, std::size_t bytes, uint64_t seed) {
  static const HashFn impl = pick();
  return impl(data, bytes, seed);
}

std::vector<std::pair<std::string, uint64_t>> checksum64_all_paths(const void* data, std::size_t bytes,
                                                                   uint64_t seed) {
  std::vector<std::pair<std::string, uint64_t>> out;
  out.emplace_back("base", checksum64_base(data, bytes, seed));
#if defined(MEMBRAIN_XXH3_AVX2)
  if (__builtin_cpu_supports("avx2")) out.emplace_back("avx2", checksum64_wide(data, bytes, seed));
#endif
  return out;
}
}  // namespace membrain
