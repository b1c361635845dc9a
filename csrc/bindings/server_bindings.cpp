// membrain._native.Server: the C++ data plane, driven from Python only to start, stop and
// read statistics. start()/stop() release the GIL; the workers never take it.
#include <stdexcept>

#include <pybind11/stl.h>

#include "bindings/registry.h"
#include "server/eviction_policy.h"
#include "server/server.h"

namespace py = pybind11;

namespace membrain::bindings {

namespace {
using membrain::server::Server;
using membrain::server::ServerConfig;
using membrain::server::StatsSnapshot;

py::dict stats_dict(const StatsSnapshot& s) {
  py::dict d;
  d["used_bytes"] = s.storage.stored_bytes;
  d["capacity_bytes"] = s.storage.capacity_bytes;
  d["prefaulted_bytes"] = s.prefaulted_bytes;
  d["allocated_bytes"] = s.storage.allocated_bytes;
  d["chunk_bytes"] = s.storage.chunk_bytes;
  d["meta_bytes"] = s.storage.meta_bytes;
  d["meta_slab_bytes"] = s.storage.meta_slab_bytes;
  d["items"] = s.storage.items;
  d["hits"] = s.storage.hits;
  d["misses"] = s.storage.misses;
  d["evictions"] = s.storage.evictions;
  d["slab_reassignments"] = s.storage.slab_reassignments;
  d["eviction_policy"] = s.storage.policy;
  py::dict ev;
  ev["probation"] = s.storage.evicted_probation;
  ev["protected"] = s.storage.evicted_protected;
  ev["priority"] = s.storage.evicted_priority;
  d["evictions_by_reason"] = ev;
  d["expired"] = s.storage.expired;
  d["puts"] = s.storage.puts;
  d["deletes"] = s.storage.deletes;
  d["fragmentation"] = s.storage.fragmentation;
  py::dict req;
  for (int i = 1; i < membrain::server::kNumOps; ++i)
    req[proto::op_name(static_cast<uint8_t>(i))] = s.requests[i];
  req["UNKNOWN"] = s.requests[0];
  d["requests"] = req;
  d["gets"] = s.requests[static_cast<int>(proto::Op::kGet)];
  d["bytes_in"] = s.bytes_in;
  d["bytes_out"] = s.bytes_out;
  d["connections"] = s.connections;
  d["connections_total"] = s.connections_total;
  d["connections_rejected"] = s.connections_rejected;
  d["accept_pauses"] = s.accept_pauses;
  d["protocol_errors"] = s.protocol_errors;
  d["auth_failures"] = s.auth_failures;
  d["timeouts"] = s.timeouts;
  d["reply_limit_closes"] = s.reply_limit_closes;
  d["checksum_failures"] = s.checksum_failures;
  d["put_bytes_buffered"] = s.put_bytes_buffered;
  d["pending_put_bytes"] = s.pending_put_bytes;
  d["put_land_waits"] = s.put_land_waits;
  d["no_space"] = s.no_space;
  d["slab_bytes"] = s.slab_bytes;
  d["per_object_overhead_bytes"] = s.per_object_overhead_bytes;
  d["per_connection_bytes"] = s.per_connection_bytes;
  d["uptime_s"] = s.uptime_s;
  return d;
}
}  // namespace

void register_server(py::module_& m) {
  py::class_<Server>(m, "Server", "Membrain data-plane server (epoll workers in C++ threads).")
      .def(py::init([](std::string host, int port, uint64_t capacity, int threads, int max_connections,
                       double idle_timeout, double ttl, std::string auth_token, uint64_t slab_bytes,
                       int socket_buffer_bytes, uint32_t max_batch, uint32_t max_key_len,
                       uint64_t max_value_bytes, uint64_t max_payload_bytes, bool prefault, int ucx_port,
                       uint64_t max_pending_put_bytes, uint64_t max_pending_put_bytes_per_connection,
                       uint64_t max_reply_bytes_per_connection, double auth_timeout,
                       std::vector<std::pair<std::string, std::vector<std::string>>> tokens,
                       std::string eviction_policy,
                       std::vector<std::pair<std::string, int>> namespace_priority) {
             if (port < 0 || port > 65535)
               throw std::invalid_argument("port " + std::to_string(port) + " must be in 0..65535");
             ServerConfig c;
             c.host = std::move(host);
             c.port = static_cast<uint16_t>(port);
             c.capacity_bytes = capacity;
             c.threads = threads;
             c.max_connections = max_connections;
             c.idle_timeout_s = idle_timeout;
             c.ttl_s = ttl;
             c.auth_token = std::move(auth_token);
             c.slab_bytes = slab_bytes;
             c.socket_buffer_bytes = socket_buffer_bytes;
             c.limits.max_batch = max_batch;
             c.limits.max_key_len = max_key_len;
             c.limits.max_value_bytes = max_value_bytes;
             c.limits.max_payload_bytes = max_payload_bytes;
             c.prefault = prefault;
             if (ucx_port < -1 || ucx_port > 65535)
               throw std::invalid_argument("ucx_port " + std::to_string(ucx_port) +
                                           " must be -1 (off) or 0..65535");
             c.ucx_port = ucx_port;
             c.max_pending_put_bytes = max_pending_put_bytes;
             c.max_pending_put_bytes_per_connection = max_pending_put_bytes_per_connection;
             c.max_reply_bytes_per_connection = max_reply_bytes_per_connection;
             c.auth_timeout_s = auth_timeout;
             for (auto& [tok, pats] : tokens) c.tokens.push_back({std::move(tok), std::move(pats)});
             membrain::server::make_eviction_policy(eviction_policy, 1);  // throws naming the known ones
             c.eviction_policy = std::move(eviction_policy);
             for (auto& [pat, prio] : namespace_priority) {
               if (prio < 0 || prio > membrain::server::kMaxPriority)
                 throw std::invalid_argument("namespace priority " + std::to_string(prio) + " must be in 0..3");
               c.namespace_priority.emplace_back(std::move(pat), static_cast<uint8_t>(prio));
             }
             return std::make_unique<Server>(std::move(c));
           }),
           py::arg("host") = "127.0.0.1", py::arg("port") = 9201, py::arg("capacity") = 256ull << 20,
           py::arg("threads") = 2, py::arg("max_connections") = 1024, py::arg("idle_timeout") = 60.0,
           py::arg("ttl") = 0.0, py::arg("auth_token") = "", py::arg("slab_bytes") = 0,
           py::arg("socket_buffer_bytes") = 4 << 20, py::arg("max_batch") = 1024,
           py::arg("max_key_len") = 128, py::arg("max_value_bytes") = 256ull << 20,
           py::arg("max_payload_bytes") = 1ull << 30, py::arg("prefault") = true, py::arg("ucx_port") = -1,
           py::arg("max_pending_put_bytes") = 0, py::arg("max_pending_put_bytes_per_connection") = 0,
           py::arg("max_reply_bytes_per_connection") = 1ull << 30, py::arg("auth_timeout") = 10.0,
           py::arg("tokens") = std::vector<std::pair<std::string, std::vector<std::string>>>{},
           py::arg("eviction_policy") = std::string(membrain::server::kDefaultEvictionPolicy),
           py::arg("namespace_priority") = std::vector<std::pair<std::string, int>>{})
      .def(
          "start",
          [](Server& s) {
            py::gil_scoped_release r;
            return s.start();
          },
          "Bind, listen and start the workers; returns the bound port.")
      .def(
          "stop",
          [](Server& s, double drain_timeout) {
            py::gil_scoped_release r;
            s.stop(drain_timeout);
          },
          py::arg("drain_timeout") = 5.0,
          "Stop accepting, finish in-flight frames and replies (at most drain_timeout s), join the workers.")
      .def_property_readonly("port", &Server::port)
      .def_property_readonly("ucx_port", &Server::ucx_port, "UCX listener port (0 when UCX is off).")
      .def_property_readonly("running", &Server::running)
      .def_property_readonly("max_value_bytes",
                             [](const Server& s) { return s.config().limits.max_value_bytes; })
      .def_property_readonly("max_connections", [](const Server& s) { return s.config().max_connections; })
      .def_property_readonly("requested_max_connections", &Server::requested_max_connections)
      .def_property_readonly("fd_limit", &Server::fd_limit, "RLIMIT_NOFILE soft limit after start()")
      .def_property_readonly("fd_limit_hard", &Server::fd_limit_hard)
      .def_property_readonly("max_pending_put_bytes",
                             [](const Server& s) { return s.config().max_pending_put_bytes; })
      .def_property_readonly("max_pending_put_bytes_per_connection",
                             [](const Server& s) { return s.config().max_pending_put_bytes_per_connection; })
      .def(
          "stats", [](const Server& s) { return stats_dict(s.stats()); },
          "Counters and storage figures as a dict.")
      .def("stats_json", &Server::stats_json)
      .def(
          "namespace_stats",
          [](const Server& s) {
            py::dict out;
            for (const auto& [ns, n] : s.namespace_stats()) {
              py::dict d;
              d["namespace"] = ns;
              d["used_bytes"] = n.bytes;
              d["items"] = n.items;
              d["hits"] = n.hits;
              d["misses"] = n.misses;
              d["gets"] = n.gets;
              d["puts"] = n.puts;
              d["deletes"] = n.deletes;
              d["evictions"] = n.evictions;
              d["expired"] = n.expired;
              out[py::str(ns)] = d;
            }
            return out;
          },
          "Per-namespace figures of the namespaces holding objects.");
}

}  // namespace membrain::bindings
