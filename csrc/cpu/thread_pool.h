// A small fixed pool of worker threads for data-parallel byte copies. Persistent threads keep
// per-call overhead in microseconds, which matters for gathers of a few pages.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace membrain::cpu {

class ThreadPool {
 public:
  explicit ThreadPool(std::size_t num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  std::size_t size() const { return workers_.size() + 1; }
  // Runs fn(part) for part in [0, parts) across the pool and the calling thread; returns when
  // all parts are done. The first exception thrown by a part is rethrown here.
  void parallel_for(std::size_t parts, const std::function<void(std::size_t)>& fn);

 private:
  void worker_loop();

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::mutex run_mutex_;  // one parallel_for at a time
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(std::size_t)>* job_ = nullptr;
  std::size_t parts_ = 0;
  std::size_t next_ = 0;
  std::size_t finished_ = 0;
  std::size_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

// The process-wide pool used by the gather/scatter ops; resized by set_num_threads.
std::shared_ptr<ThreadPool> copy_pool();
void set_num_threads(std::size_t n);  // 0 = hardware concurrency
std::size_t num_threads();

}  // namespace membrain::cpu
