// Byte copies for large gathers. Past the last-level cache, ordinary stores first read every
// destination line (read-for-ownership), costing a third of the bandwidth; non-temporal stores
// skip that, which is what glibc's memcpy does for large contiguous copies too.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define MEMBRAIN_HAVE_SSE2 1
#else
#define MEMBRAIN_HAVE_SSE2 0
#endif

namespace membrain::cpu {

inline void stream_copy(uint8_t* dst, const uint8_t* src, std::size_t n) {
#if MEMBRAIN_HAVE_SSE2
  const std::size_t head = (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15;
  if (n < head + 64) {
    std::memcpy(dst, src, n);
    return;
  }
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  const std::size_t bulk = n & ~static_cast<std::size_t>(63);
  for (std::size_t i = 0; i < bulk; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
  std::memcpy(dst + bulk, src + bulk, n - bulk);
#else
  std::memcpy(dst, src, n);
#endif
}

// Orders the streaming stores before anything the caller does next (e.g. sending the buffer).
inline void stream_fence() {
#if MEMBRAIN_HAVE_SSE2
  _mm_sfence();
#endif
}

}  // namespace membrain::cpu
