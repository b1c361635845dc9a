#include "server/policy_index.h"

#include <algorithm>
#include <stdexcept>

namespace membrain::server {

PolicyIndex::PolicyIndex(const std::string& policy, uint64_t capacity, const std::string& admission)
    : policy_name_(policy),
      capacity_(capacity),
      admit_seen_(admission == "seen"),
      policy_(make_eviction_policy(policy, 1)) {
  if (admission != "all" && admission != "seen")
    throw std::invalid_argument("unknown admission '" + admission + "' (known: all, seen)");
}

PolicyIndex::~PolicyIndex() {
  clear();
}

uint32_t PolicyIndex::prefix_hits(const std::vector<std::string>& keys) const {
  uint32_t n = 0;
  for (const auto& k : keys) {
    if (!index_.count(k)) break;
    ++n;
  }
  return n;
}

void PolicyIndex::touch(const std::vector<std::string>& keys) {
  for (auto k = keys.rbegin(); k != keys.rend(); ++k) {
    auto it = index_.find(*k);
    if (it != index_.end()) policy_->on_access(it->second.get());
  }
}

Object* PolicyIndex::insert(const std::string& key, uint8_t priority) {
  SlabAllocator::Chunk none;
  none.klass = 0;
  auto o = std::make_unique<Object>(nullptr, none, key, 0, 0, 0);
  o->priority = std::min(priority, kMaxPriority);
  o->indexed = true;
  Object* raw = o.get();
  index_.emplace(key, std::move(o));
  policy_->on_insert(raw);
  return raw;
}

void PolicyIndex::remove(Object* o, RemoveReason why) {
  policy_->on_remove(o, why);
  const std::string key = o->index_key;  // erasing frees `o` and its key
  index_.erase(key);
}

bool PolicyIndex::admission_allows(const std::string& key) {
  if (!admit_seen_) return true;
  if (seen_.count(key)) return true;
  ++seen_[key];
  seen_fifo_.push_back(key);
  while (seen_fifo_.size() > 3 * std::max<uint64_t>(capacity_, 16)) {
    auto it = seen_.find(seen_fifo_.front());
    if (it != seen_.end() && --it->second == 0) seen_.erase(it);
    seen_fifo_.pop_front();
  }
  return false;
}

std::pair<std::vector<std::string>, std::vector<std::string>> PolicyIndex::admit(
    const std::vector<std::string>& keys, const std::vector<std::string>& protect, uint8_t priority) {
  std::vector<std::string> admitted, evicted;
  if (capacity_ == 0) return {admitted, evicted};
  std::unordered_set<Object*> keep;  // held before and part of this request, or protected
  std::vector<Object*> fresh;        // inserted now, tail first
  for (const auto& k : protect) {
    auto it = index_.find(k);
    if (it != index_.end()) keep.insert(it->second.get());
  }
  for (auto k = keys.rbegin(); k != keys.rend(); ++k) {
    auto it = index_.find(*k);
    if (it != index_.end()) {
      Object* o = it->second.get();
      if (priority > o->priority) {  // a request raises (never lowers) its prefix's retention
        policy_->on_remove(o, RemoveReason::kDeleted);
        o->priority = std::min(priority, kMaxPriority);
        policy_->on_insert(o);
      }
      policy_->on_access(o);
      keep.insert(o);
    } else if (admission_allows(*k)) {
      fresh.push_back(insert(*k, priority));
    }
  }
  std::unordered_set<Object*> dropped;
  std::size_t next_fresh = 0;  // fresh keys are dropped tail first when only ours are left
  while (index_.size() > capacity_) {
    Object* v = policy_->victim_any();
    if (v && keep.count(v)) v = nullptr;
    if (!v) {
      while (next_fresh < fresh.size() && dropped.count(fresh[next_fresh])) ++next_fresh;
      if (next_fresh == fresh.size()) break;  // only protected keys left
      v = fresh[next_fresh];
    }
    const bool was_fresh = std::find(fresh.begin(), fresh.end(), v) != fresh.end();
    if (was_fresh) {
      dropped.insert(v);
    } else {
      evicted.push_back(v->index_key);
      ++evictions_;
      ++evicted_[v->priority > 0 ? 2 : policy_->segment_of(v) > 0 ? 1 : 0];
    }
    remove(v, RemoveReason::kEvicted);
  }
  for (auto f = fresh.rbegin(); f != fresh.rend(); ++f)
    if (!dropped.count(*f)) admitted.push_back((*f)->index_key);
  return {admitted, evicted};
}

uint32_t PolicyIndex::request(const std::vector<std::string>& keys, uint8_t priority) {
  const uint32_t hits = prefix_hits(keys);
  admit(keys, {}, priority);
  return hits;
}

void PolicyIndex::discard(const std::vector<std::string>& keys) {
  for (const auto& k : keys) {
    auto it = index_.find(k);
    if (it != index_.end()) remove(it->second.get(), RemoveReason::kDeleted);
  }
}

void PolicyIndex::clear() {
  for (auto& [k, o] : index_) policy_->on_remove(o.get(), RemoveReason::kDeleted);
  index_.clear();
}

std::vector<std::string> PolicyIndex::keys() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& [k, o] : index_) out.push_back(k);
  return out;
}

}  // namespace membrain::server
