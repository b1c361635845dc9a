// Describes vLLM's paged KV cache as raw memory: per layer, the address of block 0, and for
// every layer the same block count, page size and block stride. Block b of layer l is the
// contiguous byte run [layer_base[l] + b * block_stride, + page_bytes).
//
// The packed ("gathered") form used by the host tier and the transport is block-major:
// block i of the id list, layer l lives at byte (i * num_layers + l) * page_bytes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace membrain {

struct PagedLayout {
  std::vector<uintptr_t> layer_base;
  int64_t num_blocks = 0;
  int64_t page_bytes = 0;
  int64_t block_stride = 0;

  std::size_t num_layers() const { return layer_base.size(); }
  // Bytes of the packed form for n block ids.
  std::size_t packed_bytes(std::size_t n_ids) const {
    return n_ids * num_layers() * static_cast<std::size_t>(page_bytes);
  }
};

// Throws std::invalid_argument naming the bad field (no layers, null base, non-positive page,
// stride smaller than a page so pages would overlap, ...).
void validate_layout(const PagedLayout& layout);
// Throws std::out_of_range naming the first id that is negative or >= num_blocks, and its position.
void validate_block_ids(const int64_t* ids, std::size_t n, int64_t num_blocks);
// Throws std::invalid_argument when a packed buffer of `have` bytes cannot hold `need`.
void validate_packed_size(std::size_t have, std::size_t need, const char* what);

}  // namespace membrain
