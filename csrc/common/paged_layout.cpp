#include "common/paged_layout.h"

#include <stdexcept>
#include <string>

namespace membrain {

void validate_layout(const PagedLayout& layout) {
  if (layout.layer_base.empty()) throw std::invalid_argument("paged layout has no layers");
  if (layout.num_blocks <= 0)
    throw std::invalid_argument("paged layout num_blocks must be positive, got " +
                                std::to_string(layout.num_blocks));
  if (layout.page_bytes <= 0)
    throw std::invalid_argument("paged layout page_bytes must be positive, got " +
                                std::to_string(layout.page_bytes));
  if (layout.num_blocks > 1 && layout.block_stride < layout.page_bytes)
    throw std::invalid_argument("paged layout block_stride " + std::to_string(layout.block_stride) +
                                " is smaller than page_bytes " + std::to_string(layout.page_bytes) +
                                ": pages of consecutive blocks would overlap");
  for (std::size_t l = 0; l < layout.layer_base.size(); ++l) {
    if (layout.layer_base[l] == 0)
      throw std::invalid_argument("paged layout layer " + std::to_string(l) + " has a null base address");
  }
}

void validate_block_ids(const int64_t* ids, std::size_t n, int64_t num_blocks) {
  for (std::size_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= num_blocks) {
      throw std::out_of_range("block id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                              " is out of range [0, " + std::to_string(num_blocks) + ")");
    }
  }
}

void validate_packed_size(std::size_t have, std::size_t need, const char* what) {
  if (have < need) {
    throw std::invalid_argument(std::string(what) + " holds " + std::to_string(have) + " bytes but " +
                                std::to_string(need) + " are needed (blocks x layers x page_bytes)");
  }
}

}  // namespace membrain
