// The Membrain server: a listening socket, N event-loop workers, the storage engine and a
// housekeeping thread (TTL sweep). Started and stopped from Python (bindings/server_bindings.cpp)
// but no Python runs on the data path: every request is parsed and answered in C++ threads.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "server/config.h"
#include "server/connection.h"
#include "server/event_loop.h"
#include "server/stats.h"
#include "server/storage.h"
#include "server/ucx_listener.h"

namespace membrain::server {

struct StatsSnapshot {
  StorageStats storage;
  uint64_t requests[kNumOps] = {};
  uint64_t bytes_in = 0, bytes_out = 0;
  uint64_t connections = 0, connections_total = 0, connections_rejected = 0, accept_pauses = 0;
  uint64_t protocol_errors = 0, auth_failures = 0, timeouts = 0, reply_limit_closes = 0,
           checksum_failures = 0, no_space = 0, put_bytes_buffered = 0, pending_put_bytes = 0,
           put_land_waits = 0;
  uint64_t slab_bytes = 0;
  uint64_t prefaulted_bytes = 0;  // storage backed by memory so far (see --no-prefault)
  uint64_t per_object_overhead_bytes = 0;
  uint64_t per_connection_bytes = 0;
  double uptime_s = 0;
};

class Server {
 public:
  explicit Server(ServerConfig config);  // validates; throws std::invalid_argument naming the bad value
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds, listens and starts the workers. Returns the bound port. Throws on bind failure.
  uint16_t start();
  // Stops accepting, lets in-flight frames and replies finish (up to drain_timeout_s), joins.
  void stop(double drain_timeout_s);
  bool running() const { return running_.load(); }
  uint16_t port() const { return port_; }
  // The UCX listener's port (config.ucx_port >= 0), 0 when UCX is off.
  uint16_t ucx_port() const { return ucx_ ? ucx_->port() : 0; }
  const ServerConfig& config() const { return config_; }
  // RLIMIT_NOFILE as start() left it (soft raised to hard) and --max-connections as asked;
  // config().max_connections is what was kept after fitting it to the fd limit.
  uint64_t fd_limit() const { return fd_limit_; }
  uint64_t fd_limit_hard() const { return fd_limit_hard_; }
  int requested_max_connections() const { return requested_max_connections_; }

  StatsSnapshot stats() const;
  std::string stats_json() const;
  std::string namespace_stats_json(std::string_view ns) const;
  std::vector<std::pair<std::string, NamespaceStats>> namespace_stats() const {
    return storage_.all_namespace_stats();
  }

 private:
  void housekeeping();
  void fit_connections_to_fd_limit();

  ServerConfig config_;
  Storage storage_;
  Counters counters_;
  ServerContext ctx_;
  UniqueFd listen_;
  uint16_t port_ = 0;
  std::vector<std::unique_ptr<EventLoop>> loops_;
  std::unique_ptr<UcxListener> ucx_;  // declared after storage_: stopped before it goes
  std::thread housekeeper_;
  std::thread prefaulter_;
  std::atomic<bool> prefault_stop_{false};
  std::mutex hk_mu_;
  std::condition_variable hk_cv_;
  bool hk_stop_ = false;
  std::atomic<bool> running_{false};
  int64_t started_ns_ = 0;
  uint64_t fd_limit_ = 0, fd_limit_hard_ = 0;
  int requested_max_connections_ = 0;
};

}  // namespace membrain::server
