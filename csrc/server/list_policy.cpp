#include "server/list_policy.h"

#include <algorithm>
#include <functional>
#include <stdexcept>

namespace membrain::server {

ListPolicy::ListPolicy(uint32_t num_classes, uint32_t segments)
    : segments_(segments), lists_(std::size_t{num_classes} * (kMaxPriority + 1) * segments) {}

void ListPolicy::link_front(Object* o, uint8_t segment) {
  const uint8_t prio = std::min<uint8_t>(o->priority, kMaxPriority);
  segment = std::min<uint8_t>(segment, static_cast<uint8_t>(segments_ - 1));
  const uint32_t idx = o->size_class() * lists_per_class() + prio * segments_ + segment;
  List& l = lists_.at(idx);
  o->hook.prev = nullptr;
  o->hook.next = l.head;
  if (l.head) l.head->hook.prev = o;
  l.head = o;
  if (!l.tail) l.tail = o;
  o->hook.linked = true;
  o->hook.list = idx;
  o->hook.segment = segment;
  o->hook.stamp = make_stamp(prio, segment, ++clock_);
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
}

void ListPolicy::on_insert(Object* o) {
  ++live_;
  link_front(o, insert_segment(o));
}

void ListPolicy::on_access(Object* o) {
  if (!o->hook.linked) return;
  const uint8_t seg = std::max(o->hook.segment, access_segment(o));
  unlink(o);
  link_front(o, seg);
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

uint64_t SlruPolicy::key_hash(const Object* o) {
  return std::hash<std::string_view>{}(o->index_key);
}

uint8_t SlruPolicy::insert_segment(Object* o) {
  // Seen before: its hash is still in the ghost list (it ages out there with its FIFO entry).
  return ghost_.count(key_hash(o)) ? 1 : 0;
}

void SlruPolicy::removed(Object* o, RemoveReason why) {
  if (why != RemoveReason::kEvicted && why != RemoveReason::kReplaced) return;
  const uint64_t h = key_hash(o);
  ++ghost_[h];
  ghost_fifo_.push_back(h);
  const std::size_t cap = static_cast<std::size_t>(ghost_factor_ * double(std::max<uint64_t>(live(), 16)));
  while (ghost_fifo_.size() > cap) {
    auto it = ghost_.find(ghost_fifo_.front());
    if (it != ghost_.end() && --it->second == 0) ghost_.erase(it);
    ghost_fifo_.pop_front();
  }
}

std::unique_ptr<EvictionPolicy> make_eviction_policy(const std::string& name, uint32_t num_classes) {
  if (name == "lru") return std::make_unique<LruPolicy>(num_classes);
  if (name == "slru") return std::make_unique<SlruPolicy>(num_classes);
  throw std::invalid_argument("unknown eviction policy '" + name + "' (known: lru, slru)");
}

std::vector<std::string> eviction_policy_names() {
  return {"lru", "slru"};
}

}  // namespace membrain::server
