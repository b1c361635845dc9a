// Describes vLLM's paged KV cache as raw memory. vLLM's per-layer views are strided
// [B, H, N, C] tensors whose physical order follows the group's KVCacheLayout (LBHNC, LBNHC,
// LHBNC, BLHNC, BLNHC, BHLNC), and a KV block may be split into `ratio` kernel blocks. All of
// them are covered by one description: the page of KV block b in layer l is the set of byte runs
//
//   layer_base[l] + b * block_stride + j * sub_stride + h * run_stride,   j < sub_count, h < run_count
//
// each run_bytes long (j: kernel block inside the KV block, h: head for layouts whose page is
// not one run, LHBNC and BHLNC).
//
// The packed ("gathered") form used by the host tier and the transport is block-major:
// block i of the id list, layer l lives at byte (i * num_layers + l) * page_bytes(), and inside a
// page the runs follow in (outer, inner) = (j, h) order. The two levels are only nested strides:
// Python describes a kernel-split HNC page heads outer, kernel blocks inner, so its packed bytes
// are the whole KV block's [H, N, C] (see membrain/ops.py, page_order).
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace membrain {

struct PagedLayout {
  std::vector<uintptr_t> layer_base;  // address (or, for validation only, offset) of block 0
  int64_t num_blocks = 0;             // KV blocks (not kernel blocks)
  int64_t block_stride = 0;           // bytes between KV blocks of one layer
  int64_t sub_count = 1;              // kernel blocks per KV block
  int64_t sub_stride = 0;             // bytes between kernel blocks
  int64_t run_count = 1;              // byte runs per kernel block
  int64_t run_stride = 0;             // bytes between those runs
  int64_t run_bytes = 0;

  std::size_t num_layers() const { return layer_base.size(); }
  int64_t runs_per_page() const { return sub_count * run_count; }
  // Bytes of one KV block of one layer (its packed size).
  int64_t page_bytes() const { return runs_per_page() * run_bytes; }
  // Offset of run k (k = j * run_count + h, packed order) from the page's first byte.
  int64_t run_offset(int64_t k) const {
    if (run_count == 1) return k * sub_stride;
    const int64_t j = k / run_count;
    return j * sub_stride + (k - j * run_count) * run_stride;
  }
  // Bytes of the packed form for n block ids.
  std::size_t packed_bytes(std::size_t n_ids) const {
    return n_ids * num_layers() * static_cast<std::size_t>(page_bytes());
  }
};

// Builds a layout from the arguments the bindings receive: page_bytes is the bytes of one KV
// block of one layer and must split evenly into sub_count * run_count runs.
PagedLayout make_paged_layout(const std::vector<uintptr_t>& layer_base, int64_t num_blocks,
                              int64_t page_bytes, int64_t block_stride, int64_t sub_count = 1,
                              int64_t sub_stride = 0, int64_t run_count = 1, int64_t run_stride = 0);

// Throws std::invalid_argument naming the bad field: no layers, non-positive counts or sizes,
// negative strides, or any two runs (of any block, layer, kernel block or head) that overlap.
// Overlap is checked by nesting: every stride must be at least the extent of everything finer,
// which holds for every vLLM layout (they are stride permutations of a dense, maybe padded,
// tensor); layer bases that are not an arithmetic progression must lie in disjoint extents.
// Addresses are not dereferenced: offsets work as well, so the scheduler can validate too.
void validate_layout(const PagedLayout& layout);
// Throws std::invalid_argument when a layer base is null (needed before copying only).
void validate_addresses(const PagedLayout& layout);
// The same pages as fewer, longer runs: adjacent heads merge, then adjacent kernel blocks.
// Same packed bytes. Validates first.
PagedLayout merge_page_runs(const PagedLayout& layout);
// True when one KV block of all layers is a single byte run in packed order (block-outermost
// layouts with one run per page: BLHNC, BLNHC): base[l] = base[0] + l * page and
// block_stride = num_layers * page. Expects a merged layout.
bool block_is_one_run(const PagedLayout& layout);
// What the copy loops walk: merge_page_runs, then a block of all layers folded into one
// single-layer page when block_is_one_run. packed_bytes() is unchanged.
PagedLayout copy_plan(const PagedLayout& layout);

// Throws std::out_of_range naming the first id that is negative or >= num_blocks, and its position.
void validate_block_ids(const int64_t* ids, std::size_t n, int64_t num_blocks);
// Throws std::invalid_argument when a packed buffer of `have` bytes cannot hold `need`.
void validate_packed_size(std::size_t have, std::size_t need, const char* what);

}  // namespace membrain
