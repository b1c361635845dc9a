#include "common/paged_layout.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace membrain {
namespace {

[[noreturn]] void invalid(const std::string& what) {
  throw std::invalid_argument("paged layout " + what);
}

int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) invalid(std::string(what) + " overflows 64 bits");
  return r;
}

int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) invalid(std::string(what) + " overflows 64 bits");
  return r;
}

struct Dim {
  int64_t stride;
  int64_t count;
  const char* name;
};

// Bytes spanned by the runs of `dims` (all of one layer, or all layers): a stride may only
// step over everything finer, so the extent grows by stride * (count - 1) per dimension.
// Throws when a stride is smaller than what it must step over.
int64_t nested_extent(std::vector<Dim> dims, int64_t run_bytes) {
  std::stable_sort(dims.begin(), dims.end(), [](const Dim& a, const Dim& b) { return a.stride < b.stride; });
  int64_t extent = run_bytes;
  const char* finer = "run";
  for (const Dim& d : dims) {
    if (d.count <= 1) continue;
    if (d.stride < extent)
      invalid(std::string(d.name) + " " + std::to_string(d.stride) + " is smaller than the " +
              std::to_string(extent) + " bytes spanned by one " + finer +
              ": runs of the description would overlap");
    extent = checked_add(extent, checked_mul(d.stride, d.count - 1, d.name), d.name);
    finer = d.name;
  }
  return extent;
}

void require_positive(int64_t v, const char* name) {
  if (v <= 0) invalid(std::string(name) + " must be positive, got " + std::to_string(v));
}

void require_non_negative(int64_t v, const char* name) {
  if (v < 0) invalid(std::string(name) + " must not be negative, got " + std::to_string(v));
}

}  // namespace

PagedLayout make_paged_layout(const std::vector<uintptr_t>& layer_base, int64_t num_blocks,
                              int64_t page_bytes, int64_t block_stride, int64_t sub_count, int64_t sub_stride,
                              int64_t run_count, int64_t run_stride) {
  require_positive(page_bytes, "page_bytes");
  require_positive(sub_count, "sub_count");
  require_positive(run_count, "run_count");
  const int64_t runs = checked_mul(sub_count, run_count, "sub_count * run_count");
  if (page_bytes % runs != 0)
    invalid("page_bytes " + std::to_string(page_bytes) +
            " does not split into sub_count * run_count = " + std::to_string(runs) + " equal runs");
  PagedLayout layout;
  layout.layer_base = layer_base;
  layout.num_blocks = num_blocks;
  layout.block_stride = block_stride;
  layout.sub_count = sub_count;
  layout.sub_stride = sub_stride;
  layout.run_count = run_count;
  layout.run_stride = run_stride;
  layout.run_bytes = page_bytes / runs;
  return layout;
}

void validate_layout(const PagedLayout& layout) {
  if (layout.layer_base.empty()) invalid("has no layers");
  require_positive(layout.num_blocks, "num_blocks");
  require_positive(layout.sub_count, "sub_count");
  require_positive(layout.run_count, "run_count");
  require_positive(layout.run_bytes, "run_bytes");
  require_non_negative(layout.block_stride, "block_stride");
  require_non_negative(layout.sub_stride, "sub_stride");
  require_non_negative(layout.run_stride, "run_stride");
  checked_mul(checked_mul(layout.sub_count, layout.run_count, "runs per page"), layout.run_bytes,
              "page_bytes");

  std::vector<Dim> dims = {{layout.run_stride, layout.run_count, "run_stride"},
                           {layout.sub_stride, layout.sub_count, "sub_stride"},
                           {layout.block_stride, layout.num_blocks, "block_stride"}};
  const int64_t layer_extent = nested_extent(dims, layout.run_bytes);
  const std::size_t n = layout.num_layers();
  if (n == 1) return;
  // Layers equally spaced (every vLLM layout: layer_stride) are one more nested dimension, which
  // lets block-outermost layouts interleave layers inside a block. Otherwise (layers from
  // separate allocations) each layer's extent must be disjoint from the others.
  std::vector<uintptr_t> bases = layout.layer_base;
  std::sort(bases.begin(), bases.end());
  const uintptr_t step = bases[1] - bases[0];
  bool equally_spaced = step > 0 && step <= static_cast<uintptr_t>(INT64_MAX);
  for (std::size_t l = 2; equally_spaced && l < n; ++l) equally_spaced = bases[l] - bases[l - 1] == step;
  if (equally_spaced) {
    dims.push_back({static_cast<int64_t>(step), static_cast<int64_t>(n), "layer stride"});
    nested_extent(dims, layout.run_bytes);
    return;
  }
  for (std::size_t l = 1; l < n; ++l) {
    if (bases[l] - bases[l - 1] < static_cast<uintptr_t>(layer_extent))
      invalid("layers overlap: two layer bases are " + std::to_string(bases[l] - bases[l - 1]) +
              " bytes apart but one layer spans " + std::to_string(layer_extent) + " bytes");
  }
}

void validate_addresses(const PagedLayout& layout) {
  for (std::size_t l = 0; l < layout.layer_base.size(); ++l) {
    if (layout.layer_base[l] == 0) invalid("layer " + std::to_string(l) + " has a null base address");
  }
}

PagedLayout merge_page_runs(const PagedLayout& layout) {
  validate_layout(layout);
  PagedLayout m = layout;
  if (m.run_count > 1 && m.run_stride == m.run_bytes) {  // heads adjacent
    m.run_bytes *= m.run_count;
    m.run_count = 1;
  }
  if (m.run_count == 1 && m.sub_count > 1 && m.sub_stride == m.run_bytes) {  // kernel blocks adjacent
    m.run_bytes *= m.sub_count;
    m.sub_count = 1;
  }
  // A stride of a dimension of one is meaningless: zero it so equal layouts compare equal.
  if (m.run_count == 1) m.run_stride = 0;
  if (m.sub_count == 1) m.sub_stride = 0;
  return m;
}

bool block_is_one_run(const PagedLayout& m) {
  if (m.runs_per_page() != 1) return false;
  const int64_t page = m.run_bytes;
  for (std::size_t l = 1; l < m.num_layers(); ++l) {
    if (m.layer_base[l] != m.layer_base[0] + l * static_cast<uintptr_t>(page)) return false;
  }
  return m.block_stride == static_cast<int64_t>(m.num_layers()) * page;
}

PagedLayout copy_plan(const PagedLayout& layout) {
  PagedLayout plan = merge_page_runs(layout);
  if (plan.num_layers() > 1 && block_is_one_run(plan)) {
    plan.run_bytes *= static_cast<int64_t>(plan.num_layers());
    plan.layer_base.resize(1);
  }
  return plan;
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
