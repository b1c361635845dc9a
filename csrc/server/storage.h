// The object store: index of (namespace, key) -> Object, the slab allocator that holds the
// value bytes, the eviction policy, and TTL expiry.
//
// Life of a PUT value: reserve() finds room (evicting if it must) and returns an Object that
// is NOT visible; the connection receives the bytes straight into object->data(), verifies the
// checksum, then publish() swaps it into the index atomically (readers see the old value or
// the new one, never a partial one). Dropping an unpublished Object frees its chunk.
//
// One mutex guards the index, the policy and the expiry list. Critical sections are hash-map
// operations only - no value byte is ever touched under it - so on this 2-4 core target a
// single lock measured cheaper than sharding (and keeps eviction, which crosses shards, simple).
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "server/eviction_policy.h"
#include "server/object.h"
#include "server/slab_allocator.h"
#include "transport/protocol.h"

namespace membrain::server {

struct StorageStats {
  uint64_t capacity_bytes = 0;
  uint64_t stored_bytes = 0;     // sum of visible value lengths
  uint64_t allocated_bytes = 0;  // slabs in use (visible, pending, and evicted-but-pinned values)
  uint64_t chunk_bytes = 0;      // chunks handed out
  uint64_t meta_bytes = 0;       // bookkeeping charged against capacity (per-object overhead + keys)
  uint64_t meta_slab_bytes = 0;  // slabs lent to that bookkeeping (their pages released)
  uint64_t items = 0;
  uint64_t hits = 0, misses = 0, evictions = 0, expired = 0, puts = 0, deletes = 0;
  uint64_t slab_reassignments = 0;  // slabs emptied by eviction and handed to another class
  // Evictions by reason (they add up to `evictions`): first-sight objects (the policy's
  // probation; every object under "lru"), re-used ones (protected), raised-priority ones.
  uint64_t evicted_probation = 0, evicted_protected = 0, evicted_priority = 0;
  std::string policy;
  double fragmentation = 0.0;  // (value slabs - stored) / value slabs (meta slabs not counted)
};

class Storage {
 public:
  struct Options {
    uint64_t capacity_bytes = 0;
    uint64_t slab_bytes = 0;  // 0 = SlabAllocator::auto_slab_bytes
    double ttl_s = 0.0;
    std::string policy = kDefaultEvictionPolicy;
    // Retention priority by namespace glob (first match wins; eviction_policy.h).
    std::vector<std::pair<std::string, uint8_t>> namespace_priority;
  };
  explicit Storage(const Options& o);
  ~Storage();

  // Room for a value of `len` bytes, not yet visible. nullptr with *why = NO_SPACE (nothing
  // more can be evicted, e.g. everything left is pinned) or TOO_LARGE (larger than capacity).
  // Every object is also charged its bookkeeping (item_charge_bytes) against capacity. With
  // may_evict false nothing is evicted: the reservation succeeds only in free space.
  ObjectRef reserve(std::string_view ns, std::string_view key, uint64_t len, uint64_t checksum,
                    proto::Status* why, bool may_evict = true);
  // Makes a fully received and verified object visible, replacing any older version.
  // `chain_prev`: the value published just before it in the same PUT frame, if any; a frame is
  // a prefix chain in order, so the new object is ordered just behind it (evicted before it):
  // a chain loses its tail before its head.
  void publish(const ObjectRef& obj, const ObjectRef& chain_prev = nullptr);

  // Pinned references to the values of `keys` (nullptr for misses); counts hits/misses and
  // refreshes recency.
  void get_many(std::string_view ns, const std::vector<std::string_view>& keys, std::vector<ObjectRef>* out);
  void exists_many(std::string_view ns, const std::vector<std::string_view>& keys,
                   std::vector<uint8_t>* present);
  uint32_t lookup_prefix(std::string_view ns, const std::vector<std::string_view>& keys);
  uint32_t erase_many(std::string_view ns, const std::vector<std::string_view>& keys);

  // Drops up to `max_items` expired objects; returns how many.
  std::size_t sweep_expired(std::size_t max_items);

  StorageStats stats() const;
  // The figures of namespace `ns` (all zero when it holds nothing).
  NamespaceStats namespace_stats(std::string_view ns) const;
  // Namespaces holding objects, with their figures.
  std::vector<std::pair<std::string, NamespaceStats>> all_namespace_stats() const;
  uint64_t capacity() const { return alloc_.capacity(); }
  uint64_t slab_bytes() const { return alloc_.slab_bytes(); }
  void prefault(const std::atomic<bool>& stop) { alloc_.prefault(stop); }
  uint64_t prefaulted_bytes() const { return alloc_.prefaulted_bytes(); }
  // Bytes of bookkeeping per visible object beyond its key (for docs/server.md).
  static std::size_t per_object_overhead_bytes();
  // What one object is charged against capacity besides its value: the fixed overhead plus the
  // heap copies of its index key (namespace + NUL + key).
  static uint64_t item_charge_bytes(std::size_t index_key_len);

 private:
  using Index = std::unordered_map<std::string, ObjectRef>;
  static constexpr std::size_t kInlineKeyBytes = 15;  // std::string's inline buffer (libstdc++)
  static void make_index_key(std::string_view ns, std::string_view key, std::string* out);
  int64_t now_ns() const;
  bool expired_locked(const Object* o, int64_t now) const;
  // Unindexes `it`; the bytes are freed when the last pin drops (possibly right here).
  // `counter`: the namespace figure this removal counts in (evictions, expired, deletes).
  void remove_locked(Index::iterator it, uint64_t NamespaceStats::* counter = nullptr);
  // Looks up a key, dropping it if expired. nullptr on miss.
  Object* find_live_locked(std::string_view ns, std::string_view key, int64_t now, Index::iterator* where);
  void exp_link_locked(Object* o);
  void exp_unlink_locked(Object* o);
  void slab_link_locked(Object* o);
  void slab_unlink_locked(Object* o);
  // Evicts every visible object in slab `slab` so the slab goes back to the free pool. Refuses
  // (evicting nothing) when that would not empty it: an object is pinned by a reader, or the
  // slab holds chunks the index cannot see (pending PUTs, evicted values still pinned).
  bool reclaim_slab_locked(uint32_t slab);
  // One eviction step of reserve(): see storage.cpp. `run_slabs` > 0: a run of that many
  // contiguous slabs is needed.
  bool make_room_locked(bool need_chunk, uint32_t klass, uint32_t run_slabs);
  // Empties the n contiguous slabs whose newest object is the oldest (free slabs count as
  // oldest); false when no such window can be emptied.
  bool reclaim_window_locked(uint32_t n);
  // A slab's recency is that of its newest visible object (slab_stamp_); slab_order_ keeps
  // slabs holding objects by it, oldest first.
  void slab_touch_locked(const Object* o);

  SlabAllocator alloc_;
  std::unique_ptr<EvictionPolicy> policy_;
  int64_t ttl_ns_;

  mutable std::mutex mu_;
  Index index_;
  Object* exp_head_ = nullptr;  // oldest write first: with one global TTL this is expiry order
  Object* exp_tail_ = nullptr;
  std::vector<Object*> slab_heads_;   // per slab: its visible objects (Object::slab_next)
  std::vector<uint64_t> slab_stamp_;  // per slab: newest policy stamp of its objects (0 = none)
  std::set<std::pair<uint64_t, uint32_t>> slab_order_;
  // Per namespace, while it holds objects (an entry goes with its last object, so there are
  // never more entries than objects). Node-based: Object::ns pointers stay valid.
  std::unordered_map<std::string, NamespaceStats> namespaces_;
  NamespaceStats* ns_locked(std::string_view ns, bool create);
  void ns_unlink_locked(Object* o, uint64_t NamespaceStats::* counter);
  uint64_t stored_bytes_ = 0;
  uint64_t hits_ = 0, misses_ = 0, evictions_ = 0, expired_ = 0, puts_ = 0, deletes_ = 0;
  uint64_t slab_reassignments_ = 0;
  uint64_t evicted_probation_ = 0, evicted_protected_ = 0, evicted_priority_ = 0;
  std::vector<std::pair<std::string, uint8_t>> namespace_priority_;
  uint8_t priority_of(std::string_view ns) const;
};

}  // namespace membrain::server
