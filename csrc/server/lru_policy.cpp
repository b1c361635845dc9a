#include "server/lru_policy.h"

#include <stdexcept>

namespace membrain::server {

void LruPolicy::link_front(Object* o) {
  List& l = lists_.at(o->size_class());
  o->hook.prev = nullptr;
  o->hook.next = l.head;
  if (l.head) l.head->hook.prev = o;
  l.head = o;
  if (!l.tail) l.tail = o;
  o->hook.linked = true;
  o->hook.stamp = ++clock_;
}

void LruPolicy::unlink(Object* o) {
  if (!o->hook.linked) return;
  List& l = lists_.at(o->size_class());
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

void LruPolicy::on_insert(Object* o) {
  link_front(o);
}

void LruPolicy::on_access(Object* o) {
  unlink(o);
  link_front(o);
}

void LruPolicy::on_remove(Object* o) {
  unlink(o);
}

Object* LruPolicy::victim_in_class(uint32_t klass) {
  return klass < lists_.size() ? lists_[klass].tail : nullptr;
}

Object* LruPolicy::victim_any() {
  Object* best = nullptr;
  for (const List& l : lists_)
    if (l.tail && (!best || l.tail->hook.stamp < best->hook.stamp)) best = l.tail;
  return best;
}

std::unique_ptr<EvictionPolicy> make_eviction_policy(const std::string& name, uint32_t num_classes) {
  if (name == "lru") return std::make_unique<LruPolicy>(num_classes);
  throw std::invalid_argument("unknown eviction policy '" + name + "' (known: lru)");
}

}  // namespace membrain::server
