#include "server/storage.h"

#include <algorithm>
#include <chrono>

#include "server/config.h"
#include "server/list_policy.h"

namespace membrain::server {

namespace {
// Reused per thread so a lookup builds its index key without a heap allocation.
thread_local std::string t_key;
thread_local std::string t_ns;
}  // namespace

Storage::Storage(const Options& o)
    : alloc_(o.capacity_bytes,
             o.slab_bytes ? o.slab_bytes : SlabAllocator::auto_slab_bytes(o.capacity_bytes)),
      policy_(make_eviction_policy(o.policy, alloc_.num_classes())),
      namespace_priority_(o.namespace_priority),
      ttl_ns_(static_cast<int64_t>(o.ttl_s * 1e9)),
      slab_heads_(alloc_.num_slabs(), nullptr),
      slab_stamp_(alloc_.num_slabs(), 0) {}

Storage::~Storage() {
  // Objects still pinned elsewhere would outlive the allocator; the server joins every worker
  // (and so drops every pin) before destroying Storage.
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [k, obj] : index_) obj->indexed = false;
  index_.clear();
}

std::size_t Storage::per_object_overhead_bytes() {
  // Object + shared_ptr control block (make_shared: one allocation), the hash node (next
  // pointer, key string + shared_ptr, cached hash), each with malloc's 8-byte header and 16-byte
  // rounding, and up to two bucket pointers (the table doubles at load factor 1). Key bytes
  // beyond the string's inline buffer come on top (item_charge_bytes).
  auto malloced = [](std::size_t n) { return (n + 8 + 15) & ~std::size_t{15}; };
  // Plus the slru policy's ghost list, a few bytes per object (list_policy.h).
  return malloced(sizeof(Object) + 16) +
         malloced(sizeof(void*) + sizeof(Index::value_type) + sizeof(std::size_t)) + 2 * sizeof(void*) +
         SlruPolicy::kGhostBytesPerObject;
}

void Storage::make_index_key(std::string_view ns, std::string_view key, std::string* out) {
  out->assign(ns.data(), ns.size());
  out->push_back('\0');
  out->append(key.data(), key.size());
}

int64_t Storage::now_ns() const {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool Storage::expired_locked(const Object* o, int64_t now) const {
  return o->expires_at_ns != 0 && now >= o->expires_at_ns;
}

void Storage::exp_link_locked(Object* o) {
  o->exp_prev = exp_tail_;
  o->exp_next = nullptr;
  if (exp_tail_)
    exp_tail_->exp_next = o;
  else
    exp_head_ = o;
  exp_tail_ = o;
}

void Storage::exp_unlink_locked(Object* o) {
  if (o->exp_prev)
    o->exp_prev->exp_next = o->exp_next;
  else if (exp_head_ == o)
    exp_head_ = o->exp_next;
  if (o->exp_next)
    o->exp_next->exp_prev = o->exp_prev;
  else if (exp_tail_ == o)
    exp_tail_ = o->exp_prev;
  o->exp_prev = o->exp_next = nullptr;
}

void Storage::slab_link_locked(Object* o) {
  if (!o->data()) return;  // empty values own no chunk
  Object*& head = slab_heads_[o->chunk.slab];
  o->slab_prev = nullptr;
  o->slab_next = head;
  if (head) head->slab_prev = o;
  head = o;
}

void Storage::slab_touch_locked(const Object* o) {
  if (!o->data()) return;
  const uint32_t s = o->chunk.slab;
  const uint64_t stamp = o->hook.stamp;
  if (stamp <= slab_stamp_[s]) return;
  if (slab_stamp_[s]) slab_order_.erase({slab_stamp_[s], s});
  slab_stamp_[s] = stamp;
  slab_order_.insert({stamp, s});
}

void Storage::slab_unlink_locked(Object* o) {
  if (!o->data()) return;
  if (o->slab_prev)
    o->slab_prev->slab_next = o->slab_next;
  else
    slab_heads_[o->chunk.slab] = o->slab_next;
  if (!slab_heads_[o->chunk.slab] && slab_stamp_[o->chunk.slab]) {  // its last visible object
    slab_order_.erase({slab_stamp_[o->chunk.slab], o->chunk.slab});
    slab_stamp_[o->chunk.slab] = 0;
  }
  if (o->slab_next) o->slab_next->slab_prev = o->slab_prev;
  o->slab_prev = o->slab_next = nullptr;
}

NamespaceStats* Storage::ns_locked(std::string_view ns, bool create) {
  t_ns.assign(ns.data(), ns.size());
  auto it = namespaces_.find(t_ns);
  if (it != namespaces_.end()) return &it->second;
  if (!create) return nullptr;
  return &namespaces_.emplace(t_ns, NamespaceStats{}).first->second;
}

void Storage::ns_unlink_locked(Object* o, uint64_t NamespaceStats::* counter) {
  // `counter` (evictions, expired, deletes, or none) is counted for the object's namespace.
  NamespaceStats* n = o->ns;
  if (!n) return;
  o->ns = nullptr;
  if (counter) ++(n->*counter);
  --n->items;
  n->bytes -= o->value_len;
  if (n->items == 0) {
    const std::string_view key(o->index_key);
    namespaces_.erase(std::string(key.substr(0, key.find('\0'))));
  }
}

void Storage::remove_locked(Index::iterator it, uint64_t NamespaceStats::* counter) {
  Object* o = it->second.get();
  ns_unlink_locked(o, counter);
  RemoveReason why = RemoveReason::kDeleted;
  if (counter == &NamespaceStats::evictions) {
    why = RemoveReason::kEvicted;
    // Evictions by reason (disjoint): a raised-priority object, else the policy's segment it
    // left from (first sight or re-used).
    if (o->priority > 0)
      ++evicted_priority_;
    else if (policy_->segment_of(o) > 0)
      ++evicted_protected_;
    else
      ++evicted_probation_;
  } else if (counter == &NamespaceStats::expired) {
    why = RemoveReason::kExpired;
  }
  policy_->on_remove(o, why);
  exp_unlink_locked(o);
  slab_unlink_locked(o);
  o->indexed = false;
  stored_bytes_ -= o->value_len;
  index_.erase(it);  // may run ~Object (frees the chunk; the allocator lock is a leaf lock)
}

Object* Storage::find_live_locked(std::string_view ns, std::string_view key, int64_t now,
                                  Index::iterator* where) {
  make_index_key(ns, key, &t_key);
  auto it = index_.find(t_key);
  if (it == index_.end()) return nullptr;
  if (expired_locked(it->second.get(), now)) {
    remove_locked(it, &NamespaceStats::expired);
    ++expired_;
    return nullptr;
  }
  if (where) *where = it;
  return it->second.get();
}

uint64_t Storage::item_charge_bytes(std::size_t index_key_len) {
  // The fixed part (Object + control block, hash node, buckets, malloc headers) plus both copies
  // of the index key (the Object's and the hash node's) when they outgrow the string's inline
  // buffer: the key's bytes, its NUL and malloc's rounding.
  const uint64_t heap_key =
      index_key_len > kInlineKeyBytes ? ((index_key_len + 1 + 8 + 15) & ~uint64_t{15}) : 0;
  return per_object_overhead_bytes() + 2 * heap_key;
}

bool Storage::make_room_locked(bool need_chunk, uint32_t klass, uint32_t run_slabs) {
  // Evicts something so that a chunk of class `klass` (need_chunk), a run of `run_slabs`
  // contiguous slabs, or bookkeeping room (a free slab to lend, or charged bytes returned) may
  // come free. False when nothing is left to evict.
  //
  // Recency decides across size classes, at slab granularity: room comes from the slab whose
  // newest object is the oldest (slab_order_), emptied whole and handed to whichever class (or
  // run, or bookkeeping) needs it. Evicting one object at a time within the needing class would
  // let classes keep the slabs they got first (slab calcification: old 1 MiB values making a
  // new 16 KiB working set evict its own newest objects) and, for runs, evict objects whose
  // slabs never come free. Empty values hold no slab; they go first when they are older than
  // every slab, and so does the needing class's least recent object (one eviction, the right
  // chunk size, exact LRU within the class). A slab with a pinned object or a chunk the index cannot see (a
  // PUT being received, an evicted value still pinned) is skipped; when no slab can be emptied the least
  // recent object is evicted alone (its chunk frees room in its class).
  Object* lru = policy_->victim_any();
  const uint64_t oldest_slab = slab_order_.empty() ? UINT64_MAX : slab_order_.begin()->first;
  if (lru && !lru->data() && lru->hook.stamp <= oldest_slab) {
    remove_locked(index_.find(lru->index_key), &NamespaceStats::evictions);
    ++evictions_;
    return true;
  }
  if (need_chunk && run_slabs == 0) {
    // The class's own least recent object, when it is older than every slab's newest: evicting
    // it frees a chunk of the right size and is exactly LRU.
    Object* own = policy_->victim_in_class(klass);
    if (own && own->hook.stamp <= oldest_slab) {
      remove_locked(index_.find(own->index_key), &NamespaceStats::evictions);
      ++evictions_;
      return true;
    }
  }
  if (run_slabs > 0) {
    if (reclaim_window_locked(run_slabs)) return true;
  } else {
    for (const auto& [stamp, slab] : slab_order_) {
      const uint32_t was = slab_heads_[slab] ? slab_heads_[slab]->size_class() : klass;
      if (reclaim_slab_locked(slab)) {  // invalidates the iteration: return at once
        if (need_chunk && was != klass) ++slab_reassignments_;
        return true;
      }
    }
  }
  if (!lru) return false;  // nothing left to evict: the rest is pending or pinned
  remove_locked(index_.find(lru->index_key), &NamespaceStats::evictions);
  ++evictions_;
  return true;
}

bool Storage::reclaim_window_locked(uint32_t n) {
  std::vector<SlabAllocator::SlabState> st;
  alloc_.snapshot(&st);
  const uint32_t total = static_cast<uint32_t>(st.size());
  if (n == 0 || n > total) return false;
  // Cost of a slab: 0 free, its recency when it holds only visible objects, "never" otherwise
  // (bookkeeping, pending or pinned chunks). A run's slabs cost the run's recency.
  constexpr uint64_t kNever = UINT64_MAX;
  std::vector<uint64_t> cost(total, kNever);
  for (uint32_t i = 0; i < total; ++i) {
    if (st[i].klass == SlabAllocator::kNoClass) {
      cost[i] = 0;
      continue;
    }
    if (st[i].klass == SlabAllocator::kMetaClass) continue;
    const uint32_t head = st[i].run_first != SlabAllocator::kNoClass ? st[i].run_first : i;
    if (slab_heads_[head] && slab_stamp_[head]) cost[i] = slab_stamp_[head];
  }
  for (int attempt = 0; attempt < 8; ++attempt) {
    // The window whose newest slab is the oldest (a monotonic deque would be O(n); windows are
    // short, so the plain scan is fine).
    uint64_t best = kNever;
    uint32_t best_at = 0;
    for (uint32_t i = 0; i + n <= total; ++i) {
      uint64_t w = 0;
      for (uint32_t j = 0; j < n && w != kNever; ++j) w = std::max(w, cost[i + j]);
      if (w < best) {
        best = w;
        best_at = i;
      }
    }
    if (best == kNever) return false;
    bool ok = true;
    for (uint32_t j = 0; j < n && ok; ++j) {
      const uint32_t i = best_at + j;
      if (cost[i] == 0) continue;
      const uint32_t head = st[i].run_first != SlabAllocator::kNoClass ? st[i].run_first : i;
      if (!slab_heads_[head]) continue;  // emptied with an earlier slab of the same run
      if (!reclaim_slab_locked(head)) {
        cost[i] = kNever;  // pinned or pending: look for another window
        ok = false;
      }
    }
    if (ok) return true;
  }
  return false;
}

ObjectRef Storage::reserve(std::string_view ns, std::string_view key, uint64_t len, uint64_t checksum,
                           proto::Status* why, bool may_evict) {
  std::string ikey;
  make_index_key(ns, key, &ikey);
  if (len > alloc_.max_allocation()) {
    *why = proto::Status::kTooLarge;
    return nullptr;
  }
  const uint64_t meta = item_charge_bytes(ikey.size());
  bool charged = alloc_.charge_meta(meta);
  std::optional<SlabAllocator::Chunk> chunk;
  if (len) chunk = alloc_.allocate(len);
  if ((!charged || (len && !chunk)) && may_evict) {
    const uint32_t klass = len ? alloc_.class_of(len) : 0;
    const uint32_t run = klass == alloc_.large_class()
                             ? static_cast<uint32_t>((len + alloc_.slab_bytes() - 1) / alloc_.slab_bytes())
                             : 0;
    std::lock_guard<std::mutex> lock(mu_);
    for (;;) {
      if (!charged) charged = alloc_.charge_meta(meta);
      if (len && !chunk) chunk = alloc_.allocate(len);
      if (charged && (!len || chunk)) break;
      const bool need_chunk = len && !chunk;
      if (!make_room_locked(need_chunk, klass, need_chunk ? run : 0)) break;
    }
  }
  if (!charged || (len && !chunk)) {
    if (charged) alloc_.uncharge_meta(meta);
    if (chunk) alloc_.free(*chunk);
    *why = proto::Status::kNoSpace;
    return nullptr;
  }
  SlabAllocator::Chunk none;
  none.klass = 0;  // empty values take no chunk; class 0 keeps them on an ordinary LRU list
  auto obj = std::make_shared<Object>(&alloc_, chunk ? *chunk : none, std::move(ikey), len, checksum, meta);
  obj->priority = priority_of(ns);
  return obj;
}

void Storage::publish(const ObjectRef& obj, const ObjectRef& chain_prev) {
  ObjectRef old;  // released after the lock, so freeing the old chunk happens outside it
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = now_ns();
  obj->expires_at_ns = ttl_ns_ > 0 ? now + ttl_ns_ : 0;
  const std::string_view ikey(obj->index_key);
  NamespaceStats* ns = ns_locked(ikey.substr(0, ikey.find('\0')), /*create=*/true);
  ++ns->items;  // before the old version leaves, so the entry is not dropped and remade
  ns->bytes += obj->value_len;
  ++ns->puts;
  obj->ns = ns;
  auto [it, inserted] = index_.try_emplace(obj->index_key, obj);
  if (!inserted) {
    Object* prev = it->second.get();
    ns_unlink_locked(prev, nullptr);
    policy_->on_remove(prev, RemoveReason::kReplaced);
    exp_unlink_locked(prev);
    slab_unlink_locked(prev);
    prev->indexed = false;
    stored_bytes_ -= prev->value_len;
    old = std::move(it->second);
    it->second = obj;
  }
  obj->indexed = true;
  stored_bytes_ += obj->value_len;
  if (chain_prev && chain_prev->indexed && chain_prev != obj)
    policy_->on_insert_behind(obj.get(), chain_prev.get());
  else
    policy_->on_insert(obj.get());
  exp_link_locked(obj.get());
  slab_link_locked(obj.get());
  slab_touch_locked(obj.get());
  ++puts_;
}

void Storage::get_many(std::string_view ns, const std::vector<std::string_view>& keys,
                       std::vector<ObjectRef>* out) {
  out->clear();
  out->reserve(keys.size());
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = now_ns();
  uint64_t hits = 0;
  for (auto k : keys) {
    Index::iterator it;
    Object* o = find_live_locked(ns, k, now, &it);
    if (!o) {
      out->emplace_back();
      continue;
    }
    ++hits;
    out->push_back(it->second);  // the pin
  }
  // Recency tail first: a batch is a prefix chain in order, so its head ends up the most
  // recent and a block is never kept after its predecessor (list_policy.h).
  for (auto r = out->rbegin(); r != out->rend(); ++r) {
    if (!*r) continue;
    policy_->on_access(r->get());
    slab_touch_locked(r->get());
  }
  hits_ += hits;
  misses_ += keys.size() - hits;
  if (NamespaceStats* n = ns_locked(ns, false)) {  // after the loop: expiry may have dropped it
    n->hits += hits;
    n->misses += keys.size() - hits;
    ++n->gets;
  }
}

void Storage::exists_many(std::string_view ns, const std::vector<std::string_view>& keys,
                          std::vector<uint8_t>* present) {
  present->assign(keys.size(), 0);
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = now_ns();
  for (std::size_t i = 0; i < keys.size(); ++i)
    (*present)[i] = find_live_locked(ns, keys[i], now, nullptr) != nullptr;
}

uint32_t Storage::lookup_prefix(std::string_view ns, const std::vector<std::string_view>& keys) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = now_ns();
  uint32_t n = 0;
  for (auto k : keys) {
    if (!find_live_locked(ns, k, now, nullptr)) break;
    ++n;
  }
  return n;
}

uint32_t Storage::erase_many(std::string_view ns, const std::vector<std::string_view>& keys) {
  std::vector<ObjectRef> dropped;  // freed after the lock
  dropped.reserve(keys.size());
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = now_ns();
  uint32_t n = 0;
  for (auto k : keys) {
    Index::iterator it;
    if (!find_live_locked(ns, k, now, &it)) continue;
    dropped.push_back(it->second);
    remove_locked(it, &NamespaceStats::deletes);
    ++n;
  }
  deletes_ += n;
  return n;
}

std::size_t Storage::sweep_expired(std::size_t max_items) {
  if (ttl_ns_ <= 0) return 0;
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = now_ns();
  std::size_t n = 0;
  while (exp_head_ && n < max_items && expired_locked(exp_head_, now)) {
    auto it = index_.find(exp_head_->index_key);
    remove_locked(it, &NamespaceStats::expired);
    ++expired_;
    ++n;
  }
  return n;
}

bool Storage::reclaim_slab_locked(uint32_t slab) {
  // Check first, evict second: evicting part of a slab that then stays allocated would throw
  // away objects for nothing. An object is pinned when anything beyond the index holds a
  // reference; pins are only taken under this lock, so a count of 1 cannot grow under us.
  std::vector<Index::iterator> victims;
  for (Object* o = slab_heads_[slab]; o; o = o->slab_next) {
    auto it = index_.find(o->index_key);
    if (it == index_.end() || it->second.use_count() != 1) return false;
    victims.push_back(it);
  }
  // Chunks the index cannot see (pending PUTs, evicted values still pinned) keep the slab busy.
  if (victims.empty() || alloc_.chunks_used(slab) != victims.size()) return false;
  for (auto it : victims) {  // erasing one unordered_map node leaves the other iterators valid
    remove_locked(it, &NamespaceStats::evictions);
    ++evictions_;
  }
  return true;
}

NamespaceStats Storage::namespace_stats(std::string_view ns) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = namespaces_.find(std::string(ns));
  return it == namespaces_.end() ? NamespaceStats{} : it->second;
}

std::vector<std::pair<std::string, NamespaceStats>> Storage::all_namespace_stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {namespaces_.begin(), namespaces_.end()};
}

uint8_t Storage::priority_of(std::string_view ns) const {
  for (const auto& [pattern, prio] : namespace_priority_)
    if (glob_match(pattern, ns)) return std::min<uint8_t>(prio, kMaxPriority);
  return 0;
}

StorageStats Storage::stats() const {
  StorageStats s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s.stored_bytes = stored_bytes_;
    s.items = index_.size();
    s.hits = hits_;
    s.misses = misses_;
    s.evictions = evictions_;
    s.expired = expired_;
    s.puts = puts_;
    s.deletes = deletes_;
    s.slab_reassignments = slab_reassignments_;
    s.evicted_probation = evicted_probation_;
    s.evicted_protected = evicted_protected_;
    s.evicted_priority = evicted_priority_;
  }
  s.policy = policy_->name();
  s.capacity_bytes = alloc_.capacity();
  s.allocated_bytes = alloc_.slab_bytes_in_use();
  s.chunk_bytes = alloc_.chunk_bytes_in_use();
  s.meta_bytes = alloc_.meta_bytes();
  s.meta_slab_bytes = alloc_.meta_slabs() * alloc_.slab_bytes();
  const uint64_t value_slabs = s.allocated_bytes - std::min(s.allocated_bytes, s.meta_slab_bytes);
  s.fragmentation =
      value_slabs ? double(value_slabs - std::min(value_slabs, s.stored_bytes)) / double(value_slabs) : 0.0;
  return s;
}

}  // namespace membrain::server
