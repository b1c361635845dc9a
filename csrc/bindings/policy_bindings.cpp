// membrain._native.PolicyIndex: the server's eviction policies over an index of keys with a
// capacity in blocks (server/policy_index.h), for the host tier and `membrain bench policy`.
#include <algorithm>
#include <string>
#include <vector>

#include <pybind11/stl.h>

#include "bindings/registry.h"
#include "server/eviction_policy.h"
#include "server/policy_index.h"

namespace py = pybind11;

namespace membrain::bindings {

namespace {
using membrain::server::PolicyIndex;

py::list to_bytes(const std::vector<std::string>& v) {
  py::list out;
  for (const auto& s : v) out.append(py::bytes(s));
  return out;
}
}  // namespace

void register_policy(py::module_& m) {
  m.def("eviction_policies", &membrain::server::eviction_policy_names, "Names of the eviction policies.");
  m.attr("DEFAULT_EVICTION_POLICY") = membrain::server::kDefaultEvictionPolicy;
  py::class_<PolicyIndex>(m, "PolicyIndex",
                          "Keys ordered by one of the server's eviction policies, with a capacity in keys.")
      .def(py::init<const std::string&, uint64_t, const std::string&>(), py::arg("policy"),
           py::arg("capacity"), py::arg("admission") = "all")
      .def("__len__", &PolicyIndex::size)
      .def("__contains__", [](const PolicyIndex& p, const std::string& k) { return p.contains(k); })
      .def_property_readonly("capacity", &PolicyIndex::capacity)
      .def_property_readonly("policy", &PolicyIndex::policy_name)
      .def_property_readonly("evictions", &PolicyIndex::evictions)
      .def_property_readonly("evicted_probation", &PolicyIndex::evicted_probation)
      .def_property_readonly("evicted_protected", &PolicyIndex::evicted_protected)
      .def_property_readonly("evicted_priority", &PolicyIndex::evicted_priority)
      .def("prefix_hits", &PolicyIndex::prefix_hits, py::arg("keys"))
      .def("touch", &PolicyIndex::touch, py::arg("keys"))
      .def(
          "admit",
          [](PolicyIndex& p, const std::vector<std::string>& keys, const std::vector<std::string>& protect,
             int priority) {
            auto [a, e] = p.admit(keys, protect, static_cast<uint8_t>(std::clamp(priority, 0, 255)));
            return py::make_tuple(to_bytes(a), to_bytes(e));
          },
          py::arg("keys"), py::arg("protect") = std::vector<std::string>{}, py::arg("priority") = 0,
          "Adds the keys not held (tail first); returns (admitted, evicted).")
      .def(
          "request",
          [](PolicyIndex& p, const std::vector<std::string>& keys, int priority) {
            return p.request(keys, static_cast<uint8_t>(std::clamp(priority, 0, 255)));
          },
          py::arg("keys"), py::arg("priority") = 0)
      .def(
          "replay_ids",
          [](PolicyIndex& p, const std::vector<std::vector<uint64_t>>& reqs, const std::vector<int>& prios) {
            // A trace of integer block ids: returns the prefix hits of each request.
            std::vector<uint32_t> hits;
            hits.reserve(reqs.size());
            std::vector<std::string> keys;
            {
              py::gil_scoped_release r;
              for (std::size_t i = 0; i < reqs.size(); ++i) {
                keys.clear();
                for (uint64_t id : reqs[i]) keys.emplace_back(std::to_string(id));
                const int pr = i < prios.size() ? prios[i] : 0;
                hits.push_back(p.request(keys, static_cast<uint8_t>(std::clamp(pr, 0, 255))));
              }
            }
            return hits;
          },
          py::arg("requests"), py::arg("priorities") = std::vector<int>{})
      .def("discard", &PolicyIndex::discard, py::arg("keys"))
      .def("clear", &PolicyIndex::clear)
      .def("keys", [](const PolicyIndex& p) { return to_bytes(p.keys()); });
}

}  // namespace membrain::bindings
