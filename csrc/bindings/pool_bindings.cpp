// Python view of the host block pool: HostPool hands out Slot handles; a Slot exports its
// bytes through the buffer protocol (zero copy) and gives its reference back when released
// or garbage-collected.
#include <stdexcept>

#include <pybind11/stl.h>

#include "bindings/registry.h"
#include "memory/host_pool.h"

namespace py = pybind11;

namespace membrain::bindings {
namespace {

class Slot {
 public:
  Slot(std::shared_ptr<HostPool> pool, uint32_t index) : pool_(std::move(pool)), index_(index) {}
  ~Slot() {
    if (pool_) pool_->release(index_);
  }
  Slot(const Slot&) = delete;
  Slot& operator=(const Slot&) = delete;

  void release() {
    if (pool_) {
      pool_->release(index_);
      pool_.reset();
    }
  }
  // A second handle on the same bytes; the slot stays allocated until both are released.
  std::unique_ptr<Slot> share() const {
    live();
    pool_->retain(index_);
    return std::make_unique<Slot>(pool_, index_);
  }
  const HostPool& live() const {
    if (!pool_)
      throw std::runtime_error("host pool slot " + std::to_string(index_) + " was already released");
    return *pool_;
  }
  uintptr_t ptr() const { return reinterpret_cast<uintptr_t>(live().slot_data(index_)); }
  std::size_t nbytes() const { return live().slot_bytes(); }
  uint32_t index() const { return index_; }
  bool released() const { return !pool_; }
  uint32_t refcount() const { return live().refcount(index_); }

 private:
  std::shared_ptr<HostPool> pool_;
  uint32_t index_;
};

}  // namespace

void register_pool(py::module_& m) {
  py::class_<Slot>(m, "Slot", py::buffer_protocol(),
                   "One slot of a HostPool. Supports the buffer protocol (memoryview, numpy.frombuffer, "
                   "torch.frombuffer) without copying; release() or garbage collection frees it.")
      .def_buffer([](Slot& s) {
        return py::buffer_info(reinterpret_cast<void*>(s.ptr()), 1, py::format_descriptor<uint8_t>::format(),
                               1, {static_cast<py::ssize_t>(s.nbytes())}, {1}, false);
      })
      .def_property_readonly("ptr", &Slot::ptr)
      .def_property_readonly("nbytes", &Slot::nbytes)
      .def_property_readonly("index", &Slot::index)
      .def_property_readonly("released", &Slot::released)
      .def_property_readonly("refcount", &Slot::refcount)
      .def("share", &Slot::share)
      .def("release", &Slot::release)
      .def(
          "__enter__", [](Slot& s) -> Slot& { return s; }, py::return_value_policy::reference)
      .def("__exit__", [](Slot& s, py::args) { s.release(); })
      .def("__repr__", [](const Slot& s) {
        return "<membrain.Slot index=" + std::to_string(s.index()) + (s.released() ? " released>" : ">");
      });

  py::class_<HostPool, std::shared_ptr<HostPool>>(m, "HostPool",
                                                  "A pinned (when CUDA is present) host region carved into "
                                                  "equal slots.")
      .def(py::init([](std::size_t slot_bytes, std::size_t num_slots, bool pin, bool huge_pages) {
             return HostPool::create(HostPool::Options{slot_bytes, num_slots, pin, huge_pages});
           }),
           py::arg("slot_bytes"), py::arg("num_slots"), py::arg("pin") = true, py::arg("huge_pages") = true)
      .def(
          "acquire",
          [](HostPool& p) -> std::unique_ptr<Slot> {
            auto slot = p.try_acquire();
            if (!slot) return nullptr;
            return std::make_unique<Slot>(p.shared_from_this(), *slot);
          },
          "A free Slot, or None when the pool is exhausted.")
      .def(
          "acquire_many",
          [](HostPool& p, std::size_t n) -> std::optional<std::vector<std::unique_ptr<Slot>>> {
            auto slots = p.try_acquire_many(n);
            if (!slots) return std::nullopt;
            std::vector<std::unique_ptr<Slot>> out;
            out.reserve(slots->size());
            for (uint32_t s : *slots) out.push_back(std::make_unique<Slot>(p.shared_from_this(), s));
            return out;
          },
          py::arg("n"), "n free Slots, or None (and nothing taken) when fewer are free.")
      .def("prefault", &HostPool::prefault, py::arg("first"), py::arg("count"),
           py::call_guard<py::gil_scoped_release>(),
           "Backs slots [first, first + count) with memory now, contents unchanged (page faults "
           "taken here, not on the first copy into them); returns the bytes populated.")
      .def_property_readonly("slot_bytes", &HostPool::slot_bytes)
      .def_property_readonly("num_slots", &HostPool::num_slots)
      .def_property_readonly("free_slots", &HostPool::free_slots)
      .def_property_readonly("region_bytes", &HostPool::region_bytes)
      .def_property_readonly("pinned", &HostPool::pinned)
      .def_property_readonly("huge_pages", &HostPool::huge_pages);
}
}  // namespace membrain::bindings
