// membrain._native.redis_read_gets: the GIL-free reply reader of the Redis backend's GET batches
// (transport/redis_get_reader.h); membrain/tiers/redis_direct.py is its only caller.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/connection_binding.h"
#include "bindings/registry.h"
#include "transport/redis_get_reader.h"

namespace py = pybind11;

namespace membrain::bindings {
void register_redis(py::module_& m) {
  m.attr("REDIS_TRAILER") = redis::kTrailer;
  m.def(
      "redis_read_gets",
      [](int fd, const py::sequence& buffers, int timeout_ms) {
        if (fd < 0)
          throw py::value_error("redis_read_gets: fd must be an open socket, got " + std::to_string(fd));
        std::vector<std::unique_ptr<connection_detail::PinnedBuffer>> pins;
        const auto dests = connection_detail::pin_all<MutSpan>(buffers, true, "buffer", &pins);
        redis::GetBatchResult r;
        {
          py::gil_scoped_release release;
          r = redis::read_get_replies(fd, dests, timeout_ms);
        }
        py::list hits;
        for (uint8_t h : r.hits) hits.append(py::bool_(h != 0));
        py::list errors;
        for (const auto& e : r.errors) errors.append(py::bytes(e));
        static const char* const kFailure[] = {"", "timed_out", "closed", "protocol"};
        return py::make_tuple(hits, errors, kFailure[static_cast<int>(r.failure)], r.detail);
      },
      py::arg("fd"), py::arg("buffers"), py::arg("timeout_ms"),
      "Reads len(buffers) Redis GET replies from socket fd (the GETs already sent), each value\n"
      "straight into its buffer, GIL released. Returns (hits, error replies, failure, detail):\n"
      "failure is '' or 'timed_out' / 'closed' / 'protocol', after which the connection must\n"
      "be dropped.");
}
}  // namespace membrain::bindings
