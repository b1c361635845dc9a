// A point in time a blocking call must not outlive; every wait polls with the time left. The one
// deadline of the client transports (csrc/transport).
#pragma once
#include <algorithm>
#include <chrono>
#include <climits>

namespace membrain {

struct Deadline {
  std::chrono::steady_clock::time_point at;
  explicit Deadline(int timeout_ms)
      : at(std::chrono::steady_clock::now() + std::chrono::milliseconds(std::max(timeout_ms, 0))) {}
  // Milliseconds left, rounded up so a sub-millisecond remainder still gets one poll.
  int remaining_ms() const {
    const auto left = at - std::chrono::steady_clock::now();
    if (left <= std::chrono::steady_clock::duration::zero()) return 0;
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(left).count();
    return static_cast<int>(std::min<long long>((us + 999) / 1000, INT_MAX));
  }
};

}  // namespace membrain
