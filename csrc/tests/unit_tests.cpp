// C++ unit tests of the server core (membrain_core): slab allocator, eviction, storage and the
// transport-neutral session. No framework: each TEST registers itself, CHECK records failures,
// and main() prints "N passed, M failed" (and exits non-zero on a failure). Run by ctest and by
// tests/test_cpp_units.py; build with -DMEMBRAIN_SANITIZE=address,undefined to run them under
// the sanitizers.
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include "server/config.h"
#include "server/context.h"
#include "server/list_policy.h"
#include "server/policy_index.h"
#include "server/session.h"
#include "server/slab_allocator.h"
#include "server/storage.h"

using namespace membrain;
using namespace membrain::server;
using proto::Status;

namespace {

struct Test {
  const char* name;
  std::function<void()> fn;
};
std::vector<Test>& registry() {
  static std::vector<Test> tests;
  return tests;
}
int g_failures = 0;

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

#define TEST(name)                                    \
  void test_##name();                                 \
  const Register register_##name(#name, test_##name); \
  void test_##name()

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                                   \
    }                                                                                 \
  } while (0)

constexpr uint64_t KiB = 1024, MiB = 1024 * 1024;

Storage::Options opts(uint64_t capacity, uint64_t slab) {
  Storage::Options o;
  o.capacity_bytes = capacity;
  o.slab_bytes = slab;
  return o;
}

ObjectRef put(Storage& s, const std::string& key, uint64_t len, std::string_view ns = "default") {
  Status why = Status::kOk;
  ObjectRef o = s.reserve(ns, key, len, 0, &why);
  if (o) s.publish(o);
  return o;
}

bool present(Storage& s, const std::string& key, std::string_view ns = "default") {
  std::vector<ObjectRef> out;
  s.get_many(ns, {key}, &out);
  return out[0] != nullptr;
}

// --- slab allocator ---------------------------------------------------------------------------

TEST(slab_classes_round_up_and_chunks_are_reused) {
  SlabAllocator a(1 * MiB, 64 * KiB);
  CHECK(a.num_slabs() == 16);
  auto c = a.allocate(100);
  CHECK(c && c->bytes == 112 && c->nslabs == 0);  // 64 x 1.75
  auto d = a.allocate(100);
  CHECK(d && d->data != c->data && d->slab == c->slab);
  const uint8_t* where = c->data;
  a.free(*c);
  auto e = a.allocate(100);
  CHECK(e && e->data == where);  // the freed chunk comes back first
  a.free(*d);
  a.free(*e);
  CHECK(a.slab_bytes_in_use() == 0 && a.chunk_bytes_in_use() == 0);  // an empty slab is free again
}

TEST(slab_runs_take_contiguous_slabs) {
  SlabAllocator a(1 * MiB, 64 * KiB);
  auto r = a.allocate(200 * KiB);
  CHECK(r && r->nslabs == 4 && r->bytes == 256 * KiB && r->klass == a.large_class());
  CHECK(a.slab_bytes_in_use() == 256 * KiB);
  auto big = a.allocate(1 * MiB);
  CHECK(!big);  // 12 slabs left
  a.free(*r);
  big = a.allocate(1 * MiB);
  CHECK(big && big->nslabs == 16);
  a.free(*big);
}

TEST(meta_charge_lends_whole_slabs_and_returns_them) {
  SlabAllocator a(256 * KiB, 64 * KiB);  // 4 slabs
  CHECK(a.charge_meta(1000) && a.meta_slabs() == 1);
  CHECK(a.charge_meta(64 * KiB) && a.meta_slabs() == 2);
  auto c = a.allocate(64 * KiB);
  auto d = a.allocate(64 * KiB);
  CHECK(c && d);
  CHECK(!a.allocate(64));            // every slab is lent or used
  CHECK(!a.charge_meta(128 * KiB));  // and bookkeeping cannot grow past capacity either
  a.uncharge_meta(64 * KiB);         // one slab of slack is kept
  CHECK(a.meta_slabs() == 2);
  a.uncharge_meta(1000);
  CHECK(a.meta_slabs() == 0 && a.meta_bytes() == 0);
  a.free(*c);
  a.free(*d);
}

// --- eviction ---------------------------------------------------------------------------------

TEST(lru_victims_follow_recency_across_classes) {
  SlabAllocator a(1 * MiB, 64 * KiB);
  LruPolicy lru(a.num_classes());
  std::vector<std::unique_ptr<Object>> objs;
  for (uint64_t len : {100, 5000, 100, 20000}) {
    auto c = a.allocate(len);
    objs.push_back(std::make_unique<Object>(&a, *c, "k" + std::to_string(objs.size()), len, 0));
    lru.on_insert(objs.back().get());
  }
  CHECK(lru.victim_any() == objs[0].get());
  lru.on_access(objs[0].get());
  CHECK(lru.victim_any() == objs[1].get());
  CHECK(lru.victim_in_class(objs[0]->size_class()) == objs[2].get());
  for (auto& o : objs) lru.on_remove(o.get(), RemoveReason::kDeleted);
  CHECK(lru.victim_any() == nullptr);
}

TEST(slru_evicts_first_sight_before_reused_and_remembers_ghosts) {
  SlruPolicy p(1, 3.0, /*protected_fraction=*/1.0);  // no cap: see the test below for it
  SlabAllocator::Chunk none;
  none.klass = 0;
  std::vector<std::unique_ptr<Object>> objs;
  for (int i = 0; i < 4; ++i) {
    objs.push_back(std::make_unique<Object>(nullptr, none, "k" + std::to_string(i), 0, 0));
    p.on_insert(objs.back().get());
  }
  p.on_access(objs[0].get());  // k0 is re-used: protected, kept after every first-sight key
  CHECK(p.victim_any() == objs[1].get());
  p.on_remove(objs[1].get(), RemoveReason::kEvicted);
  CHECK(p.victim_any() == objs[2].get());
  p.on_remove(objs[2].get(), RemoveReason::kEvicted);
  p.on_remove(objs[3].get(), RemoveReason::kEvicted);
  CHECK(p.victim_any() == objs[0].get());
  // k1 comes back: its ghost puts it straight into protected, after the older k0.
  auto again = std::make_unique<Object>(nullptr, none, "k1", 0, 0);
  p.on_insert(again.get());
  CHECK(again->hook.segment == 1 && p.victim_any() == objs[0].get());
  // A deleted key leaves no ghost.
  auto fresh = std::make_unique<Object>(nullptr, none, "k9", 0, 0);
  p.on_insert(fresh.get());
  CHECK(fresh->hook.segment == 0 && p.victim_any() == fresh.get());
  p.on_remove(fresh.get(), RemoveReason::kDeleted);
  p.on_insert(fresh.get());
  CHECK(fresh->hook.segment == 0);
}

TEST(ghost_list_is_a_fifo_of_the_last_keys) {
  // Against a plain FIFO + multiset model, with repeats and a capacity that shrinks and grows.
  GhostList g;
  std::deque<uint64_t> fifo;
  std::unordered_map<uint64_t, int> count;
  uint64_t x = 99;
  int mismatches = 0;
  for (int i = 0; i < 200000; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    const uint64_t key = (x >> 40) % 5000;  // repeats within the window
    const std::size_t cap = i < 100000 ? 1000 : (i < 150000 ? 300 : 2500);
    while (!fifo.empty() && fifo.size() >= cap) {
      if (--count[fifo.front()] == 0) count.erase(fifo.front());
      fifo.pop_front();
    }
    fifo.push_back(key);
    ++count[key];
    g.insert(key, cap);
    const uint64_t probe = (x >> 20) % 5000;
    if (g.contains(probe) != (count.count(probe) != 0)) ++mismatches;
  }
  CHECK(mismatches == 0 && g.size() == fifo.size());
  CHECK(g.bytes() <= 8 * (2 * 2500 + 4 * 2500 + 64));
}

TEST(lru_stamps_keep_priorities_apart) {
  LruPolicy p(1);
  SlabAllocator::Chunk none;
  none.klass = 0;
  Object hi(nullptr, none, "hi", 0, 0), lo(nullptr, none, "lo", 0, 0);
  hi.priority = 2;
  p.on_insert(&hi);
  p.on_insert(&lo);
  p.on_access(&hi);
  CHECK(p.victim_any() == &lo);  // older, but of a higher priority
  p.on_remove(&lo, RemoveReason::kEvicted);
  CHECK(p.victim_any() == &hi);
}

std::vector<std::string> chain(int first, int n) {
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i) out.push_back("b" + std::to_string(first + i));
  return out;
}

TEST(policy_index_evicts_chain_tails_first) {
  for (const char* name : {"lru", "slru"}) {
    PolicyIndex idx(name, 6);
    idx.request(chain(0, 4));    // a0..a3
    idx.request(chain(100, 4));  // two more blocks than fit: the older chain loses its tail
    CHECK(idx.size() == 6);
    CHECK(idx.contains("b0") && idx.contains("b1") && !idx.contains("b2") && !idx.contains("b3"));
    // Over a random stream of overlapping chains, a held block's predecessor is always held.
    PolicyIndex r(name, 50);
    uint64_t x = 12345;
    for (int i = 0; i < 2000; ++i) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      const int head = static_cast<int>((x >> 33) % 40) * 1000, len = 1 + static_cast<int>((x >> 20) % 30);
      r.request(chain(head, len));
    }
    int broken = 0;
    for (const std::string& k : r.keys()) {
      const int id = std::stoi(k.substr(1));
      if (id % 1000 != 0 && !r.contains("b" + std::to_string(id - 1))) ++broken;
    }
    CHECK(broken == 0);
  }
}

TEST(slru_values_read_twice_soon_still_find_room_in_probation) {
  // Each chain is read again by the next request and never after: protected fills with them,
  // and only its cap (its oldest back to probation) leaves new chains room until their second
  // read. Without the cap slru would hit almost nothing here.
  PolicyIndex lru("lru", 200), slru("slru", 200), nocap("slru:3:1", 200);
  uint64_t hits_lru = 0, hits_slru = 0, hits_nocap = 0;
  for (int i = 0; i < 3000; ++i) {
    const int id = i % 2 == 0 ? i : i - 1;  // odd requests re-read the previous chain
    hits_nocap += nocap.request(chain(id * 100, 20));
    hits_lru += lru.request(chain(id * 100, 20));
    hits_slru += slru.request(chain(id * 100, 20));
  }
  CHECK(hits_lru > 20000 && hits_slru * 100 >= hits_lru * 99 && hits_nocap * 10 < hits_lru);
}

TEST(policy_index_high_priority_prefix_survives_a_scan) {
  for (const char* name : {"lru", "slru"}) {
    PolicyIndex idx(name, 100);
    idx.request(chain(0, 10), /*priority=*/1);                            // a system prompt
    for (int i = 0; i < 100; ++i) idx.request(chain(1000 + 50 * i, 50));  // one-off documents
    CHECK(idx.prefix_hits(chain(0, 10)) == 10);
    CHECK(idx.evicted_priority() == 0 && idx.evictions() > 4000);
  }
}

TEST(policy_index_admission_on_second_sight) {
  PolicyIndex idx("lru", 10, "seen");
  idx.request(chain(0, 3));
  CHECK(idx.size() == 0);
  idx.request(chain(0, 3));
  CHECK(idx.prefix_hits(chain(0, 3)) == 3);
}

// --- storage ----------------------------------------------------------------------------------

TEST(storage_publish_get_overwrite_erase) {
  Storage s(opts(4 * MiB, 64 * KiB));
  ObjectRef v1 = put(s, "k", 1000);
  CHECK(v1 && present(s, "k"));
  CHECK(!present(s, "k", "other"));  // namespaces never collide
  ObjectRef v2 = put(s, "k", 2000);
  std::vector<ObjectRef> out;
  s.get_many("default", {"k"}, &out);
  CHECK(out[0] == v2 && out[0]->value_len == 2000);
  CHECK(s.erase_many("default", {"k", "missing"}) == 1);
  CHECK(!present(s, "k"));
  CHECK(s.stats().items == 0 && s.stats().stored_bytes == 0);
}

TEST(storage_charges_bookkeeping_so_empty_values_are_bounded) {
  Storage s(opts(1 * MiB, 64 * KiB));
  for (int i = 0; i < 100000; ++i) CHECK(put(s, "key-" + std::to_string(i), 0));
  const StorageStats st = s.stats();
  CHECK(st.evictions > 0);
  CHECK(st.items * Storage::item_charge_bytes(std::string("default\0key-00000", 17).size()) <=
        st.capacity_bytes);
  CHECK(st.meta_bytes <= st.meta_slab_bytes && st.allocated_bytes <= st.capacity_bytes);
  CHECK(present(s, "key-99999") && !present(s, "key-0"));
}

TEST(storage_without_eviction_uses_free_space_only) {
  Storage s(opts(1 * MiB, 64 * KiB));
  int stored = 0;
  while (s.stats().evictions == 0 && stored < 100) {
    Status why;
    ObjectRef o = s.reserve("default", "f" + std::to_string(stored), 60 * KiB, 0, &why, /*may_evict=*/false);
    if (!o) break;
    s.publish(o);
    ++stored;
  }
  CHECK(stored > 0 && s.stats().evictions == 0);
  Status why = Status::kOk;
  CHECK(!s.reserve("default", "x", 60 * KiB, 0, &why, false) && why == Status::kNoSpace);
  CHECK(s.stats().evictions == 0);
  CHECK(s.reserve("default", "x", 60 * KiB, 0, &why, true));  // evicting is allowed
  CHECK(s.stats().evictions > 0);
}

TEST(storage_lru_evicts_least_recent_and_pins_hold) {
  Storage s(opts(8 * MiB, 1 * MiB));  // 1 slab for bookkeeping, 7 for values of 1 MiB
  for (int i = 0; i < 7; ++i) put(s, "k" + std::to_string(i), 1 * MiB);
  CHECK(s.stats().evictions == 0);
  std::vector<ObjectRef> pin;
  s.get_many("default", {"k0"}, &pin);  // k0 most recent, and pinned
  put(s, "k7", 1 * MiB);
  CHECK(present(s, "k0") && !present(s, "k1") && present(s, "k7"));
  CHECK(s.erase_many("default", {"k0"}) == 1);
  CHECK(pin[0]->data() != nullptr);  // the pin keeps the bytes until it goes
  CHECK(s.stats().allocated_bytes <= s.stats().capacity_bytes);
}

TEST(storage_per_namespace_figures) {
  Storage s(opts(4 * MiB, 64 * KiB));
  put(s, "a", 10, "ns1");
  put(s, "b", 20, "ns1");
  put(s, "a", 5, "ns2");
  std::vector<ObjectRef> out;
  s.get_many("ns1", {"a", "zz"}, &out);
  NamespaceStats n1 = s.namespace_stats("ns1");
  CHECK(n1.items == 2 && n1.bytes == 30 && n1.hits == 1 && n1.misses == 1 && n1.puts == 2);
  CHECK(s.erase_many("ns2", {"a"}) == 1);
  CHECK(s.namespace_stats("ns2").items == 0 && s.all_namespace_stats().size() == 1);
}

TEST(storage_slru_counts_evictions_by_reason_and_namespace_priority_survives_a_scan) {
  Storage::Options o = opts(8 * MiB, 1 * MiB);  // 7 slabs of 1 MiB values
  o.namespace_priority = {{"sys*", 1}};
  Storage s(o);
  CHECK(s.stats().policy == std::string("slru"));
  put(s, "prompt", 1 * MiB, "system");
  put(s, "hot", 1 * MiB);
  std::vector<ObjectRef> out;
  s.get_many("default", {"hot"}, &out);  // re-used: protected
  out.clear();
  for (int i = 0; i < 20; ++i) put(s, "scan" + std::to_string(i), 1 * MiB);  // one-off values
  CHECK(present(s, "prompt", "system") && present(s, "hot"));
  StorageStats st = s.stats();
  CHECK(st.evictions > 0 && st.evicted_protected == 0 && st.evicted_priority == 0);
  CHECK(st.evictions == st.evicted_probation + st.evicted_protected + st.evicted_priority);
}

TEST(storage_put_frame_chain_loses_its_tail_first) {
  for (const char* policy : {"lru", "slru"}) {
    Storage::Options o = opts(8 * MiB, 1 * MiB);  // 7 slabs of 1 MiB values
    o.policy = policy;
    Storage s(o);
    ObjectRef prev;
    for (int i = 0; i < 3; ++i) {  // one PUT frame of a chain c0 -> c1 -> c2
      Status why;
      ObjectRef obj = s.reserve("default", "c" + std::to_string(i), 1 * MiB, 0, &why);
      s.publish(obj, prev);
      prev = obj;
    }
    prev.reset();
    for (int i = 0; i < 5; ++i) put(s, "x" + std::to_string(i), 1 * MiB);  // needs 1 eviction
    auto held = [&](const char* k) {  // EXISTS: no read, so the order stays as it is
      std::vector<uint8_t> p;
      s.exists_many("default", {k}, &p);
      return p[0] != 0;
    };
    CHECK(held("c0") && held("c1") && !held("c2"));
    put(s, "x5", 1 * MiB);
    CHECK(held("c0") && !held("c1"));
  }
}

TEST(storage_lru_policy_is_selectable) {
  Storage::Options o = opts(8 * MiB, 1 * MiB);
  o.policy = "lru";
  Storage s(o);
  CHECK(s.stats().policy == std::string("lru"));
  bool threw = false;
  try {
    Storage::Options bad = opts(8 * MiB, 1 * MiB);
    bad.policy = "nope";
    Storage b(bad);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
}

// --- session ----------------------------------------------------------------------------------

struct Ctx {
  ServerConfig config;
  Storage storage{opts(4 * MiB, 64 * KiB)};
  Counters counters;
  ServerContext ctx{config, storage, counters, nullptr, nullptr};
};

std::vector<uint8_t> put_table(const std::vector<std::pair<std::string, uint64_t>>& items,
                               uint16_t reserved = 0) {
  std::vector<uint8_t> t(items.size() * proto::kPutItemBytes);
  std::string keys;
  for (std::size_t i = 0; i < items.size(); ++i) {
    uint8_t* e = t.data() + i * proto::kPutItemBytes;
    proto::put_u16(e, static_cast<uint16_t>(items[i].first.size()));
    proto::put_u16(e + 2, reserved);
    proto::put_u64(e + 8, items[i].second);
    keys += items[i].first;
  }
  t.insert(t.end(), keys.begin(), keys.end());
  return t;
}

proto::Header put_header(uint32_t count, uint64_t payload_len) {
  proto::Header h;
  h.opcode = static_cast<uint8_t>(proto::Op::kPut);
  h.count = count;
  h.payload_len = payload_len;
  return h;
}

TEST(session_put_frame_two_phases) {
  Ctx c;
  const auto t = put_table({{"a", 3}, {"", 2}, {"big", c.config.limits.max_value_bytes + 1}});
  // The payload length must add up exactly; here it does not (the big one is over the limit).
  PutFrame f;
  CHECK(f.parse(put_header(3, t.size() + 5), t.data(), 3 * proto::kPutItemBytes, c.config.limits) ==
        Status::kBadRequest);
  const auto t2 = put_table({{"a", 3}, {"", 2}, {"c", 0}});
  CHECK(f.parse(put_header(3, t2.size() + 5), t2.data(), 3 * proto::kPutItemBytes, c.config.limits) ==
        Status::kOk);
  CHECK(f.items()[0].status == 0 && f.items()[1].status == static_cast<uint8_t>(Status::kBadRequest));
  CHECK(f.reserve(c.ctx, "default", 0, t2.data()) && !f.reserve(c.ctx, "default", 1, t2.data()));
  std::memcpy(f.items()[0].obj->data(), "xyz", 3);
  f.items()[0].checksum = 1;  // wrong: dropped as CHECKSUM_MISMATCH
  f.landed(c.ctx, 0);
  CHECK(f.items()[0].status == static_cast<uint8_t>(Status::kChecksumMismatch));
  CHECK(f.reserve(c.ctx, "default", 2, t2.data()));
  f.landed(c.ctx, 2);  // an empty value: checksum of nothing is not 0 either
  const auto body = f.reply_body();
  CHECK(body.size() == 3 && body[1] == static_cast<uint8_t>(Status::kBadRequest));
  CHECK(Counters::get(c.counters.checksum_failures) >= 1);
}

TEST(session_put_key_over_limit_is_frame_level) {
  Ctx c;
  const auto t = put_table({{std::string(c.config.limits.max_key_len + 1, 'k'), 1}});
  PutFrame f;
  CHECK(f.parse(put_header(1, t.size() + 1), t.data(), proto::kPutItemBytes, c.config.limits) ==
        Status::kTooLarge);
}

TEST(session_frame_limits_and_auth) {
  Ctx c;
  proto::Header h;
  h.opcode = static_cast<uint8_t>(proto::Op::kGet);
  h.count = c.config.limits.max_batch + 1;
  h.payload_len = 10;
  CHECK(check_request_frame(c.ctx, h, true) == Status::kTooLarge);
  h.count = 1;
  h.payload_len = 3;
  CHECK(check_request_frame(c.ctx, h, true) == Status::kOk);
  CHECK(check_request_frame(c.ctx, h, false) == Status::kUnauthorized);
  h.opcode = 99;
  CHECK(check_request_frame(c.ctx, h, true) == Status::kBadRequest);
  h.opcode = static_cast<uint8_t>(proto::Op::kStats);
  h.payload_len = 1;
  CHECK(check_request_frame(c.ctx, h, true) == Status::kBadRequest);
  CHECK(Counters::get(c.counters.requests[0]) == 1 && Counters::get(c.counters.auth_failures) == 1);
}

TEST(token_globs) {
  CHECK(glob_match("*", "anything") && glob_match("tenant-*", "tenant-a") &&
        !glob_match("tenant-*", "tenant"));
  CHECK(glob_match("a?c", "abc") && !glob_match("a?c", "ac") && glob_match("*-x-*", "a-x-b"));
  TokenGrant g{"t", {"ns1", "team-*"}};
  CHECK(g.allows("ns1") && g.allows("team-9") && !g.allows("ns2") && !g.all());
}

}  // namespace

int main() {
  int passed = 0, failed = 0;
  for (const Test& t : registry()) {
    const int before = g_failures;
    t.fn();
    const bool ok = g_failures == before;
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", t.name);
    (ok ? passed : failed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
