// Runs a callback when the scope is left by an exception (and only then). The client
// connections use it to mark themselves unusable when a call unwinds half-way for a reason
// other than their own transport errors - an allocation failure, a placer that throws - since
// bytes of that call may still be in the stream.
#pragma once
#include <exception>
#include <utility>

namespace membrain {

template <class F>
class UnwindGuard {
 public:
  explicit UnwindGuard(F on_unwind) : on_unwind_(std::move(on_unwind)), depth_(std::uncaught_exceptions()) {}
  ~UnwindGuard() {
    if (std::uncaught_exceptions() > depth_) on_unwind_();
  }
  UnwindGuard(const UnwindGuard&) = delete;
  UnwindGuard& operator=(const UnwindGuard&) = delete;

 private:
  F on_unwind_;
  int depth_;
};

}  // namespace membrain
