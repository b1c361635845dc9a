// Least-recently-used, kept per size class (like memcached): evicting within the class that
// needs room frees a chunk of exactly the right size with one eviction. victim_any() returns
// the globally least recent object by comparing the tails of the class lists (a few dozen).
#pragma once
#include <vector>

#include "server/eviction_policy.h"

namespace membrain::server {

class LruPolicy final : public EvictionPolicy {
 public:
  explicit LruPolicy(uint32_t num_classes) : lists_(num_classes) {}
  void on_insert(Object* o) override;
  void on_access(Object* o) override;
  void on_remove(Object* o) override;
  Object* victim_in_class(uint32_t klass) override;
  Object* victim_any() override;
  const char* name() const override { return "lru"; }

 private:
  struct List {
    Object* head = nullptr;  // most recent
    Object* tail = nullptr;  // least recent
  };
  void link_front(Object* o);
  void unlink(Object* o);

  std::vector<List> lists_;
  uint64_t clock_ = 0;
};

}  // namespace membrain::server
