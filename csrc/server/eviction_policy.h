// What to evict when a value does not fit. Storage calls these under its lock; a policy only
// orders objects, it never frees anything (Storage unindexes the victim; the bytes are freed
// when the last pin drops). New policies implement this interface and register in
// make_eviction_policy().
//
// Contract with Storage: after every hook an object's `hook.stamp` orders it for eviction -
// the object with the smallest stamp is evicted first - and an object's stamp does not decrease
// while it is visible, but for a segmented policy's demotions (Storage orders whole slabs by the
// newest stamp they have held, so a demotion only makes its slab look newer than it is). Policies
// keep priorities and segments in the stamp's high bits (see make_stamp) so that holds.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "server/object.h"

namespace membrain::server {

// Why an object left the index: the policy remembers evicted keys (ghosts) but not deleted ones.
enum class RemoveReason : uint8_t { kEvicted, kExpired, kDeleted, kReplaced };

// Highest retention priority (Object::priority is clamped to it). Priority p objects are
// evicted only when no object of a lower priority is left.
inline constexpr uint8_t kMaxPriority = 3;

// Stamp layout: priority (2 bits) | segment (1 bit) | clock (61 bits). The clock advances by
// kStampGap per hook, leaving room to order up to kStampGap - 1 chain successors just behind an
// object (on_insert_behind).
inline constexpr uint64_t kStampGap = 1024;
inline uint64_t make_stamp(uint8_t priority, uint8_t segment, uint64_t clock) {
  return (uint64_t{priority} << 62) | (uint64_t{segment} << 61) | (clock & ((uint64_t{1} << 61) - 1));
}

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual void on_insert(Object* o) = 0;  // became visible
  // Became visible as the successor of `prev` in a prefix chain: order it just before `prev`
  // for eviction where the policy can (same list), else like on_insert.
  virtual void on_insert_behind(Object* o, Object* /*prev*/) { on_insert(o); }
  virtual void on_access(Object* o) = 0;                    // read (GET hit)
  virtual void on_remove(Object* o, RemoveReason why) = 0;  // unindexed
  // The object to evict next among those of size class `klass`, or nullptr if there are none.
  virtual Object* victim_in_class(uint32_t klass) = 0;
  // The object to evict next regardless of class, or nullptr if there are none.
  virtual Object* victim_any() = 0;
  virtual const char* name() const = 0;
  // The segment an object is in (0 = probation / first sight, 1 = protected / seen before), for
  // counting evictions by reason. Policies without segments say 0.
  virtual uint8_t segment_of(const Object* o) const { return o->hook.segment; }
};

// Known policies: "lru" (least recently used) and "slru" (segmented LRU with a ghost list:
// first-sight objects are evicted before re-used ones; see list_policy.h). Throws
// std::invalid_argument naming an unknown policy.
std::unique_ptr<EvictionPolicy> make_eviction_policy(const std::string& name, uint32_t num_classes);
std::vector<std::string> eviction_policy_names();

// The default of the server and the host tier: the one that won on the traces
// (benchmarks/results/policy_synthetic_trace.json).
inline constexpr const char* kDefaultEvictionPolicy = "slru";

}  // namespace membrain::server
