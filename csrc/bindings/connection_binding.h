// Python binding glue shared by every client connection class: membrain._native.Connection
// (TCP, transport_bindings.cpp) and membrain._native.UcxConnection (UCX, ucx_bindings.cpp).
//
// The client's connection pool picks a class by endpoint scheme and then uses them
// interchangeably, so both must take arguments, pin buffers, release the GIL and report errors
// identically. One template guarantees that instead of two copies kept in step by hand.
//
// Every call first takes what it needs from Python objects under the GIL (key bytes are copied
// -- they are at most 128 bytes -- and value buffers are pinned with PyObject_GetBuffer so
// their memory cannot move or be freed), then releases the GIL for all transport I/O, so other
// Python threads (and other connections) run while bytes move.
//
// Only transport/tcp_connection.h is needed here (spans, Options, validate_key); the UCX class
// is a template argument, so this header compiles in builds without UCX too.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "transport/protocol.h"
#include "transport/tcp_connection.h"

namespace membrain::bindings {
namespace connection_detail {

namespace py = pybind11;

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

inline Keys take_keys(const py::sequence& keys) {
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

// Pins one buffer per item (values for PUT, destinations for GET) and returns spans over them.
// The pins must outlive the transport call, so the caller owns them.
template <class Span>
std::vector<Span> pin_all(const py::sequence& objs, bool writable, const char* what,
                          std::vector<std::unique_ptr<PinnedBuffer>>* pins) {
  const std::size_t n = py::len(objs);
  std::vector<Span> spans;
  pins->reserve(n);
  spans.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    pins->push_back(std::make_unique<PinnedBuffer>(objs[i], writable, i, what));
    spans.push_back({pins->back()->data(), pins->back()->size()});
  }
  return spans;
}

}  // namespace connection_detail

// Holds one connection of type Conn (TcpConnection or ucx::UcxConnection: same API) and the
// default per-call timeout.
template <class Conn>
class PyConnection {
  using Keys = connection_detail::Keys;
  using PinnedBuffer = connection_detail::PinnedBuffer;

 public:
  PyConnection(std::string host, int port, std::string ns, std::optional<std::string> token,
               int connect_timeout_ms, int timeout_ms)
      : timeout_ms_(timeout_ms) {
    namespace py = pybind11;
    if (port <= 0 || port > 65535)
      throw py::value_error("port must be 1..65535, got " + std::to_string(port));
    if (timeout_ms <= 0) throw py::value_error("timeout_ms must be positive");
    typename Conn::Options o{std::move(host), static_cast<uint16_t>(port), std::move(ns), std::move(token),
                             connect_timeout_ms};
    if (!proto::valid_namespace(o.ns, proto::Limits{})) {
      throw py::value_error("namespace must be 1..64 bytes of [A-Za-z0-9._-], got '" + o.ns + "'");
    }
    py::gil_scoped_release nogil;  // connecting and HELLO may block up to connect_timeout_ms
    conn_ = std::make_unique<Conn>(std::move(o));
  }

  // The per-call timeout: the argument when given, else the connection's default.
  int timeout(std::optional<int> t) const {
    const int ms = t.value_or(timeout_ms_);
    if (ms <= 0) throw pybind11::value_error("timeout_ms must be positive");
    return ms;
  }

  std::vector<uint8_t> put(const pybind11::sequence& keys, const pybind11::sequence& values,
                           std::optional<int> t) {
    namespace py = pybind11;
    const std::size_t n = py::len(keys);
    if (py::len(values) != n) {
      throw py::value_error("put: " + std::to_string(n) + " keys but " + std::to_string(py::len(values)) +
                            " values");
    }
    Keys k = connection_detail::take_keys(keys);
    std::vector<std::unique_ptr<PinnedBuffer>> pins;
    const auto spans = connection_detail::pin_all<ConstSpan>(values, false, "value", &pins);
    const int ms = timeout(t);
    py::gil_scoped_release nogil;
    return conn_->put(k.views, spans, ms);
  }

  std::vector<uint8_t> get_into(const pybind11::sequence& keys, const pybind11::sequence& buffers,
                                std::optional<int> t) {
    namespace py = pybind11;
    const std::size_t n = py::len(keys);
    if (py::len(buffers) != n) {
      throw py::value_error("get_into: " + std::to_string(n) + " keys but " +
                            std::to_string(py::len(buffers)) + " buffers");
    }
    Keys k = connection_detail::take_keys(keys);
    std::vector<std::unique_ptr<PinnedBuffer>> pins;
    const auto spans = connection_detail::pin_all<MutSpan>(buffers, true, "buffer", &pins);
    const int ms = timeout(t);
    py::gil_scoped_release nogil;
    return conn_->get_into(k.views, spans, ms);
  }

  // Values land directly in freshly allocated bytes objects: the placer runs once per frame,
  // after the item table arrives, and briefly takes the GIL to allocate them.
  pybind11::list get(const pybind11::sequence& keys, std::optional<int> t) {
    namespace py = pybind11;
    Keys k = connection_detail::take_keys(keys);
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

  std::vector<uint8_t> exists(const pybind11::sequence& keys, std::optional<int> t) {
    return keyed(&Conn::exists, keys, t);
  }
  uint32_t lookup_prefix(const pybind11::sequence& keys, std::optional<int> t) {
    return keyed(&Conn::lookup_prefix, keys, t);
  }
  uint32_t del(const pybind11::sequence& keys, std::optional<int> t) { return keyed(&Conn::del, keys, t); }

  std::string stats_json(std::optional<int> t) {
    const int ms = timeout(t);
    pybind11::gil_scoped_release nogil;
    return conn_->stats(ms);
  }
  double ping(std::optional<int> t) {
    const int ms = timeout(t);
    pybind11::gil_scoped_release nogil;
    return conn_->ping(ms);
  }
  void close() {
    pybind11::gil_scoped_release nogil;
    conn_->close();
  }
  Conn& conn() { return *conn_; }
  int default_timeout() const { return timeout_ms_; }

 private:
  // The calls that take only keys and a timeout: copy the keys, then run fn without the GIL.
  template <class R>
  R keyed(R (Conn::*fn)(const std::vector<std::string_view>&, int), const pybind11::sequence& keys,
          std::optional<int> t) {
    Keys k = connection_detail::take_keys(keys);
    const int ms = timeout(t);
    pybind11::gil_scoped_release nogil;
    return ((*conn_).*fn)(k.views, ms);
  }

  std::unique_ptr<Conn> conn_;
  int timeout_ms_;
};

// Docstrings of the shared methods; nullptr leaves a method with only its signature. They are
// per class because the two classes have always documented themselves differently and Python
// help()/stubs read them.
struct ConnectionDocs {
  const char* cls = nullptr;
  const char* put = nullptr;
  const char* get_into = nullptr;
  const char* get = nullptr;
  const char* exists = nullptr;
  const char* lookup_prefix = nullptr;
  const char* del = nullptr;
  const char* stats_json = nullptr;
  const char* stats = nullptr;
  const char* ping = nullptr;
};

// Registers class `name` wrapping Conn with the API common to every connection class and
// returns it, so the caller can add what only its transport has.
template <class Conn>
pybind11::class_<PyConnection<Conn>> bind_connection(pybind11::module_& m, const char* name,
                                                     const ConnectionDocs& docs) {
  namespace py = pybind11;
  using Py = PyConnection<Conn>;
  const auto t = py::arg("timeout_ms") = py::none();
  py::class_<Py> cls(m, name, docs.cls);
  cls.def(py::init<std::string, int, std::string, std::optional<std::string>, int, int>(), py::arg("host"),
          py::arg("port"), py::arg("namespace") = "default", py::arg("auth_token") = py::none(),
          py::arg("connect_timeout_ms") = 2000, py::arg("timeout_ms") = 5000)
      .def("put", &Py::put, py::arg("keys"), py::arg("values"), t, docs.put)
      .def("get_into", &Py::get_into, py::arg("keys"), py::arg("buffers"), t, docs.get_into)
      .def("get", &Py::get, py::arg("keys"), t, docs.get)
      .def("exists", &Py::exists, py::arg("keys"), t, docs.exists)
      .def("lookup_prefix", &Py::lookup_prefix, py::arg("keys"), t, docs.lookup_prefix)
      .def("delete", &Py::del, py::arg("keys"), t, docs.del)
      .def("stats_json", &Py::stats_json, t, docs.stats_json)
      .def(
          "stats",
          [](Py& c, std::optional<int> ms) {
            return py::module_::import("json").attr("loads")(c.stats_json(ms));
          },
          t, docs.stats)
      .def("ping", &Py::ping, t, docs.ping)
      .def("close", &Py::close)
      .def_property_readonly("broken", [](Py& c) { return c.conn().broken(); })
      .def_property_readonly("host", [](Py& c) { return c.conn().host(); })
      .def_property_readonly("port", [](Py& c) { return c.conn().port(); })
      .def_property_readonly("timeout_ms", &Py::default_timeout)
      .def_property_readonly("limits", [](Py& c) {
        const auto& l = c.conn().limits();
        py::dict d;
        d["max_batch"] = l.max_batch;
        d["max_key_len"] = l.max_key_len;
        d["max_value_bytes"] = l.max_value_bytes;
        d["max_payload_bytes"] = l.max_payload_bytes;
        return d;
      });
  return cls;
}

}  // namespace membrain::bindings
