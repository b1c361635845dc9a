// What to evict when a value does not fit. Storage calls these under its lock; a policy only
// orders objects, it never frees anything (Storage unindexes the victim; the bytes are freed
// when the last pin drops). New policies implement this interface and register in
// make_eviction_policy().
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "server/object.h"

namespace membrain::server {

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual void on_insert(Object* o) = 0;  // became visible
  virtual void on_access(Object* o) = 0;  // read (GET hit)
  virtual void on_remove(Object* o) = 0;  // unindexed for any reason
  // The object to evict next among those of size class `klass`, or nullptr if there are none.
  virtual Object* victim_in_class(uint32_t klass) = 0;
  // The object to evict next regardless of class, or nullptr if there are none.
  virtual Object* victim_any() = 0;
  virtual const char* name() const = 0;
};

// "lru" is the only policy today. Throws std::invalid_argument naming an unknown policy.
std::unique_ptr<EvictionPolicy> make_eviction_policy(const std::string& name, uint32_t num_classes);

}  // namespace membrain::server
