#include "server/list_policy.h"

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <stdexcept>

namespace membrain::server {

ListPolicy::ListPolicy(uint32_t num_classes, uint32_t segments)
    : segments_(segments), lists_(std::size_t{num_classes} * (kMaxPriority + 1) * segments) {}

uint32_t ListPolicy::list_index(const Object* o, uint8_t segment) const {
  const uint8_t prio = std::min<uint8_t>(o->priority, kMaxPriority);
  segment = std::min<uint8_t>(segment, static_cast<uint8_t>(segments_ - 1));
  return o->size_class() * lists_per_class() + prio * segments_ + segment;
}

void ListPolicy::link_front(Object* o, uint8_t segment) {
  const uint8_t prio = std::min<uint8_t>(o->priority, kMaxPriority);
  segment = std::min<uint8_t>(segment, static_cast<uint8_t>(segments_ - 1));
  const uint32_t idx = list_index(o, segment);
  List& l = lists_.at(idx);
  o->hook.prev = nullptr;
  o->hook.next = l.head;
  if (l.head) l.head->hook.prev = o;
  l.head = o;
  if (!l.tail) l.tail = o;
  o->hook.linked = true;
  o->hook.list = idx;
  o->hook.segment = segment;
  if (prio == 0) ++seg_count_[segment];
  clock_ += kStampGap;
  o->hook.stamp = make_stamp(prio, segment, clock_);
}

void ListPolicy::unlink(Object* o) {
  if (!o->hook.linked) return;
  List& l = lists_[o->hook.list];
  if (o->hook.prev)
    o->hook.prev->hook.next = o->hook.next;
  else
    l.head = o->hook.next;
  if (o->hook.next)
    o->hook.next->hook.prev = o->hook.prev;
  else
    l.tail = o->hook.prev;
  o->hook.prev = o->hook.next = nullptr;
  o->hook.linked = false;
  if (o->priority == 0) --seg_count_[o->hook.segment];
}

void ListPolicy::on_insert(Object* o) {
  ++live_;
  link_front(o, insert_segment(o));
  if (segments_ > 1 && o->hook.segment == segments_ - 1) promoted();
}

Object* ListPolicy::demote_oldest(uint8_t from, uint8_t to) {
  Object* best = nullptr;
  const uint32_t per = lists_per_class();
  for (std::size_t base = 0; base < lists_.size(); base += per) {
    Object* t = lists_[base + from].tail;  // priority 0, segment `from`
    if (t && (!best || t->hook.stamp < best->hook.stamp)) best = t;
  }
  if (!best) return nullptr;
  unlink(best);
  link_front(best, to);
  return best;
}

void ListPolicy::on_insert_behind(Object* o, Object* prev) {
  const uint8_t seg = static_cast<uint8_t>(std::min<uint32_t>(insert_segment(o), segments_ - 1));
  const uint32_t idx = list_index(o, seg);
  // Just behind `prev` when it is in the same list and its stamp leaves room below it (above
  // the next older object's), so list order and stamp order still agree.
  Object* older = prev->hook.next;
  const uint64_t floor = older ? older->hook.stamp : 0;
  ++live_;
  if (!prev->hook.linked || prev->hook.list != idx || prev->hook.stamp <= floor + 1) {
    link_front(o, seg);
    if (segments_ > 1 && seg == segments_ - 1) promoted();
    return;
  }
  o->hook.prev = prev;
  o->hook.next = older;
  prev->hook.next = o;
  if (older)
    older->hook.prev = o;
  else
    lists_[idx].tail = o;
  o->hook.linked = true;
  o->hook.list = idx;
  o->hook.segment = seg;
  o->hook.stamp = prev->hook.stamp - 1;
  if (o->priority == 0) ++seg_count_[seg];
  if (segments_ > 1 && seg == segments_ - 1) promoted();
}

void ListPolicy::on_access(Object* o) {
  if (!o->hook.linked) return;
  const uint8_t seg = std::max(o->hook.segment, access_segment(o));
  const bool entered = seg != o->hook.segment;
  unlink(o);
  link_front(o, seg);
  if (entered && segments_ > 1 && seg == segments_ - 1) promoted();
}

void ListPolicy::on_remove(Object* o, RemoveReason why) {
  if (!o->hook.linked) return;
  unlink(o);
  --live_;
  removed(o, why);
}

Object* ListPolicy::victim_in_class(uint32_t klass) {
  const uint32_t per = lists_per_class();
  if (std::size_t{klass} * per >= lists_.size()) return nullptr;
  Object* best = nullptr;
  for (uint32_t i = klass * per; i < (klass + 1) * per; ++i) {
    Object* t = lists_[i].tail;
    if (t && (!best || t->hook.stamp < best->hook.stamp)) best = t;
  }
  return best;
}

Object* ListPolicy::victim_any() {
  Object* best = nullptr;
  for (const List& l : lists_)
    if (l.tail && (!best || l.tail->hook.stamp < best->hook.stamp)) best = l.tail;
  return best;
}

namespace {
uint64_t mix(uint64_t x) {  // splitmix64's finalizer: spreads std::hash's output over all bits
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
}  // namespace

uint64_t GhostList::fingerprint_of(uint64_t hash) {
  const uint64_t fp = mix(hash) >> 16;  // 48 bits
  return fp ? fp : 1;
}

std::size_t GhostList::probe(uint64_t fp) const {
  const std::size_t mask = table_.size() - 1;
  std::size_t i = fp & mask;
  while (table_[i] != 0 && (table_[i] >> 16) != fp) i = (i + 1) & mask;
  return i;
}

void GhostList::rehash(std::size_t slots) {
  std::vector<uint64_t> old = std::move(table_);
  table_.assign(slots, 0);
  for (uint64_t e : old)
    if (e) table_[probe(e >> 16)] = e;
}

void GhostList::add(uint64_t fp) {
  if ((used_ + 1) * 2 > table_.size()) rehash(std::max<std::size_t>(32, table_.size() * 2));
  const std::size_t i = probe(fp);
  if (table_[i] == 0) {
    table_[i] = (fp << 16) | 1;
    ++used_;
  } else if ((table_[i] & 0xffff) < 0xffff) {
    ++table_[i];  // the same key evicted again within the window
  }
}

void GhostList::remove_one(uint64_t fp) {
  std::size_t i = probe(fp);
  if (table_[i] == 0) return;
  if ((table_[i] & 0xffff) > 1) {
    --table_[i];
    return;
  }
  // Backward-shift deletion keeps every run of linear probing unbroken.
  const std::size_t mask = table_.size() - 1;
  for (std::size_t j = (i + 1) & mask; table_[j] != 0; j = (j + 1) & mask) {
    const std::size_t home = (table_[j] >> 16) & mask;
    const bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
    if (!stays) {
      table_[i] = table_[j];
      i = j;
    }
  }
  table_[i] = 0;
  --used_;
}

void GhostList::insert(uint64_t hash, std::size_t capacity) {
  while (size_ > 0 && size_ >= capacity) {  // forget the oldest (amortised O(1))
    remove_one(ring_[head_]);
    head_ = (head_ + 1) % ring_.size();
    --size_;
  }
  if (capacity == 0) return;
  if (size_ == ring_.size()) {  // grow the ring, oldest first
    std::vector<uint64_t> grown(std::max<std::size_t>(16, ring_.size() * 2));
    for (std::size_t k = 0; k < size_; ++k) grown[k] = ring_[(head_ + k) % ring_.size()];
    ring_ = std::move(grown);
    head_ = 0;
  }
  const uint64_t fp = fingerprint_of(hash);
  ring_[(head_ + size_) % ring_.size()] = fp;
  ++size_;
  add(fp);
}

bool GhostList::contains(uint64_t hash) const {
  return !table_.empty() && table_[probe(fingerprint_of(hash))] != 0;
}

uint64_t SlruPolicy::key_hash(const Object* o) {
  return std::hash<std::string_view>{}(o->index_key);
}

void SlruPolicy::promoted() {
  while (double(in_segment(1)) > protected_fraction_ * double(live()) && demote_oldest(1, 0)) {
  }
}

uint8_t SlruPolicy::insert_segment(Object* o) {
  return ghost_.contains(key_hash(o)) ? 1 : 0;  // seen before: evicted or replaced recently
}

void SlruPolicy::removed(Object* o, RemoveReason why) {
  if (why != RemoveReason::kEvicted && why != RemoveReason::kReplaced) return;
  ghost_.insert(key_hash(o),
                static_cast<std::size_t>(ghost_factor_ * double(std::max<uint64_t>(live(), 16))));
}

std::unique_ptr<EvictionPolicy> make_eviction_policy(const std::string& name, uint32_t num_classes) {
  if (name == "lru") return std::make_unique<LruPolicy>(num_classes);
  if (name == "slru") return std::make_unique<SlruPolicy>(num_classes);
  if (name.rfind("slru:", 0) == 0) {  // "slru:G[:P]": ghost factor G, protected fraction P (tuning)
    char* end = nullptr;
    const double g = std::strtod(name.c_str() + 5, &end);
    double p = 0.875;
    if (end && *end == ':') p = std::strtod(end + 1, &end);
    if (end && *end == '\0' && g > 0 && g <= 64 && p > 0 && p <= 1)
      return std::make_unique<SlruPolicy>(num_classes, g, p);
  }
  throw std::invalid_argument("unknown eviction policy '" + name + "' (known: lru, slru)");
}

std::vector<std::string> eviction_policy_names() {
  return {"lru", "slru"};
}

}  // namespace membrain::server
