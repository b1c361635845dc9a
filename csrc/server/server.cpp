#include "server/server.h"

#include <dirent.h>
#include <netdb.h>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>

namespace membrain::server {

namespace {
constexpr double kMaxSeconds = 365.0 * 24 * 3600;  // one year; far below int64 nanoseconds' range

ServerConfig validated(ServerConfig c) {
  auto bad = [](const std::string& what) { throw std::invalid_argument(what); };
  if (c.capacity_bytes < (64ull << 10))
    bad("capacity " + std::to_string(c.capacity_bytes) + " bytes is below the 64 KiB minimum");
  if (c.threads < 1 || c.threads > 256) bad("threads " + std::to_string(c.threads) + " must be in 1..256");
  if (c.max_connections < 1) bad("max_connections " + std::to_string(c.max_connections) + " must be >= 1");
  // Both become int64 nanoseconds: NaN, infinities and huge values would make that cast undefined.
  auto seconds_ok = [](double s) { return std::isfinite(s) && s >= 0 && s <= kMaxSeconds; };
  if (!seconds_ok(c.idle_timeout_s))
    bad("idle_timeout " + std::to_string(c.idle_timeout_s) +
        " must be a finite number of seconds in 0..31536000");
  if (!seconds_ok(c.auth_timeout_s))
    bad("auth_timeout " + std::to_string(c.auth_timeout_s) +
        " must be a finite number of seconds in 0..31536000");
  if (c.max_reply_bytes_per_connection == 0) bad("max_reply_bytes_per_connection must be > 0");
  if (!seconds_ok(c.ttl_s))
    bad("ttl " + std::to_string(c.ttl_s) + " must be a finite number of seconds in 0..31536000");
  if (c.slab_bytes && (c.slab_bytes < 4096 || (c.slab_bytes & (c.slab_bytes - 1))))
    bad("slab_bytes " + std::to_string(c.slab_bytes) + " must be a power of two >= 4096");
  if (c.socket_buffer_bytes < 0) bad("socket_buffer_bytes must be >= 0");
  if (c.limits.max_key_len < 1 || c.limits.max_key_len > 65535)
    bad("max_key_len " + std::to_string(c.limits.max_key_len) + " must be in 1..65535");
  if (c.limits.max_batch < 1) bad("max_batch must be >= 1");
  if (!c.auth_token.empty()) c.tokens.insert(c.tokens.begin(), TokenGrant{c.auth_token, {"*"}});
  for (const TokenGrant& g : c.tokens) {
    if (g.token.empty() || g.token.size() > 4096)
      bad("auth token is " + std::to_string(g.token.size()) + " bytes, must be 1..4096");
    if (g.namespaces.empty()) bad("a token must open at least one namespace pattern");
    for (const std::string& p : g.namespaces) {
      bool ok = !p.empty() && p.size() <= c.limits.max_namespace_len;
      for (char ch : p) ok = ok && (std::isalnum(static_cast<unsigned char>(ch)) || std::strchr("._-*?", ch));
      if (!ok) bad("namespace pattern '" + p + "' must be 1..64 of [A-Za-z0-9._-] and the wildcards * ?");
    }
  }
  return c;
}

Storage::Options storage_options(const ServerConfig& c) {
  Storage::Options o;
  o.capacity_bytes = c.capacity_bytes;
  o.slab_bytes = c.slab_bytes;
  o.ttl_s = c.ttl_s;
  o.policy = c.eviction_policy;
  o.namespace_priority = c.namespace_priority;
  return o;
}
}  // namespace

Server::Server(ServerConfig config)
    : config_(validated(std::move(config))),
      storage_(storage_options(config_)),
      ctx_{config_, storage_, counters_, nullptr, nullptr} {
  // A value can never be larger than the region that has to hold it.
  config_.limits.max_value_bytes = std::min<uint64_t>(config_.limits.max_value_bytes, storage_.capacity());
  if (config_.max_pending_put_bytes_per_connection == 0)
    config_.max_pending_put_bytes_per_connection = config_.limits.max_value_bytes;
  if (config_.max_pending_put_bytes == 0)
    config_.max_pending_put_bytes = std::max(config_.limits.max_value_bytes, storage_.capacity() / 4);
  ctx_.stats_json = [this] { return stats_json(); };
  ctx_.namespace_stats_json = [this](std::string_view ns) { return namespace_stats_json(ns); };
}

Server::~Server() {
  stop(0);
}

void Server::fit_connections_to_fd_limit() {
  // Raise the soft RLIMIT_NOFILE to the hard one, then make sure every allowed connection can
  // have its fd: besides connections the process needs fds for what is open now (interpreter,
  // extension, storage), per worker an epoll, an eventfd and a spare, the metrics server's
  // connections and UCX's own (kFdReserve covers those).
  constexpr uint64_t kFdReserve = 128;
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  fd_limit_hard_ = rl.rlim_max;
  if (rl.rlim_cur < rl.rlim_max) {
    rlimit want = rl;
    want.rlim_cur = rl.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &want) == 0) rl = want;
  }
  fd_limit_ = rl.rlim_cur;
  if (rl.rlim_cur == RLIM_INFINITY) return;
  uint64_t open_now = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (::readdir(d)) ++open_now;
    ::closedir(d);
  }
  const uint64_t reserve = open_now + 3ull * config_.threads + kFdReserve;
  const uint64_t avail = rl.rlim_cur > reserve ? rl.rlim_cur - reserve : 1;
  requested_max_connections_ = config_.max_connections;
  if (static_cast<uint64_t>(config_.max_connections) > avail)
    config_.max_connections = static_cast<int>(avail);
}

uint16_t Server::start() {
  if (running_.load()) return port_;
  fit_connections_to_fd_limit();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port_s = std::to_string(config_.port);
  const int gai =
      ::getaddrinfo(config_.host.empty() ? nullptr : config_.host.c_str(), port_s.c_str(), &hints, &res);
  if (gai != 0)
    throw std::invalid_argument("cannot resolve host '" + config_.host + "': " + ::gai_strerror(gai));
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard(res, ::freeaddrinfo);
  std::string last_err = "no address";
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    UniqueFd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
    if (!fd) {
      last_err = std::strerror(errno);
      continue;
    }
    const int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (config_.socket_buffer_bytes > 0) {
      // Set before listen() so accepted sockets inherit it and the window scale is negotiated for it.
      const int b = config_.socket_buffer_bytes;
      ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVBUF, &b, sizeof b);
    }
    if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(fd.get(), 1024) != 0) {
      last_err = std::strerror(errno);
      continue;
    }
    sockaddr_storage ss{};
    socklen_t sl = sizeof ss;
    ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&ss), &sl);
    port_ = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                           : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    listen_ = std::move(fd);
    break;
  }
  if (!listen_) throw std::runtime_error("cannot listen on " + config_.host + ":" + port_s + ": " + last_err);
  if (config_.ucx_port >= 0) {
    // Same storage, same request processing; its own progress thread (transport/ucx).
    ucx_ = UcxListener::start(ctx_, config_.host, static_cast<uint16_t>(config_.ucx_port));
  }
  started_ns_ = monotonic_ns();
  for (int i = 0; i < config_.threads; ++i)
    loops_.push_back(std::make_unique<EventLoop>(ctx_, listen_.get()));
  for (auto& l : loops_) l->start();
  hk_stop_ = false;
  housekeeper_ = std::thread([this] { housekeeping(); });
  if (config_.prefault) {
    prefault_stop_ = false;
    prefaulter_ = std::thread([this] { storage_.prefault(prefault_stop_); });
  }
  running_.store(true);
  return port_;
}

void Server::stop(double drain_timeout_s) {
  if (!running_.exchange(false)) return;
  prefault_stop_ = true;
  if (prefaulter_.joinable()) prefaulter_.join();
  for (auto& l : loops_) l->request_stop(drain_timeout_s);
  for (auto& l : loops_) l->join();
  loops_.clear();
  if (ucx_) {
    ucx_->stop();
    ucx_.reset();
  }
  listen_.reset();
  {
    std::lock_guard<std::mutex> lock(hk_mu_);
    hk_stop_ = true;
  }
  hk_cv_.notify_all();
  if (housekeeper_.joinable()) housekeeper_.join();
}

void Server::housekeeping() {
  // Lazy expiry on access keeps reads correct; this sweep returns memory of keys nobody reads.
  std::unique_lock<std::mutex> lock(hk_mu_);
  while (!hk_stop_) {
    hk_cv_.wait_for(lock, std::chrono::milliseconds(200));
    if (hk_stop_) break;
    lock.unlock();
    while (storage_.sweep_expired(1024) == 1024) {
    }  // small batches keep the storage lock short
    lock.lock();
  }
}

StatsSnapshot Server::stats() const {
  StatsSnapshot s;
  s.storage = storage_.stats();
  for (int i = 0; i < kNumOps; ++i) s.requests[i] = Counters::get(counters_.requests[i]);
  s.prefaulted_bytes = storage_.prefaulted_bytes();
  s.bytes_in = Counters::get(counters_.bytes_in);
  s.bytes_out = Counters::get(counters_.bytes_out);
  s.connections = Counters::get(counters_.connections_current);
  s.connections_total = Counters::get(counters_.connections_total);
  s.connections_rejected = Counters::get(counters_.connections_rejected);
  s.accept_pauses = Counters::get(counters_.accept_pauses);
  s.protocol_errors = Counters::get(counters_.protocol_errors);
  s.auth_failures = Counters::get(counters_.auth_failures);
  s.timeouts = Counters::get(counters_.timeouts);
  s.reply_limit_closes = Counters::get(counters_.reply_limit_closes);
  s.checksum_failures = Counters::get(counters_.checksum_failures);
  s.no_space = Counters::get(counters_.no_space);
  s.put_bytes_buffered = Counters::get(counters_.put_bytes_buffered);
  s.pending_put_bytes = Counters::get(counters_.pending_put_bytes);
  s.put_land_waits = Counters::get(counters_.put_land_waits);
  s.slab_bytes = storage_.slab_bytes();
  s.per_object_overhead_bytes = Storage::per_object_overhead_bytes();
  s.per_connection_bytes = sizeof(Connection) + Connection::kInputBufferBytes;
  s.uptime_s = started_ns_ ? double(monotonic_ns() - started_ns_) / 1e9 : 0.0;
  return s;
}

std::string Server::namespace_stats_json(std::string_view ns) const {
  // What a tenant limited to some namespaces sees: its own figures, the protocol's fields with
  // server-wide ones (connections, fragmentation) left at zero.
  const NamespaceStats n = storage_.namespace_stats(ns);
  char buf[768];
  std::snprintf(buf, sizeof buf,
                "{\"namespace\":\"%.*s\",\"used_bytes\":%llu,\"capacity_bytes\":%llu,\"items\":%llu,"
                "\"hits\":%llu,\"misses\":%llu,\"evictions\":%llu,\"expired\":%llu,\"puts\":%llu,"
                "\"gets\":%llu,\"deletes\":%llu,\"connections\":0,\"fragmentation\":0}",
                static_cast<int>(ns.size()), ns.data(), (unsigned long long)n.bytes,
                (unsigned long long)storage_.capacity(), (unsigned long long)n.items,
                (unsigned long long)n.hits, (unsigned long long)n.misses, (unsigned long long)n.evictions,
                (unsigned long long)n.expired, (unsigned long long)n.puts, (unsigned long long)n.gets,
                (unsigned long long)n.deletes);
  return buf;
}

std::string Server::stats_json() const {
  const StatsSnapshot s = stats();
  char buf[4096];  // ~40 counters of up to 20 digits each, with their names
  std::string req = "{";
  for (int i = 1; i < kNumOps; ++i) {
    req += (i > 1 ? ",\"" : "\"") + std::string(proto::op_name(static_cast<uint8_t>(i))) +
           "\":" + std::to_string(s.requests[i]);
  }
  req += ",\"UNKNOWN\":" + std::to_string(s.requests[0]) + "}";
  std::snprintf(
      buf, sizeof buf,
      "{\"used_bytes\":%llu,\"capacity_bytes\":%llu,\"allocated_bytes\":%llu,\"items\":%llu,\"hits\":%llu,"
      "\"misses\":%llu,\"evictions\":%llu,\"expired\":%llu,\"puts\":%llu,\"gets\":%llu,\"deletes\":%llu,"
      "\"connections\":%llu,\"connections_total\":%llu,\"connections_rejected\":%llu,\"accept_pauses\":%llu,"
      "\"fragmentation\":%.6f,"
      "\"bytes_in\":%llu,\"bytes_out\":%llu,\"protocol_errors\":%llu,\"auth_failures\":%llu,\"reply_limit_"
      "closes\":%llu,\"timeouts\":%"
      "llu,"
      "\"checksum_failures\":%llu,\"no_space\":%llu,\"put_bytes_buffered\":%llu,\"pending_put_bytes\":%llu,"
      "\"put_land_waits\":%llu,\"slab_reassignments\":%llu,"
      "\"evicted_probation\":%llu,\"evicted_protected\":%llu,\"evicted_priority\":%llu,"
      "\"slab_bytes\":%llu,\"meta_bytes\":%llu,\"meta_slab_bytes\":%llu,\"prefaulted_bytes\":%llu,\"uptime_"
      "s\":%.3f,\"requests\":",
      (unsigned long long)s.storage.stored_bytes, (unsigned long long)s.storage.capacity_bytes,
      (unsigned long long)s.storage.allocated_bytes, (unsigned long long)s.storage.items,
      (unsigned long long)s.storage.hits, (unsigned long long)s.storage.misses,
      (unsigned long long)s.storage.evictions, (unsigned long long)s.storage.expired,
      (unsigned long long)s.storage.puts, (unsigned long long)s.requests[static_cast<int>(proto::Op::kGet)],
      (unsigned long long)s.storage.deletes, (unsigned long long)s.connections,
      (unsigned long long)s.connections_total, (unsigned long long)s.connections_rejected,
      (unsigned long long)s.accept_pauses, s.storage.fragmentation, (unsigned long long)s.bytes_in,
      (unsigned long long)s.bytes_out, (unsigned long long)s.protocol_errors,
      (unsigned long long)s.auth_failures, (unsigned long long)s.reply_limit_closes,
      (unsigned long long)s.timeouts, (unsigned long long)s.checksum_failures, (unsigned long long)s.no_space,
      (unsigned long long)s.put_bytes_buffered, (unsigned long long)s.pending_put_bytes,
      (unsigned long long)s.put_land_waits, (unsigned long long)s.storage.slab_reassignments,
      (unsigned long long)s.storage.evicted_probation, (unsigned long long)s.storage.evicted_protected,
      (unsigned long long)s.storage.evicted_priority, (unsigned long long)s.slab_bytes,
      (unsigned long long)s.storage.meta_bytes, (unsigned long long)s.storage.meta_slab_bytes,
      (unsigned long long)s.prefaulted_bytes, s.uptime_s);
  return std::string(buf) + req + ",\"eviction_policy\":\"" + s.storage.policy + "\"}";
}

}  // namespace membrain::server
