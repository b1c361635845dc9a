// Python view of the client transport: membrain._native.Connection and TransportError.
//
// Every call first takes what it needs from Python objects under the GIL (key bytes are copied
// -- they are at most 128 bytes -- and value buffers are pinned with PyObject_GetBuffer so
// their memory cannot move or be freed), then releases the GIL for all socket I/O, so other
// Python threads (and other connections) run while bytes move.
#include <pybind11/stl.h>

#include <memory>

#include "bindings/registry.h"
#include "transport/tcp_connection.h"

namespace py = pybind11;

namespace membrain::bindings {
namespace {

// A Py_buffer held for the duration of one call; released (under the GIL) on destruction.
class PinnedBuffer {
 public:
  PinnedBuffer(py::handle obj, bool writable, std::size_t index, const char* what) {
    if (!PyObject_CheckBuffer(obj.ptr())) {
      throw py::type_error(std::string(what) + " " + std::to_string(index) + " (" +
                           std::string(py::str(py::type::of(obj).attr("__name__"))) +
                           ") does not support the buffer protocol");
    }
    const int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) {
      py::error_already_set err;
      throw py::value_error(std::string(what) + " " + std::to_string(index) + " must be a C-contiguous" +
                            (writable ? " writable" : "") + " buffer: " + err.what());
    }
    held_ = true;
  }
  ~PinnedBuffer() {
    if (held_) PyBuffer_Release(&view_);
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  uint8_t* data() const { return static_cast<uint8_t*>(view_.buf); }
  std::size_t size() const { return static_cast<std::size_t>(view_.len); }

 private:
  Py_buffer view_{};
  bool held_ = false;
};

// Keys as owned strings (copied under the GIL) plus views for the transport.
struct Keys {
  std::vector<std::string> owned;
  std::vector<std::string_view> views;
};

Keys take_keys(const py::sequence& keys) {
  Keys k;
  const std::size_t n = py::len(keys);
  k.owned.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    py::handle key = keys[i];
    if (PyBytes_Check(key.ptr())) {
      k.owned.emplace_back(PyBytes_AS_STRING(key.ptr()), PyBytes_GET_SIZE(key.ptr()));
    } else if (PyUnicode_Check(key.ptr())) {
      k.owned.push_back(key.cast<std::string>());
    } else if (PyObject_CheckBuffer(key.ptr())) {
      PinnedBuffer b(key, false, i, "key");
      k.owned.emplace_back(reinterpret_cast<const char*>(b.data()), b.size());
    } else {
      throw py::type_error("key " + std::to_string(i) + " must be bytes or str");
    }
    validate_key(k.owned.back(), i, 128);
  }
  k.views.assign(k.owned.begin(), k.owned.end());
  return k;
}

// Holds the connection and the default per-call timeout.
class PyConnection {
 public:
  PyConnection(std::string host, int port, std::string ns, std::optional<std::string> token, int connect_timeout_ms,
               int timeout_ms)
      : timeout_ms_(timeout_ms) {
    if (port <= 0 || port > 65535) throw py::value_error("port must be 1..65535, got " + std::to_string(port));
    if (timeout_ms <= 0) throw py::value_error("timeout_ms must be positive");
    TcpConnection::Options o{std::move(host), static_cast<uint16_t>(port), std::move(ns), std::move(token),
                             connect_timeout_ms};
    if (!proto::valid_namespace(o.ns, proto::Limits{})) {
      throw py::value_error("namespace must be 1..64 bytes of [A-Za-z0-9._-], got '" + o.ns + "'");
    }
    py::gil_scoped_release nogil;
    conn_ = std::make_unique<TcpConnection>(std::move(o));
  }

  int timeout(std::optional<int> t) const {
    const int ms = t.value_or(timeout_ms_);
    if (ms <= 0) throw py::value_error("timeout_ms must be positive");
    return ms;
  }

  std::vector<uint8_t> put(const py::sequence& keys, const py::sequence& values, std::optional<int> t) {
    const std::size_t n = py::len(keys);
    if (py::len(values) != n) {
      throw py::value_error("put: " + std::to_string(n) + " keys but " + std::to_string(py::len(values)) + " values");
    }
    Keys k = take_keys(keys);
    std::vector<std::unique_ptr<PinnedBuffer>> pins;
    std::vector<ConstSpan> spans;
    pins.reserve(n);
    spans.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      pins.push_back(std::make_unique<PinnedBuffer>(values[i], false, i, "value"));
      spans.push_back({pins.back()->data(), pins.back()->size()});
    }
    const int ms = timeout(t);
    py::gil_scoped_release nogil;
    return conn_->put(k.views, spans, ms);
  }

  std::vector<uint8_t> get_into(const py::sequence& keys, const py::sequence& buffers, std::optional<int> t) {
    const std::size_t n = py::len(keys);
    if (py::len(buffers) != n) {
      throw py::value_error("get_into: " + std::to_string(n) + " keys but " + std::to_string(py::len(buffers)) + " buffers");
    }
    Keys k = take_keys(keys);
    std::vector<std::unique_ptr<PinnedBuffer>> pins;
    std::vector<MutSpan> spans;
    pins.reserve(n);
    spans.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      pins.push_back(std::make_unique<PinnedBuffer>(buffers[i], true, i, "buffer"));
      spans.push_back({pins.back()->data(), pins.back()->size()});
    }
    const int ms = timeout(t);
    py::gil_scoped_release nogil;
    return conn_->get_into(k.views, spans, ms);
  }

  // Values land directly in freshly allocated bytes objects: the placer runs once per frame,
  // after the item table arrives, and briefly takes the GIL to allocate them.
  py::list get(const py::sequence& keys, std::optional<int> t) {
    Keys k = take_keys(keys);
    const int ms = timeout(t);
    std::vector<py::object> objs(k.views.size());
    std::vector<uint8_t> status;
    {
      py::gil_scoped_release nogil;
      auto placer = [&](std::size_t first, const std::vector<uint8_t>& st, const std::vector<uint64_t>& len,
                        std::vector<uint8_t*>* dest) {
        py::gil_scoped_acquire gil;
        for (std::size_t j = 0; j < len.size(); ++j) {
          if (st[j] != static_cast<uint8_t>(proto::Status::kOk)) continue;
          PyObject* b = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(len[j]));
          if (!b) throw py::error_already_set();
          objs[first + j] = py::reinterpret_steal<py::object>(b);
          (*dest)[j] = reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(b));
        }
      };
      try {
        status = conn_->get_with(k.views, placer, ms, nullptr);
      } catch (...) {
        // objs must be destroyed with the GIL held; do it before leaving this scope.
        py::gil_scoped_acquire gil;
        objs.clear();
        throw;
      }
    }
    py::list out(k.views.size());
    for (std::size_t i = 0; i < status.size(); ++i) {
      if (status[i] == static_cast<uint8_t>(proto::Status::kOk) && objs[i]) {
        out[i] = objs[i];
      } else {
        out[i] = py::none();
      }
    }
    return out;
  }

  std::vector<uint8_t> exists(const py::sequence& keys, std::optional<int> t) {
    Keys k = take_keys(keys);
    const int ms = timeout(t);
    py::gil_scoped_release nogil;
    return conn_->exists(k.views, ms);
  }
  uint32_t lookup_prefix(const py::sequence& keys, std::optional<int> t) {
    Keys k = take_keys(keys);
    const int ms = timeout(t);
    py::gil_scoped_release nogil;
    return conn_->lookup_prefix(k.views, ms);
  }
  uint32_t del(const py::sequence& keys, std::optional<int> t) {
    Keys k = take_keys(keys);
    const int ms = timeout(t);
    py::gil_scoped_release nogil;
    return conn_->del(k.views, ms);
  }
  std::string stats_json(std::optional<int> t) {
    const int ms = timeout(t);
    py::gil_scoped_release nogil;
    return conn_->stats(ms);
  }
  double ping(std::optional<int> t) {
    const int ms = timeout(t);
    py::gil_scoped_release nogil;
    return conn_->ping(ms);
  }
  void close() {
    py::gil_scoped_release nogil;
    conn_->close();
  }
  TcpConnection& conn() { return *conn_; }
  int default_timeout() const { return timeout_ms_; }

 private:
  std::unique_ptr<TcpConnection> conn_;
  int timeout_ms_;
};

}  // namespace

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
  for (const auto& [name, code] : statuses) m.attr((std::string("STATUS_") + name).c_str()) = static_cast<int>(code);
  m.def("status_name", [](int s) { return std::string(proto::status_name(static_cast<uint8_t>(s))); });

  const auto t = py::arg("timeout_ms") = py::none();
  py::class_<PyConnection>(m, "Connection",
                           "One TCP connection to a Membrain server (protocol v1). Blocking batched calls, "
                           "each bounded by timeout_ms; on timeout or I/O error the connection is marked "
                           "broken and TransportError (a ConnectionError) is raised. Not meant to be shared "
                           "between threads concurrently (calls are serialized).")
      .def(py::init<std::string, int, std::string, std::optional<std::string>, int, int>(), py::arg("host"),
           py::arg("port"), py::arg("namespace") = "default", py::arg("auth_token") = py::none(),
           py::arg("connect_timeout_ms") = 2000, py::arg("timeout_ms") = 5000)
      .def("put", &PyConnection::put, py::arg("keys"), py::arg("values"), t,
           "Store values (any C-contiguous buffers). Returns one status per key (STATUS_*).")
      .def("get_into", &PyConnection::get_into, py::arg("keys"), py::arg("buffers"), t,
           "Read each value straight into its writable buffer. Returns statuses: OK, NOT_FOUND, "
           "TOO_LARGE (buffer too small; untouched), CHECKSUM_MISMATCH (buffer holds bad bytes), ...")
      .def("get", &PyConnection::get, py::arg("keys"), t, "Values as bytes, None for misses and bad checksums.")
      .def("exists", &PyConnection::exists, py::arg("keys"), t, "Statuses (OK or NOT_FOUND) per key.")
      .def("lookup_prefix", &PyConnection::lookup_prefix, py::arg("keys"), t,
           "Number of leading keys that are all present.")
      .def("delete", &PyConnection::del, py::arg("keys"), t, "Number of keys deleted.")
      .def("stats_json", &PyConnection::stats_json, t, "Server statistics as a JSON string.")
      .def("stats",
           [](PyConnection& c, std::optional<int> ms) {
             return py::module_::import("json").attr("loads")(c.stats_json(ms));
           },
           t, "Server statistics as a dict.")
      .def("ping", &PyConnection::ping, t, "Round trip; returns seconds taken.")
      .def("close", &PyConnection::close)
      .def("timings",
           [](PyConnection& c) {
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
      .def("reset_timings", [](PyConnection& c) { c.conn().reset_timings(); })
      .def_property_readonly("broken", [](PyConnection& c) { return c.conn().broken(); })
      .def_property_readonly("host", [](PyConnection& c) { return c.conn().host(); })
      .def_property_readonly("port", [](PyConnection& c) { return c.conn().port(); })
      .def_property_readonly("timeout_ms", &PyConnection::default_timeout)
      .def_property_readonly("limits", [](PyConnection& c) {
        const auto& l = c.conn().limits();
        py::dict d;
        d["max_batch"] = l.max_batch;
        d["max_key_len"] = l.max_key_len;
        d["max_value_bytes"] = l.max_value_bytes;
        d["max_payload_bytes"] = l.max_payload_bytes;
        return d;
      });
}

}  // namespace membrain::bindings
