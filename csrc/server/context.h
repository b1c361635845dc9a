// What the transports share: configuration, storage, counters and the stats renderers. One per
// server; connections (TCP) and the UCX listener hold a reference.
#pragma once
#include <functional>
#include <string>
#include <string_view>

#include "server/config.h"
#include "server/stats.h"
#include "server/storage.h"

namespace membrain::server {

struct ServerContext {
  const ServerConfig& config;
  Storage& storage;
  Counters& counters;
  std::function<std::string()> stats_json;
  std::function<std::string(std::string_view)> namespace_stats_json;  // STATS for a scoped token
};

}  // namespace membrain::server
