// CUDA gather/scatter between vLLM's paged KV cache and the packed block-major buffer.
//
// One kernel launch moves every (block, layer, run) triple of the copy plan (paged_layout.h: a
// page is sub_count * run_count byte runs; block-outermost layouts whose block of all layers is
// one run are moved as that one run). The work is cut into units: one unit is one chunk of one
// run, handled by a "group" of G threads (G a power of two, 32..256, sized so small runs do not
// leave most of a CTA idle). Inside a unit every thread first issues
// kUnroll independent loads (element lane + k*G, so each k is one coalesced sweep by the
// group) and only then the kUnroll stores: several loads in flight per thread hide HBM and
// PCIe latency. Elements are 16 bytes when every address, the run size and every stride allow
// it, otherwise the widest of 8/4/2/1 that does, so any page size is correct.
//
// The layer base pointers and block ids reach the device through a pinned staging buffer and
// one small H2D copy on the caller's stream (see DeviceResources::lease_meta).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <cuda_runtime.h>

#include "cuda/cuda_api.h"
#include "cuda/cuda_check.h"
#include "cuda/device_resources.h"

namespace membrain::cuda {

// What "auto" means for pinned-host packed buffers. The single switch to flip once the GPU
// benchmark (membrain/bench/gather_cuda.py, rows mode=mapped vs mode=staged) says otherwise.
constexpr HostMode kAutoHostMode = HostMode::kStaged;

namespace {

constexpr int kThreads = 256;  // threads per CTA
constexpr int kUnroll = 8;     // loads in flight per thread per unit
// Group sizes 2^5..2^8: a group is at least a warp (groups never split a warp) and at most a CTA.
constexpr int kMinGroupShift = 5;
constexpr int kMaxGroupShift = 8;
static_assert((1 << kMaxGroupShift) == kThreads, "largest group is one CTA");

struct PageCopyParams {
  const std::uintptr_t* layers;  // [num_layers] base of block 0 of each layer
  const int64_t* ids;            // [num_ids] block id of packed row i (or of rows[i])
  const int64_t* rows;           // [num_ids] packed row of ids[i]; nullptr means row i
  std::uint8_t* packed;          // device-accessible packed buffer
  int64_t block_stride;          // bytes between consecutive blocks of a layer
  int64_t sub_stride;            // bytes between kernel blocks of a KV block
  int64_t run_stride;            // bytes between runs of a kernel block
  int64_t run_count;             // runs per kernel block
  int64_t runs_per_page;         // sub_count * run_count
  int64_t run_elems;             // run bytes / sizeof(V)
  int64_t num_layers;
  int64_t chunks_per_run;
  int64_t num_units;  // num_ids * num_layers * runs_per_page * chunks_per_run
};

template <typename V>
__device__ __forceinline__ V load_nc(const V* p) {
  return __ldg(p);  // read-only path: sources are never written by the same launch
}

// The addresses come from integers; without the assumption a plain store compiles to a generic
// ST instead of STG (mapped pinned host memory lies in the global window too).
template <typename V>
__device__ __forceinline__ void store_global(V* p, const V& v) {
  __builtin_assume(__isGlobal(p));
  *p = v;
}

// Moves one unit (one chunk of one (row, layer, run) triple). Index is uint32_t when every unit
// and element index fits, which keeps the per-unit div/mod off the slow 64-bit path.
template <typename V, bool kToPacked, int kGroupShift, typename Index>
__device__ __forceinline__ void copy_unit(const PageCopyParams& p, Index u, int lane) {
  constexpr int kGroup = 1 << kGroupShift;
  constexpr Index kChunkElems = Index{kGroup} * kUnroll;
  const Index chunks_per_run = static_cast<Index>(p.chunks_per_run);
  const Index num_layers = static_cast<Index>(p.num_layers);
  const Index run_elems = static_cast<Index>(p.run_elems);
  // All threads of a group share u, so these branches and loads are uniform per group.
  const Index flat_run = u / chunks_per_run;
  const Index chunk = u - flat_run * chunks_per_run;
  Index page = flat_run;
  int64_t run_offset = 0;
  int64_t k = 0;
  if (p.runs_per_page > 1) {  // one-run pages (the contiguous layouts) skip these divisions
    const Index runs_per_page = static_cast<Index>(p.runs_per_page);
    page = flat_run / runs_per_page;
    k = static_cast<int64_t>(flat_run - page * runs_per_page);
    const int64_t j = k / p.run_count;
    run_offset = j * p.sub_stride + (k - j * p.run_count) * p.run_stride;
  }
  const Index i = page / num_layers;
  const Index l = page - i * num_layers;
  const int64_t row = p.rows != nullptr ? p.rows[i] : static_cast<int64_t>(i);
  V* paged =
      reinterpret_cast<V*>(p.layers[l] + static_cast<std::uintptr_t>(p.ids[i] * p.block_stride + run_offset));
  V* packed = reinterpret_cast<V*>(p.packed) +
              ((row * p.num_layers + static_cast<int64_t>(l)) * p.runs_per_page + k) * p.run_elems;
  const V* src = kToPacked ? paged : packed;
  V* dst = kToPacked ? packed : paged;
  const Index first = chunk * kChunkElems + static_cast<Index>(lane);
  V r[kUnroll];
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    const Index e = first + static_cast<Index>(k) * kGroup;
    if (e < run_elems) r[k] = load_nc(src + e);
  }
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    const Index e = first + static_cast<Index>(k) * kGroup;
    if (e < run_elems) {
      // Gather output is consumed by a DMA or the transport, not by SMs: stream it
      // (evict-first). Scattered pages are read by attention soon: an ordinary store.
      if constexpr (kToPacked) {
        __stcs(dst + e, r[k]);
      } else {
        store_global(dst + e, r[k]);
      }
    }
  }
}

// kToPacked: gather (paged -> packed); otherwise scatter (packed -> paged).
// kGroupShift: log2 of the group size G.
template <typename V, bool kToPacked, int kGroupShift>
__global__ void __launch_bounds__(kThreads) page_copy_kernel(const PageCopyParams p) {
  constexpr int kGroup = 1 << kGroupShift;
  constexpr int kGroupsPerCta = kThreads / kGroup;
  const int lane = threadIdx.x & (kGroup - 1);
  const int64_t step = int64_t{gridDim.x} * kGroupsPerCta;
  const int64_t start = int64_t{blockIdx.x} * kGroupsPerCta + (threadIdx.x >> kGroupShift);
  // Uniform across the grid: 32-bit index math whenever the unit count and a page's element
  // count (plus one stride of slack) fit, 64-bit otherwise.
  if (p.num_units + step <= 0xFFFFFFFFll && p.run_elems + int64_t{kGroup} * kUnroll <= 0xFFFFFFFFll) {
    for (uint32_t u = static_cast<uint32_t>(start); u < static_cast<uint32_t>(p.num_units);
         u += static_cast<uint32_t>(step))
      copy_unit<V, kToPacked, kGroupShift, uint32_t>(p, u, lane);
  } else {
    for (int64_t u = start; u < p.num_units; u += step)
      copy_unit<V, kToPacked, kGroupShift, int64_t>(p, u, lane);
  }
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename V, bool kToPacked, int kShift>
void launch_shift(const PageCopyParams& p, DeviceResources& res, cudaStream_t stream) {
  const void* fn = reinterpret_cast<const void*>(&page_copy_kernel<V, kToPacked, kShift>);
  constexpr int64_t kGroupsPerCta = kThreads >> kShift;
  // Enough CTAs to fill every SM at full occupancy, never more than there are units: the
  // grid-stride loop covers the rest, so the grid size follows the chip, not the request.
  const int64_t needed = ceil_div(p.num_units, kGroupsPerCta);
  const int64_t resident = int64_t{res.sm_count()} * res.ctas_per_sm(fn, kThreads);
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min(needed, resident)));
  page_copy_kernel<V, kToPacked, kShift><<<grid, kThreads, 0, stream>>>(p);
  MEMBRAIN_CUDA_CHECK_LAUNCH(kToPacked ? "gather kernel launch" : "scatter kernel launch");
}

template <typename V, bool kToPacked>
void launch_vec(const PageCopyParams& p, int group_shift, DeviceResources& res, cudaStream_t stream) {
  switch (group_shift) {
    case 5:
      return launch_shift<V, kToPacked, 5>(p, res, stream);
    case 6:
      return launch_shift<V, kToPacked, 6>(p, res, stream);
    case 7:
      return launch_shift<V, kToPacked, 7>(p, res, stream);
    default:
      return launch_shift<V, kToPacked, 8>(p, res, stream);
  }
}

// A packed pointer as the kernel sees it.
struct PackedTarget {
  bool host = false;  // pinned host memory
  void* device_ptr =
      nullptr;  // device memory, or the mapped device alias of pinned host memory (may be null)
};

std::string hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx",
                static_cast<unsigned long long>(reinterpret_cast<std::uintptr_t>(p)));
  return buf;
}

cudaPointerAttributes attributes(const void* p) {
  cudaPointerAttributes a{};
  MEMBRAIN_CUDA_CHECK(cudaPointerGetAttributes(&a, p));
  return a;
}

void* mapped_alias(const void* p) {
  void* d = nullptr;
  if (cudaHostGetDevicePointer(&d, const_cast<void*>(p), 0) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return d;
}

bool device_accessible_on(const cudaPointerAttributes& a, int device) {
  return (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged) && a.device == device;
}

PackedTarget classify_packed(const void* p, std::size_t bytes, int device, const char* what) {
  const cudaPointerAttributes first = attributes(p);
  const cudaPointerAttributes last = attributes(static_cast<const std::uint8_t*>(p) + bytes - 1);
  PackedTarget t;
  switch (first.type) {
    case cudaMemoryTypeUnregistered:
      throw std::invalid_argument(
          std::string(what) + " at " + hex(p) +
          " is pageable host memory; CUDA gather/scatter needs device memory or pinned "
          "host memory (torch pin_memory(), a membrain.HostPool slot, cudaHostRegister)");
    case cudaMemoryTypeHost: {
      if (last.type != cudaMemoryTypeHost)
        throw std::invalid_argument(std::string(what) + " at " + hex(p) +
                                    " is only partly pinned: its last byte is " + "pageable host memory");
      t.host = true;
      // Some pinned allocations report no alias in their attributes (seen for torch
      // pin_memory() buffers made on a non-main thread); the runtime still maps them, and
      // cudaHostGetDevicePointer is the documented way to ask.
      void* first_alias = first.devicePointer ? first.devicePointer : mapped_alias(p);
      void* last_alias = last.devicePointer ? last.devicePointer
                                            : mapped_alias(static_cast<const std::uint8_t*>(p) + bytes - 1);
      // The mapped alias must cover the whole range contiguously (one registration).
      if (first_alias != nullptr && static_cast<const std::uint8_t*>(last_alias) ==
                                        static_cast<const std::uint8_t*>(first_alias) + bytes - 1)
        t.device_ptr = first_alias;
      return t;
    }
    case cudaMemoryTypeDevice:
    case cudaMemoryTypeManaged:
      if (first.device != device)
        throw std::invalid_argument(std::string(what) + " is on cuda:" + std::to_string(first.device) +
                                    " but kv_caches are on cuda:" + std::to_string(device));
      if (!device_accessible_on(last, device))
        throw std::invalid_argument(std::string(what) + " at " + hex(p) +
                                    " extends past its device allocation");
      t.device_ptr = const_cast<void*>(p);
      return t;
  }
  throw std::invalid_argument(std::string(what) + " at " + hex(p) + " has an unknown CUDA memory type");
}

void check_layers(const PagedLayout& layout, int device) {
  // Python checks that all layers share one device; here the first and last layer are checked
  // (each cudaPointerGetAttributes costs a driver call, and this runs on every transfer).
  const std::size_t n = layout.num_layers();
  for (std::size_t l : {std::size_t{0}, n - 1}) {
    const void* p = reinterpret_cast<const void*>(layout.layer_base[l]);
    const cudaPointerAttributes a = attributes(p);
    if (!device_accessible_on(a, device))
      throw std::invalid_argument("kv cache layer " + std::to_string(l) + " at " + hex(p) +
                                  (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged
                                       ? " is on cuda:" + std::to_string(a.device)
                                       : std::string(" is not device memory")) +
                                  ", expected cuda:" + std::to_string(device));
  }
}

void check_device_and_stream(int device, std::uintptr_t stream) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    n = 0;
  }
  if (device < 0 || device >= n)
    throw std::invalid_argument("CUDA device " + std::to_string(device) + " does not exist (" +
                                std::to_string(n) + " present)");
  // 0, 1, 2 are the legacy / per-thread default stream handles, valid on every device.
  if (stream > 2) {
    int stream_device = -1;
    MEMBRAIN_CUDA_CHECK(cudaStreamGetDevice(reinterpret_cast<cudaStream_t>(stream), &stream_device));
    if (stream_device != device)
      throw std::invalid_argument("stream belongs to cuda:" + std::to_string(stream_device) +
                                  " but kv_caches are on cuda:" + std::to_string(device));
  }
}

// The widest element (16, 8, 4, 2 or 1 bytes) that divides every address and size involved.
int element_bytes(const PagedLayout& layout, const void* packed) {
  std::uintptr_t bits =
      static_cast<std::uintptr_t>(layout.run_bytes) | reinterpret_cast<std::uintptr_t>(packed) | 16;
  if (layout.num_blocks > 1) bits |= static_cast<std::uintptr_t>(layout.block_stride);
  if (layout.sub_count > 1) bits |= static_cast<std::uintptr_t>(layout.sub_stride);
  if (layout.run_count > 1) bits |= static_cast<std::uintptr_t>(layout.run_stride);
  for (std::uintptr_t base : layout.layer_base) bits |= base;
  return static_cast<int>(bits & (~bits + 1));  // lowest set bit, at most 16
}

std::size_t checked_packed_bytes(const PagedLayout& layout, std::size_t n_rows) {
  std::size_t per_block = 0, total = 0;
  if (__builtin_mul_overflow(layout.num_layers(), static_cast<std::size_t>(layout.page_bytes()),
                             &per_block) ||
      __builtin_mul_overflow(per_block, n_rows, &total))
    throw std::invalid_argument("packed size of " + std::to_string(n_rows) + " blocks overflows");
  return total;
}

// Copies the metadata to the device and launches the one kernel. `layout` is a copy plan
// (paged_layout.h: copy_plan); `rows` may be empty.
template <bool kToPacked>
void launch(const PagedLayout& layout, const std::vector<int64_t>& ids, const std::vector<int64_t>& rows,
            void* packed_device, DeviceResources& res, cudaStream_t stream) {
  const std::size_t L = layout.num_layers();
  const std::size_t n = ids.size();
  const std::size_t meta_bytes = (L + n + rows.size()) * sizeof(int64_t);
  auto meta = res.lease_meta(meta_bytes, stream);
  auto* host = static_cast<std::uint8_t*>(meta->host());
  std::memcpy(host, layout.layer_base.data(), L * sizeof(std::uintptr_t));
  std::memcpy(host + L * 8, ids.data(), n * sizeof(int64_t));
  if (!rows.empty()) std::memcpy(host + (L + n) * 8, rows.data(), rows.size() * sizeof(int64_t));
  MEMBRAIN_CUDA_CHECK(cudaMemcpyAsync(meta->dev(), meta->host(), meta_bytes, cudaMemcpyHostToDevice, stream));

  const auto* dev = static_cast<const std::uint8_t*>(meta->dev());
  const int vec = element_bytes(layout, packed_device);
  PageCopyParams p{};
  p.layers = reinterpret_cast<const std::uintptr_t*>(dev);
  p.ids = reinterpret_cast<const int64_t*>(dev + L * 8);
  p.rows = rows.empty() ? nullptr : reinterpret_cast<const int64_t*>(dev + (L + n) * 8);
  p.packed = static_cast<std::uint8_t*>(packed_device);
  p.block_stride = layout.block_stride;
  p.sub_stride = layout.sub_stride;
  p.run_stride = layout.run_stride;
  p.run_count = layout.run_count;
  p.runs_per_page = layout.runs_per_page();
  p.run_elems = layout.run_bytes / vec;
  p.num_layers = static_cast<int64_t>(L);
  // Group size: the power of two that covers a run in one unit (kUnroll elements per
  // thread), clamped to [one warp, one CTA]; bigger runs are split into several units.
  int shift = kMinGroupShift;
  while (shift < kMaxGroupShift && (int64_t{1} << shift) * kUnroll < p.run_elems) ++shift;
  p.chunks_per_run = ceil_div(p.run_elems, (int64_t{1} << shift) * kUnroll);
  p.num_units = static_cast<int64_t>(n) * p.num_layers * p.runs_per_page * p.chunks_per_run;
  switch (vec) {
    case 16:
      launch_vec<uint4, kToPacked>(p, shift, res, stream);
      break;
    case 8:
      launch_vec<uint2, kToPacked>(p, shift, res, stream);
      break;
    case 4:
      launch_vec<unsigned int, kToPacked>(p, shift, res, stream);
      break;
    case 2:
      launch_vec<unsigned short, kToPacked>(p, shift, res, stream);
      break;
    default:
      launch_vec<unsigned char, kToPacked>(p, shift, res, stream);
      break;
  }
  // `meta` records its event here, after the kernel that reads it.
}

// Shared validation of both directions; returns the packed byte count.
std::size_t validate(const PagedLayout& layout, const int64_t* ids, std::size_t n_ids, const void* packed,
                     std::size_t packed_bytes, int device, std::uintptr_t stream, const char* what) {
  validate_layout(layout);
  validate_addresses(layout);
  if (n_ids > 0 && ids == nullptr) throw std::invalid_argument("block id pointer is null");
  validate_block_ids(ids, n_ids, layout.num_blocks);
  const std::size_t need = checked_packed_bytes(layout, n_ids);
  validate_packed_size(packed_bytes, need, what);
  if (n_ids > 0 && packed == nullptr) throw std::invalid_argument(std::string(what) + " pointer is null");
  check_device_and_stream(device, stream);
  return need;
}

}  // namespace

HostMode parse_host_mode(const std::string& mode) {
  if (mode == "auto") return HostMode::kAuto;
  if (mode == "mapped") return HostMode::kMapped;
  if (mode == "staged") return HostMode::kStaged;
  throw std::invalid_argument("mode must be 'auto', 'mapped' or 'staged', got '" + mode + "'");
}

const char* host_mode_name(HostMode mode) {
  switch (mode) {
    case HostMode::kMapped:
      return "mapped";
    case HostMode::kStaged:
      return "staged";
    default:
      return "auto";
  }
}

HostMode default_host_mode() {
  return kAutoHostMode;
}

namespace {

// Resolves a host-mode request for pinned host memory into kMapped or kStaged, allocating the
// staging scratch when needed. Explicit "staged" that cannot get scratch is an error; "auto"
// then falls back to writing through the mapping.
HostMode resolve_host_mode(HostMode requested, const PackedTarget& t, std::size_t bytes, DeviceResources& res,
                           cudaStream_t stream, std::unique_ptr<DeviceResources::Scratch>& scratch) {
  HostMode mode = requested == HostMode::kAuto ? kAutoHostMode : requested;
  if (mode == HostMode::kMapped && t.device_ptr == nullptr) {
    if (requested == HostMode::kMapped)
      throw std::invalid_argument(
          "mode='mapped' needs pinned memory mapped into the device address space (cudaHostRegisterMapped / "
          "cudaHostAllocMapped); use mode='staged'");
    mode = HostMode::kStaged;
  }
  if (mode == HostMode::kStaged) {
    scratch = res.try_alloc_scratch(bytes, stream);
    if (!scratch) {
      if (requested == HostMode::kStaged || t.device_ptr == nullptr)
        throw std::runtime_error("CUDA out of memory: could not allocate " + std::to_string(bytes) +
                                 " bytes of device scratch for a staged transfer");
      mode = HostMode::kMapped;
    }
  }
  return mode;
}

}  // namespace

void gather(const PagedLayout& layout, const int64_t* ids, std::size_t n_ids, void* out,
            std::size_t out_bytes, int device, std::uintptr_t stream_handle, HostMode mode) {
  const std::size_t need =
      validate(layout, ids, n_ids, out, out_bytes, device, stream_handle, "gather output");
  if (n_ids == 0) return;
  DeviceGuard guard(device);
  check_layers(layout, device);
  const PagedLayout plan = copy_plan(layout);
  const PackedTarget target = classify_packed(out, need, device, "gather output");
  auto& res = DeviceResources::get(device);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const std::vector<int64_t> id_vec(ids, ids + n_ids);

  if (!target.host) {
    launch<true>(plan, id_vec, {}, target.device_ptr, res, stream);
    return;
  }
  std::unique_ptr<DeviceResources::Scratch> scratch;
  if (resolve_host_mode(mode, target, need, res, stream, scratch) == HostMode::kMapped) {
    launch<true>(plan, id_vec, {}, target.device_ptr, res, stream);
    return;
  }
  launch<true>(plan, id_vec, {}, scratch->get(), res, stream);
  MEMBRAIN_CUDA_CHECK(cudaMemcpyAsync(out, scratch->get(), need, cudaMemcpyDeviceToHost, stream));
  // `scratch` is freed in stream order, after the copy.
}

void scatter(const void* src, std::size_t src_bytes, const PagedLayout& layout, const int64_t* ids,
             std::size_t n_ids, int device, std::uintptr_t stream_handle, HostMode mode) {
  const std::size_t need =
      validate(layout, ids, n_ids, src, src_bytes, device, stream_handle, "scatter source");
  if (n_ids == 0) return;
  DeviceGuard guard(device);
  check_layers(layout, device);
  const PagedLayout plan = copy_plan(layout);
  const PackedTarget target = classify_packed(src, need, device, "scatter source");
  auto& res = DeviceResources::get(device);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);

  // Pages are written in parallel, so two writers of one page would race. Keep each id's last
  // occurrence only (what a sequential loop leaves behind) and tell the kernel which packed
  // row each kept id reads.
  std::vector<int64_t> uniq;
  std::vector<int64_t> rows;
  {
    std::unordered_map<int64_t, std::size_t> last;
    last.reserve(n_ids * 2);
    for (std::size_t i = 0; i < n_ids; ++i) last[ids[i]] = i;
    if (last.size() == n_ids) {
      uniq.assign(ids, ids + n_ids);
    } else {
      uniq.reserve(last.size());
      rows.reserve(last.size());
      for (std::size_t i = 0; i < n_ids; ++i) {
        if (last[ids[i]] == i) {
          uniq.push_back(ids[i]);
          rows.push_back(static_cast<int64_t>(i));
        }
      }
    }
  }

  if (!target.host) {
    launch<false>(plan, uniq, rows, target.device_ptr, res, stream);
    return;
  }
  std::unique_ptr<DeviceResources::Scratch> scratch;
  if (resolve_host_mode(mode, target, need, res, stream, scratch) == HostMode::kMapped) {
    launch<false>(plan, uniq, rows, target.device_ptr, res, stream);
    return;
  }
  MEMBRAIN_CUDA_CHECK(cudaMemcpyAsync(scratch->get(), src, need, cudaMemcpyHostToDevice, stream));
  launch<false>(plan, uniq, rows, scratch->get(), res, stream);
}

void memcpy_async(void* dst, const void* src, std::size_t bytes, int device, std::uintptr_t stream) {
  check_device_and_stream(device, stream);
  if (bytes == 0) return;
  if (dst == nullptr || src == nullptr) throw std::invalid_argument("cuda_memcpy: null pointer");
  DeviceGuard guard(device);
  MEMBRAIN_CUDA_CHECK(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace membrain::cuda
