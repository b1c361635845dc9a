// Python view of the UCX client transport: membrain._native.UcxConnection, with exactly the
// methods, arguments and error behaviour of membrain._native.Connection (TCP), so the client's
// connection pool picks one or the other by endpoint scheme and nothing else changes. Present
// only when the extension was built with UCX (native_info()["ucx"]).
//
// The shared API comes from connection_binding.h (the same template that builds Connection);
// this file adds only what UCX has on top: the AM header capacity and a raw-AM test hook.
#include "bindings/registry.h"

#if MEMBRAIN_WITH_UCX
#include <string>
#include <vector>

#include "bindings/connection_binding.h"
#include "transport/ucx/ucx_connection.h"

namespace py = pybind11;

namespace membrain::bindings {

void register_ucx(py::module_& m) {
  using ucx::UcxConnection;
  using Py = PyConnection<UcxConnection>;
  ConnectionDocs docs;
  docs.cls =
      "One UCX (UCP active messages) connection to a Membrain server's --ucx-port; same API "
      "and error behaviour as Connection. Transports follow UCX_TLS / UCX_NET_DEVICES.";

  bind_connection<UcxConnection>(m, "UcxConnection", docs)
      .def(
          "_raw_call",
          [](Py& c, const py::bytes& header, const py::bytes& data, std::optional<int> t) {
            // Copied out of the bytes objects under the GIL; the call itself runs without it.
            std::string h = header, d = data;
            const int ms = c.timeout(t);
            std::vector<uint8_t> out;
            {
              py::gil_scoped_release nogil;
              out = c.conn().raw_call(std::vector<uint8_t>(h.begin(), h.end()),
                                      std::vector<uint8_t>(d.begin(), d.end()), ms);
            }
            return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
          },
          py::arg("am_header"), py::arg("data"), py::arg("timeout_ms") = py::none(),
          "Test hook: send one request AM verbatim; returns the raw reply (header, extension, data).")
      .def_property_readonly("am_header_cap", [](Py& c) { return c.conn().am_header_cap(); })
      .def_property_readonly(
          "transport_info",
          [](Py& c) {
            // Without the GIL: the connection's lock may be held by a call that needs the GIL
            // to place values (a GET allocating bytes), which would deadlock.
            std::string info;
            {
              py::gil_scoped_release nogil;
              info = c.conn().transport_info();
            }
            return info;
          },
          "UCX's description of this connection's lanes (ucp_ep_print_info): which transports "
          "(tcp, sysv/posix shared memory, cma, rc/ud verbs ...) carry messages and rendezvous.");
}

}  // namespace membrain::bindings

#else

namespace membrain::bindings {
void register_ucx(pybind11::module_&) {}
}  // namespace membrain::bindings

#endif
