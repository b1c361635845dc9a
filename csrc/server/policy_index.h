// A capacity-in-blocks index of keys ordered by a real EvictionPolicy (the very classes the
// server's Storage uses), with no value bytes. Two users: the host tier's scheduler-side index
// (membrain/tiers/host.py: which block hashes the workers' host pools hold, what they evict),
// and `membrain bench policy`, which replays request traces through it.
//
// A request is a prefix chain of keys, head first. touch()/admit() apply it tail first, so the
// head ends up the most recent and, on eviction, a chain loses its tail before its head.
// Admission "seen" admits a key only on its second sight: first sights go to a ghost list of
// 3 x capacity keys (the admission filter peers' users ask for as "store only on reuse").
#pragma once
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "server/eviction_policy.h"

namespace membrain::server {

class PolicyIndex {
 public:
  PolicyIndex(const std::string& policy, uint64_t capacity, const std::string& admission = "all");
  ~PolicyIndex();
  PolicyIndex(const PolicyIndex&) = delete;
  PolicyIndex& operator=(const PolicyIndex&) = delete;

  uint64_t size() const { return index_.size(); }
  uint64_t capacity() const { return capacity_; }
  bool contains(const std::string& key) const { return index_.count(key) != 0; }
  // Leading keys held.
  uint32_t prefix_hits(const std::vector<std::string>& keys) const;
  // Reads: refreshes the held keys of `keys` (tail first).
  void touch(const std::vector<std::string>& keys);
  // Adds `keys` not yet held (tail first; held ones are refreshed), then evicts down to
  // capacity, never a key of `protect` nor one of `keys` already held before the call. New keys
  // that cannot stay are dropped tail first. Returns (admitted, evicted) in order.
  std::pair<std::vector<std::string>, std::vector<std::string>> admit(const std::vector<std::string>& keys,
                                                                      const std::vector<std::string>& protect,
                                                                      uint8_t priority = 0);
  // A trace request: prefix hits before it, then admit(keys) with no protection beyond its own.
  uint32_t request(const std::vector<std::string>& keys, uint8_t priority = 0);
  void discard(const std::vector<std::string>& keys);
  void clear();
  std::vector<std::string> keys() const;
  const char* policy_name() const { return policy_->name(); }
  uint64_t evictions() const { return evictions_; }
  // Evictions of first-sight (probation) and re-used (protected) keys and of raised priorities.
  uint64_t evicted_probation() const { return evicted_[0]; }
  uint64_t evicted_protected() const { return evicted_[1]; }
  uint64_t evicted_priority() const { return evicted_[2]; }

 private:
  struct Node;
  Object* insert(const std::string& key, uint8_t priority);
  void remove(Object* o, RemoveReason why);
  bool admission_allows(const std::string& key);

  std::string policy_name_;
  uint64_t capacity_;
  bool admit_seen_;
  std::unique_ptr<EvictionPolicy> policy_;
  std::unordered_map<std::string, std::unique_ptr<Object>> index_;
  std::deque<std::string> seen_fifo_;
  std::unordered_map<std::string, uint32_t> seen_;
  uint64_t evictions_ = 0;
  uint64_t evicted_[3] = {0, 0, 0};
};

}  // namespace membrain::server
