// 64-bit block checksums (XXH3-64): computed by the writer, stored beside every block and
// verified by the reader, so a corrupted or torn block is a cache miss, never wrong KV.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace membrain {
// XXH3-64 with the widest vector unit this CPU has (chosen once, at first use).
uint64_t checksum64(const void* data, std::size_t bytes, uint64_t seed = 0);
// The same hash from every implementation compiled in and usable on this CPU, by name
// ("base", "avx2"); for tests that check they agree.
std::vector<std::pair<std::string, uint64_t>> checksum64_all_paths(const void* data, std::size_t bytes,
                                                                   uint64_t seed = 0);
}  // namespace membrain
