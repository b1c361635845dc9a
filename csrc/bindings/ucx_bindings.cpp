// Python view of the UCX client transport: membrain._native.UcxConnection, with exactly the
// methods, arguments and error behaviour of membrain._native.Connection (TCP), so the client's
// connection pool picks one or the other by endpoint scheme and nothing else changes. Present
// only when the extension was built with UCX (native_info()["ucx"]).
#include <pybind11/stl.h>

#include "bindings/registry.h"

#if MEMBRAIN_WITH_UCX
#include <memory>

#include "transport/ucx/ucx_connection.h"

namespace py = pybind11;

namespace membrain::bindings {
namespace {

// A Py_buffer held for one call (same contract as the TCP binding's).
class Pinned {
 public:
  Pinned(py::handle obj, bool writable, std::size_t index, const char* what) {
    const int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (!PyObject_CheckBuffer(obj.ptr())) {
      throw py::type_error(std::string(what) + " " + std::to_string(index) + " does not support the buffer protocol");
    }
    if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) {
      py::error_already_set err;
      throw py::value_error(std::string(what) + " " + std::to_string(index) + " must be a C-contiguous" +
                            (writable ? " writable" : "") + " buffer: " + err.what());
    }
  }
  ~Pinned() { PyBuffer_Release(&view_); }
  Pinned(const Pinned&) = delete;
  Pinned& operator=(const Pinned&) = delete;
  uint8_t* data() const { return static_cast<uint8_t*>(view_.buf); }
  std::size_t size() const { return static_cast<std::size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

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
      Pinned b(key, false, i, "key");
      k.owned.emplace_back(reinterpret_cast<const char*>(b.data()), b.size());
    } else {
      throw py::type_error("key " + std::to_string(i) + " must be bytes or str");
    }
    validate_key(k.owned.back(), i, 128);
  }
  k.views.assign(k.owned.begin(), k.owned.end());
  return k;
}

using ucx::UcxConnection;

class PyUcx {
 public:
  PyUcx(std::string host, int port, std::string ns, std::optional<std::string> token, int connect_timeout_ms,
        int timeout_ms)
      : timeout_ms_(timeout_ms) {
    if (port <= 0 || port > 65535) throw py::value_error("port must be 1..65535, got " + std::to_string(port));
    if (timeout_ms <= 0) throw py::value_error("timeout_ms must be positive");
    UcxConnection::Options o{std::move(host), static_cast<uint16_t>(port), std::move(ns), std::move(token),
                             connect_timeout_ms};
    if (!proto::valid_namespace(o.ns, proto::Limits{})) {
      throw py::value_error("namespace must be 1..64 bytes of [A-Za-z0-9._-], got '" + o.ns + "'");
    }
    py::gil_scoped_release nogil;
    conn_ = std::make_unique<UcxConnection>(std::move(o));
  }
  int timeout(std::optional<int> t) const {
    const int ms = t.value_or(timeout_ms_);
    if (ms <= 0) throw py::value_error("timeout_ms must be positive");
    return ms;
  }
  std::vector<uint8_t> put(const py::sequence& keys, const py::sequence& values, std::optional<int> t) {
    const std::size_t n = py::len(keys);
    if (py::len(values) != n) throw py::value_error("put: " + std::to_string(n) + " keys but " + std::to_string(py::len(values)) + " values");
    Keys k = take_keys(keys);
    std::vector<std::unique_ptr<Pinned>> pins;
    std::vector<ConstSpan> spans;
    for (std::size_t i = 0; i < n; ++i) {
      pins.push_back(std::make_unique<Pinned>(values[i], false, i, "value"));
      spans.push_back({pins.back()->data(), pins.back()->size()});
    }
    const int ms = timeout(t);
    py::gil_scoped_release nogil;
    return conn_->put(k.views, spans, ms);
  }
  std::vector<uint8_t> get_into(const py::sequence& keys, const py::sequence& buffers, std::optional<int> t) {
    const std::size_t n = py::len(keys);
    if (py::len(buffers) != n) throw py::value_error("get_into: " + std::to_string(n) + " keys but " + std::to_string(py::len(buffers)) + " buffers");
    Keys k = take_keys(keys);
    std::vector<std::unique_ptr<Pinned>> pins;
    std::vector<MutSpan> spans;
    for (std::size_t i = 0; i < n; ++i) {
      pins.push_back(std::make_unique<Pinned>(buffers[i], true, i, "buffer"));
      spans.push_back({pins.back()->data(), pins.back()->size()});
    }
    const int ms = timeout(t);
    py::gil_scoped_release nogil;
    return conn_->get_into(k.views, spans, ms);
  }
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
        py::gil_scoped_acquire gil;
        objs.clear();
        throw;
      }
    }
    py::list out(k.views.size());
    for (std::size_t i = 0; i < status.size(); ++i) {
      out[i] = (status[i] == static_cast<uint8_t>(proto::Status::kOk) && objs[i]) ? objs[i] : py::none();
    }
    return out;
  }
  template <class R>
  R keyed(R (UcxConnection::*fn)(const std::vector<std::string_view>&, int), const py::sequence& keys,
          std::optional<int> t) {
    Keys k = take_keys(keys);
    const int ms = timeout(t);
    py::gil_scoped_release nogil;
    return ((*conn_).*fn)(k.views, ms);
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
  py::bytes raw_call(const py::bytes& header, const py::bytes& data, std::optional<int> t) {
    std::string h = header, d = data;
    const int ms = timeout(t);
    std::vector<uint8_t> out;
    {
      py::gil_scoped_release nogil;
      out = conn_->raw_call(std::vector<uint8_t>(h.begin(), h.end()), std::vector<uint8_t>(d.begin(), d.end()), ms);
    }
    return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
  }
  void close() {
    py::gil_scoped_release nogil;
    conn_->close();
  }
  UcxConnection& conn() { return *conn_; }
  int default_timeout() const { return timeout_ms_; }

 private:
  std::unique_ptr<UcxConnection> conn_;
  int timeout_ms_;
};

}  // namespace

void register_ucx(py::module_& m) {
  const auto t = py::arg("timeout_ms") = py::none();
  py::class_<PyUcx>(m, "UcxConnection",
                    "One UCX (UCP active messages) connection to a Membrain server's --ucx-port; same API "
                    "and error behaviour as Connection. Transports follow UCX_TLS / UCX_NET_DEVICES.")
      .def(py::init<std::string, int, std::string, std::optional<std::string>, int, int>(), py::arg("host"),
           py::arg("port"), py::arg("namespace") = "default", py::arg("auth_token") = py::none(),
           py::arg("connect_timeout_ms") = 2000, py::arg("timeout_ms") = 5000)
      .def("put", &PyUcx::put, py::arg("keys"), py::arg("values"), t)
      .def("get_into", &PyUcx::get_into, py::arg("keys"), py::arg("buffers"), t)
      .def("get", &PyUcx::get, py::arg("keys"), t)
      .def("exists", [](PyUcx& c, const py::sequence& k, std::optional<int> ms) { return c.keyed(&UcxConnection::exists, k, ms); },
           py::arg("keys"), t)
      .def("lookup_prefix",
           [](PyUcx& c, const py::sequence& k, std::optional<int> ms) { return c.keyed(&UcxConnection::lookup_prefix, k, ms); },
           py::arg("keys"), t)
      .def("delete", [](PyUcx& c, const py::sequence& k, std::optional<int> ms) { return c.keyed(&UcxConnection::del, k, ms); },
           py::arg("keys"), t)
      .def("stats_json", &PyUcx::stats_json, t)
      .def("stats",
           [](PyUcx& c, std::optional<int> ms) { return py::module_::import("json").attr("loads")(c.stats_json(ms)); }, t)
      .def("ping", &PyUcx::ping, t)
      .def("_raw_call", &PyUcx::raw_call, py::arg("am_header"), py::arg("data"), t,
           "Test hook: send one request AM verbatim; returns the raw reply (header, extension, data).")
      .def("close", &PyUcx::close)
      .def_property_readonly("broken", [](PyUcx& c) { return c.conn().broken(); })
      .def_property_readonly("host", [](PyUcx& c) { return c.conn().host(); })
      .def_property_readonly("port", [](PyUcx& c) { return c.conn().port(); })
      .def_property_readonly("timeout_ms", &PyUcx::default_timeout)
      .def_property_readonly("am_header_cap", [](PyUcx& c) { return c.conn().am_header_cap(); })
      .def_property_readonly("limits", [](PyUcx& c) {
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

#else

namespace membrain::bindings {
void register_ucx(pybind11::module_&) {}
}  // namespace membrain::bindings

#endif
