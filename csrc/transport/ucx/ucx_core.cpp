#include "transport/ucx/ucx_core.h"

#include <netdb.h>
#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

namespace membrain::ucx {

int ms_until(Clock::time_point deadline, int cap) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return static_cast<int>(std::clamp<int64_t>(left, 0, cap));
}

namespace {
// ucp_config_t for the lifetime of one ucp_init call.
struct ConfigGuard {
  ucp_config_t* cfg = nullptr;
  ConfigGuard() {
    const ucs_status_t st = ucp_config_read(nullptr, nullptr, &cfg);
    if (st != UCS_OK) throw UcxError("ucp_config_read", st);
  }
  ~ConfigGuard() {
    if (cfg) ucp_config_release(cfg);
  }
};

// Whether UCX_TLS lets UCX load its shared-memory transports. Setting a shared-memory option
// when none is loaded makes UCX warn "invalid configuration" on every worker.
bool tls_may_use_shared_memory() {
  const char* tls = std::getenv("UCX_TLS");
  if (!tls || !*tls || tls[0] == '^') return true;  // default, or an exclusion list
  std::string list(tls);
  for (std::size_t pos = 0; pos <= list.size();) {
    const std::size_t end = std::min(list.find(',', pos), list.size());
    const std::string tl = list.substr(pos, end - pos);
    if (tl == "all" || tl == "sm" || tl == "shm" || tl == "mm" || tl == "sysv" || tl == "posix") return true;
    pos = end + 1;
  }
  return false;
}
}  // namespace

std::shared_ptr<Context> Context::create(const char* name, bool server) {
  ConfigGuard cfg;
  if (server && !std::getenv("UCX_CM_REUSEADDR")) {
    // Without it a restarted server cannot bind its UCX port while old connections sit in
    // TIME_WAIT. Not every UCX accepts transport options here: then the default stays.
    (void)ucp_config_modify(cfg.cfg, "CM_REUSEADDR", "y");
  }
  // Endpoints use peer-failure handling (err_mode_from_env), and UCX only picks transports
  // that claim to support it. Shared memory (sysv/posix) claims it only with MM_ERROR_HANDLING
  // (peer death is then found by the connection manager's socket and by keepalive), and CMA
  // is allowed for rendezvous only with CMA_MEMORY_INVALIDATE. Without both, two processes on
  // one host talk over TCP loopback; with them, large values move by one process_vm_readv.
  // UCX's own CI runs its error-handling tests this way. The user's environment wins.
  if (!std::getenv("UCX_MM_ERROR_HANDLING") && tls_may_use_shared_memory()) {
    (void)ucp_config_modify(cfg.cfg, "MM_ERROR_HANDLING", "y");
  }
  // CMA's option belongs to its memory domain, which ucp_config_modify cannot reach (UCX warns
  // "invalid configuration" and ignores it): memory domains read only the environment, during
  // ucp_init. So it is put there, once per process and never removed - setenv is not safe
  // while other threads read the environment, and doing it once keeps that window to the first
  // context. Other UCX users in the process see it too (docs/rdma.md).
  static std::once_flag cma_env;
  std::call_once(cma_env, [] { ::setenv("UCX_CMA_MEMORY_INVALIDATE", "y", /*overwrite=*/0); });
  ucp_params_t p{};
  p.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED | UCP_PARAM_FIELD_NAME;
  p.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP | UCP_FEATURE_RMA;
  p.mt_workers_shared = 1;  // client workers are created and used from several Python threads
  p.name = name;
  std::shared_ptr<Context> c(new Context());  // private constructor; owned from here on
  const ucs_status_t st = ucp_init(&p, cfg.cfg, &c->h_);
  if (st != UCS_OK) {
    c->h_ = nullptr;
    throw UcxError("ucp_init", st);
  }
  return c;
}

std::shared_ptr<Context> Context::client_shared() {
  static std::mutex mu;
  static std::weak_ptr<Context> weak;
  std::lock_guard<std::mutex> lock(mu);
  if (auto c = weak.lock()) return c;
  auto c = create("membrain-client");
  weak = c;
  return c;
}

Context::~Context() {
  if (h_) ucp_cleanup(h_);
}

Worker::Worker(std::shared_ptr<Context> ctx) : ctx_(std::move(ctx)) {
  ucp_worker_params_t p{};
  p.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  p.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  ucs_status_t st = ucp_worker_create(ctx_->get(), &p, &h_);
  if (st != UCS_OK) throw UcxError("ucp_worker_create", st);
  st = ucp_worker_get_efd(h_, &efd_);
  if (st != UCS_OK) {
    ucp_worker_destroy(h_);
    throw UcxError("ucp_worker_get_efd", st);
  }
  ucp_worker_attr_t a{};
  a.field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER;
  st = ucp_worker_query(h_, &a);
  max_am_header_ = st == UCS_OK ? a.max_am_header : 0;
}

Worker::~Worker() {
  if (h_) ucp_worker_destroy(h_);
}

bool Worker::progress_all() {
  bool any = false;
  while (ucp_worker_progress(h_) != 0) any = true;
  return any;
}

void Worker::wait_event(int timeout_ms, int extra_fd) {
  const ucs_status_t st = ucp_worker_arm(h_);
  if (st == UCS_ERR_BUSY) return;  // events pending: the caller progresses again
  if (st != UCS_OK) {
    // No wakeup support on some transport: fall back to a short sleep.
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    return;
  }
  pollfd fds[2] = {{efd_, POLLIN, 0}, {extra_fd, POLLIN, 0}};
  const int n = poll(fds, extra_fd >= 0 ? 2 : 1, timeout_ms);
  (void)n;  // EINTR and timeouts both just return to the caller's loop
}

void Worker::register_am(uint16_t id, ucp_am_recv_callback_t cb, void* arg) {
  ucp_am_handler_param_t p{};
  p.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                 UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
  p.id = id;
  p.cb = cb;
  p.arg = arg;
  p.flags = UCP_AM_FLAG_WHOLE_MSG;
  const ucs_status_t st = ucp_worker_set_am_recv_handler(h_, &p);
  if (st != UCS_OK) throw UcxError("ucp_worker_set_am_recv_handler", st);
}

void Endpoint::close(bool force, int timeout_ms) {
  if (!h_) return;
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  ucs_status_ptr_t req = ucp_ep_close_nbx(h_, &p);
  if (force && UCS_PTR_IS_ERR(req)) {
    // UCX refuses a forced close unless the endpoint has peer-failure handling
    // (MEMBRAIN_UCX_ERR_MODE=none); forgetting the handle then would leave the endpoint open
    // with its error callback still pointing at our owner. Close it by flushing instead, but
    // without waiting long: a forced close is asked for when the peer is gone or stuck, and
    // then the flush never completes (UCX releases the request if it ever does).
    p.flags = 0;
    req = ucp_ep_close_nbx(h_, &p);
    timeout_ms = std::min(timeout_ms, 10);
  }
  h_ = nullptr;
  if (req == nullptr || UCS_PTR_IS_ERR(req)) return;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (ucp_request_check_status(req) == UCS_INPROGRESS) {
    if (!worker_->progress_all()) {
      if (Clock::now() >= deadline) break;
      worker_->wait_event(std::max(1, ms_until(deadline, 10)));
    }
  }
  if (ucp_request_check_status(req) == UCS_INPROGRESS) {
    // A flush close that did not finish in time: force it (the peer is gone or stuck).
    ucp_request_cancel(worker_->get(), req);
  }
  ucp_request_free(req);
}

ucs_status_t Endpoint::flush(Clock::time_point deadline) {
  if (!h_) return UCS_ERR_NOT_CONNECTED;
  ucp_request_param_t p{};
  ucs_status_ptr_t req = ucp_ep_flush_nbx(h_, &p);
  if (req == nullptr) return UCS_OK;
  if (UCS_PTR_IS_ERR(req)) return UCS_PTR_STATUS(req);
  while (ucp_request_check_status(req) == UCS_INPROGRESS) {
    if (!worker_->progress_all()) {
      if (Clock::now() >= deadline) break;
      worker_->wait_event(std::max(1, ms_until(deadline, 10)));
    }
  }
  const ucs_status_t st = ucp_request_check_status(req);
  ucp_request_free(req);  // still in flight on timeout: UCX releases it when it completes
  return st == UCS_INPROGRESS ? UCS_ERR_TIMED_OUT : st;
}

void Completion::on_send(void*, ucs_status_t st, void* user) {
  auto* c = static_cast<Completion*>(user);
  c->status = st;
  c->done = true;
}

void Completion::on_recv(void* request, ucs_status_t st, size_t, void* user) {
  on_send(request, st, user);
}

ucp_err_handling_mode_t err_mode_from_env() {
  const char* v = std::getenv("MEMBRAIN_UCX_ERR_MODE");
  // Peer-failure handling is the default: without it UCX treats a transport error on an
  // endpoint (a server that died mid-transfer) as fatal and may abort the whole process,
  // which for a client means the vLLM worker. "none" is an explicit opt-in.
  return v && std::strcmp(v, "none") == 0 ? UCP_ERR_HANDLING_MODE_NONE : UCP_ERR_HANDLING_MODE_PEER;
}

std::size_t resolve_sockaddr(const std::string& host, uint16_t port, void* storage) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (host.empty() ? AI_PASSIVE : 0);
  addrinfo* res = nullptr;
  const std::string svc = std::to_string(port);
  const int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), svc.c_str(), &hints, &res);
  if (rc != 0 || !res) throw UcxError("resolve " + host + ": " + gai_strerror(rc), UCS_ERR_INVALID_ADDR);
  const std::size_t len = res->ai_addrlen;
  std::memcpy(storage, res->ai_addr, len);
  freeaddrinfo(res);
  return len;
}

Listener::Listener(Worker& worker, const std::string& host, uint16_t port, ucp_listener_conn_callback_t cb,
                   void* arg) {
  sockaddr_storage ss{};
  const std::size_t len = resolve_sockaddr(host, port, &ss);
  ucp_listener_params_t p{};
  p.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  p.sockaddr.addr = reinterpret_cast<const sockaddr*>(&ss);
  p.sockaddr.addrlen = static_cast<socklen_t>(len);
  p.conn_handler.cb = cb;
  p.conn_handler.arg = arg;
  ucs_status_t st = ucp_listener_create(worker.get(), &p, &h_);
  if (st != UCS_OK) throw UcxError("ucp_listener_create on " + host + ":" + std::to_string(port), st);
  ucp_listener_attr_t a{};
  a.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  st = ucp_listener_query(h_, &a);
  if (st != UCS_OK) {
    ucp_listener_destroy(h_);
    throw UcxError("ucp_listener_query", st);
  }
  const auto* sa = reinterpret_cast<const sockaddr*>(&a.sockaddr);
  port_ = ntohs(sa->sa_family == AF_INET6 ? reinterpret_cast<const sockaddr_in6*>(sa)->sin6_port
                                          : reinterpret_cast<const sockaddr_in*>(sa)->sin_port);
}

Listener::~Listener() {
  if (h_) ucp_listener_destroy(h_);
}

MemRegion::MemRegion(std::shared_ptr<Context> ctx, void* addr, std::size_t len)
    : ctx_(std::move(ctx)), addr_(addr), len_(len) {
  ucp_mem_map_params_t p{};
  p.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  p.address = addr;
  p.length = len;
  const ucs_status_t st = ucp_mem_map(ctx_->get(), &p, &h_);
  if (st != UCS_OK) throw UcxError("ucp_mem_map", st);
}

MemRegion::~MemRegion() {
  if (h_) ucp_mem_unmap(ctx_->get(), h_);
}

}  // namespace membrain::ucx
