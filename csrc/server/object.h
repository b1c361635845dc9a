// One stored value. Owned through std::shared_ptr: the index holds one reference while the
// object is visible, and every reply that is sending its bytes holds another (a "pin"). The
// chunk goes back to the allocator only in the destructor, i.e. when the last of those lets
// go - so eviction, overwrite and DELETE never free bytes a socket is still reading from.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "server/slab_allocator.h"

namespace membrain::server {

struct Object;

// Figures of one namespace (what a tenant limited to it may see), kept while it holds objects.
struct NamespaceStats {
  uint64_t items = 0, bytes = 0;
  uint64_t hits = 0, misses = 0, gets = 0, puts = 0, deletes = 0, evictions = 0, expired = 0;
};

// Per-object state an EvictionPolicy may use (intrusive list links plus a recency/frequency
// stamp), so policies need no side table and no allocation per access.
struct EvictionHook {
  Object* prev = nullptr;
  Object* next = nullptr;
  uint64_t stamp = 0;
  uint32_t list = 0;    // which of the policy's lists holds it
  uint8_t segment = 0;  // 0 probation, 1 protected (segmented policies)
  bool linked = false;
};

struct Object {
  // `meta_bytes` is the bookkeeping this object was charged (SlabAllocator::charge_meta); it is
  // returned with the chunk when the object goes.
  Object(SlabAllocator* alloc, SlabAllocator::Chunk chunk, std::string index_key, uint64_t value_len,
         uint64_t checksum, uint64_t meta_bytes = 0)
      : alloc(alloc),
        chunk(chunk),
        index_key(std::move(index_key)),
        value_len(value_len),
        checksum(checksum),
        meta_bytes(meta_bytes) {}
  ~Object() {
    if (!alloc) return;
    alloc->free(chunk);
    if (meta_bytes) alloc->uncharge_meta(meta_bytes);
  }
  Object(const Object&) = delete;
  Object& operator=(const Object&) = delete;

  uint8_t* data() const { return chunk.data; }
  uint32_t size_class() const { return chunk.klass; }

  SlabAllocator* alloc;
  SlabAllocator::Chunk chunk;
  std::string index_key;  // namespace + '\0' + key (namespaces never contain NUL)
  uint64_t value_len;
  uint64_t checksum;             // XXH3-64 of the value, verified on receipt, returned on GET
  uint64_t meta_bytes;           // bookkeeping charged against capacity for this object
  int64_t expires_at_ns = 0;     // steady clock; 0 = never
  uint8_t priority = 0;          // retention priority 0..kMaxPriority (eviction_policy.h)
  bool indexed = false;          // visible in the index (guarded by the storage lock)
  EvictionHook hook;             // guarded by the storage lock
  NamespaceStats* ns = nullptr;  // while indexed, guarded by the storage lock
  Object* exp_prev = nullptr;    // expiry FIFO, guarded by the storage lock
  Object* exp_next = nullptr;
  // Visible objects of the same slab (first slab for runs), guarded by the storage lock, so
  // Storage can evict a whole slab when it gives the slab to another size class.
  Object* slab_prev = nullptr;
  Object* slab_next = nullptr;
};

using ObjectRef = std::shared_ptr<Object>;

}  // namespace membrain::server
