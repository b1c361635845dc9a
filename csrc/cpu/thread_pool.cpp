#include "cpu/thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <memory>

namespace membrain::cpu {

ThreadPool::ThreadPool(std::size_t num_threads) {
  const std::size_t extra = num_threads > 1 ? num_threads - 1 : 0;
  workers_.reserve(extra);
  for (std::size_t i = 0; i < extra; ++i) {
    workers_.emplace_back([this] {
      // Named so `top -H` and per-thread accounting tell the copy pool from the engine's threads.
      pthread_setname_np(pthread_self(), "membrain-copy");
      worker_loop();
    });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::parallel_for(std::size_t parts, const std::function<void(std::size_t)>& fn) {
  if (parts == 0) return;
  if (parts == 1 || workers_.empty()) {
    for (std::size_t p = 0; p < parts; ++p) fn(p);
    return;
  }
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = &fn;
    parts_ = parts;
    next_ = 0;
    finished_ = 0;
    error_ = nullptr;
    ++generation_;
  }
  wake_.notify_all();
  // The caller works too instead of sleeping.
  for (;;) {
    std::size_t part;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (next_ >= parts_) break;
      part = next_++;
    }
    try {
      fn(part);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    ++finished_;
  }
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [this] { return finished_ == parts_; });
  job_ = nullptr;
  if (error_) std::rethrow_exception(error_);
}

void ThreadPool::worker_loop() {
  std::size_t seen = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    wake_.wait(lock, [&] { return stop_ || (generation_ != seen && job_ != nullptr && next_ < parts_); });
    if (stop_) return;
    seen = generation_;
    while (job_ != nullptr && next_ < parts_) {
      const std::size_t part = next_++;
      const auto* job = job_;
      lock.unlock();
      try {
        (*job)(part);
      } catch (...) {
        lock.lock();
        if (!error_) error_ = std::current_exception();
        lock.unlock();
      }
      lock.lock();
      if (++finished_ == parts_) done_.notify_all();
    }
  }
}

namespace {
std::mutex g_pool_mutex;
std::shared_ptr<ThreadPool> g_pool;
std::size_t g_threads = 0;

std::size_t default_threads() {
  const std::size_t hw = std::max<std::size_t>(1, std::thread::hardware_concurrency());
  // Copies saturate memory bandwidth with a handful of threads; more only adds contention.
  return std::min<std::size_t>(hw, 8);
}
}  // namespace

std::shared_ptr<ThreadPool> copy_pool() {
  // Callers hold the pool for the whole copy, so a concurrent resize never frees it under them.
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (!g_pool) {
    if (g_threads == 0) g_threads = default_threads();
    g_pool = std::make_shared<ThreadPool>(g_threads);
  }
  return g_pool;
}

void set_num_threads(std::size_t n) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  const std::size_t want = n == 0 ? default_threads() : n;
  if (g_pool && g_threads == want) return;
  g_threads = want;
  g_pool = std::make_shared<ThreadPool>(g_threads);
}

std::size_t num_threads() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  return g_threads == 0 ? default_threads() : g_threads;
}

}  // namespace membrain::cpu
