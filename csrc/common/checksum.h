// 64-bit block checksums (XXH3-64): computed by the writer, stored beside every block and
// verified by the reader, so a corrupted or torn block is a cache miss, never wrong KV.
#pragma once
#include <cstddef>
#include <cstdint>

namespace membrain {
uint64_t checksum64(const void* data, std::size_t bytes, uint64_t seed = 0);
}  // namespace membrain
