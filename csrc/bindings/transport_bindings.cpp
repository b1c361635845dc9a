// Python view of the client transport: membrain._native.Connection and TransportError.
//
// The argument handling, buffer pinning and GIL release shared with UcxConnection live in
// connection_binding.h; this file adds what only TCP has (per-phase timings) and the
// module-level status constants.
#include "bindings/connection_binding.h"
#include "bindings/registry.h"
#include "transport/tcp_connection.h"

namespace py = pybind11;

namespace membrain::bindings {

void register_transport(py::module_& m) {
  py::register_exception<TransportError>(m, "TransportError", PyExc_ConnectionError);

  const std::pair<const char*, proto::Status> statuses[] = {
      {"OK", proto::Status::kOk},
      {"NOT_FOUND", proto::Status::kNotFound},
      {"BAD_REQUEST", proto::Status::kBadRequest},
      {"UNAUTHORIZED", proto::Status::kUnauthorized},
      {"TOO_LARGE", proto::Status::kTooLarge},
      {"NO_SPACE", proto::Status::kNoSpace},
      {"CHECKSUM_MISMATCH", proto::Status::kChecksumMismatch},
      {"INTERNAL", proto::Status::kInternal},
      {"UNSUPPORTED_VERSION", proto::Status::kUnsupportedVersion},
  };
  for (const auto& [name, code] : statuses)
    m.attr((std::string("STATUS_") + name).c_str()) = static_cast<int>(code);
  m.def("status_name", [](int s) { return std::string(proto::status_name(static_cast<uint8_t>(s))); });

  ConnectionDocs docs;
  docs.cls =
      "One TCP connection to a Membrain server (protocol v1). Blocking batched calls, "
      "each bounded by timeout_ms; on timeout or I/O error the connection is marked "
      "broken and TransportError (a ConnectionError) is raised. Not meant to be shared "
      "between threads concurrently (calls are serialized).";
  docs.put = "Store values (any C-contiguous buffers). Returns one status per key (STATUS_*).";
  docs.get_into =
      "Read each value straight into its writable buffer. Returns statuses: OK, NOT_FOUND, "
      "TOO_LARGE (buffer too small; untouched), CHECKSUM_MISMATCH (buffer holds bad bytes), ...";
  docs.get = "Values as bytes, None for misses and bad checksums.";
  docs.exists = "Statuses (OK or NOT_FOUND) per key.";
  docs.lookup_prefix = "Number of leading keys that are all present.";
  docs.del = "Number of keys deleted.";
  docs.stats_json = "Server statistics as a JSON string.";
  docs.stats = "Server statistics as a dict.";
  docs.ping = "Round trip; returns seconds taken.";

  using Py = PyConnection<TcpConnection>;
  bind_connection<TcpConnection>(m, "Connection", docs)
      .def(
          "timings",
          [](Py& c) {
            const auto t = c.conn().timings();
            py::dict d;
            d["checksum"] = t.checksum;
            d["send"] = t.send;
            d["wait"] = t.wait;
            d["recv"] = t.recv;
            d["verify"] = t.verify;
            d["frames"] = t.frames;
            return d;
          },
          "Cumulative seconds per phase of PUT/GET frames: checksum, send, wait (for the reply "
          "header: server work + network), recv (reply payload), verify (GET checksums).")
      .def("reset_timings", [](Py& c) { c.conn().reset_timings(); });
}

}  // namespace membrain::bindings
