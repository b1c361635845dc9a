// The eviction policies: intrusive LRU lists kept per (size class, priority, segment), like
// memcached's per-class LRU, so evicting within the class that needs room frees a chunk of
// exactly the right size. Every hook is O(1); victim_in_class() compares the tails of a class's
// few lists and victim_any() those of every class (a few dozen), by stamp (eviction_policy.h).
//
// - "lru": one segment: least recently used first (within a priority).
// - "slru": segmented LRU with a ghost list. A key seen for the first time goes to probation;
//   one read again while held, or written again after it was evicted or replaced (its hash is
//   still in the ghost list, which remembers about the last 3 x live-object-count evicted keys),
//   goes to protected. Probation is evicted before protected. On the KV traces most
//   blocks are never reused (58 % of synthetic_trace.jsonl's), while a block seen twice is
//   reused soon; LRU lets each one-off prompt push out the reused prefixes.
//
// Chain order: a request touches its prefix blocks head first, so under plain recency the head
// (the block every later one depends on) would be the oldest. Storage and the host tier touch a
// request's blocks tail first (see Storage::get_many), so within a request the tail is evicted
// first and a block is never kept after its predecessor.
#pragma once
#include <cstdint>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "server/eviction_policy.h"

namespace membrain::server {

class ListPolicy : public EvictionPolicy {
 public:
  ListPolicy(uint32_t num_classes, uint32_t segments);
  void on_insert(Object* o) override;
  void on_insert_behind(Object* o, Object* prev) override;
  void on_access(Object* o) override;
  void on_remove(Object* o, RemoveReason why) override;
  Object* victim_in_class(uint32_t klass) override;
  Object* victim_any() override;

 protected:
  // Segment for a newly visible object, and for one that was read.
  virtual uint8_t insert_segment(Object* o) = 0;
  virtual uint8_t access_segment(Object* o) = 0;
  virtual void removed(Object* o, RemoveReason why) = 0;
  // After an object entered the last segment (insert or access).
  virtual void promoted() {}
  uint64_t live() const { return live_; }
  uint64_t in_segment(uint8_t segment) const { return seg_count_[segment]; }
  // Moves the oldest priority-0 object of `from` to the front of `to` (nullptr if none).
  Object* demote_oldest(uint8_t from, uint8_t to);

 private:
  struct List {
    Object* head = nullptr;  // most recent
    Object* tail = nullptr;  // least recent
  };
  uint32_t lists_per_class() const { return (kMaxPriority + 1) * segments_; }
  void link_front(Object* o, uint8_t segment);
  uint32_t list_index(const Object* o, uint8_t segment) const;
  void unlink(Object* o);

  uint32_t segments_;
  std::vector<List> lists_;
  uint64_t clock_ = 0;
  uint64_t live_ = 0;
  uint64_t seg_count_[2] = {0, 0};
};

class LruPolicy final : public ListPolicy {
 public:
  explicit LruPolicy(uint32_t num_classes) : ListPolicy(num_classes, 1) {}
  const char* name() const override { return "lru"; }

 protected:
  uint8_t insert_segment(Object*) override { return 0; }
  uint8_t access_segment(Object*) override { return 0; }
  void removed(Object*, RemoveReason) override {}
};

// The ghost list: a FIFO of the last `capacity` evicted keys, as 48-bit fingerprints of their
// hashes - a ring (8 bytes a key) and an open-addressing multiset over it (8 bytes a slot, at
// most half full) - so O(1) per insert / lookup and at most about 3 x 8 x ghost_factor bytes per
// stored object (charged with its bookkeeping: Storage::per_object_overhead_bytes).
class GhostList {
 public:
  // Remembers `fingerprint_of(hash)`, forgetting the oldest beyond `capacity`.
  void insert(uint64_t hash, std::size_t capacity);
  bool contains(uint64_t hash) const;
  std::size_t size() const { return size_; }
  std::size_t bytes() const { return (ring_.size() + table_.size()) * sizeof(uint64_t); }

 private:
  static uint64_t fingerprint_of(uint64_t hash);
  std::size_t probe(uint64_t fp) const;  // the slot holding fp, or the empty slot ending its run
  void add(uint64_t fp);
  void remove_one(uint64_t fp);
  void rehash(std::size_t slots);
  std::vector<uint64_t> ring_;  // fingerprints, oldest at head_
  std::size_t head_ = 0, size_ = 0;
  std::vector<uint64_t> table_;  // slot: fingerprint << 16 | count; 0 = empty
  std::size_t used_ = 0;
};

class SlruPolicy final : public ListPolicy {
 public:
  // The ghost list remembers the last ghost_factor x (objects held) evicted keys. 3 measured
  // best on synthetic_trace.jsonl (docs/benchmarks.md#cache-policy).
  // Protected holds at most protected_fraction of the objects (priority 0): beyond it its
  // oldest goes back to the front of probation, so values re-read soon after their first
  // sight always find room there (without it, a workload of values read twice and never again
  // fills protected with them and evicts every new value before its second read).
  explicit SlruPolicy(uint32_t num_classes, double ghost_factor = 3.0, double protected_fraction = 0.875)
      : ListPolicy(num_classes, 2), ghost_factor_(ghost_factor), protected_fraction_(protected_fraction) {}
  const char* name() const override { return "slru"; }
  std::size_t ghost_bytes() const { return ghost_.bytes(); }
  // Ghost bytes per stored object with the default factor: 3 keys of a ring entry (8 bytes) and
  // two table slots (16), for Storage's per-object charge.
  static constexpr std::size_t kGhostBytesPerObject = 3 * 24;

 protected:
  uint8_t insert_segment(Object* o) override;
  uint8_t access_segment(Object*) override { return 1; }
  void promoted() override;
  void removed(Object* o, RemoveReason why) override;

 private:
  static uint64_t key_hash(const Object* o);
  double ghost_factor_;
  double protected_fraction_;
  GhostList ghost_;
};

}  // namespace membrain::server
