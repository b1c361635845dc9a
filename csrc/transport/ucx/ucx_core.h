// RAII wrappers for the UCP handles the Membrain UCX transport uses (context, worker,
// endpoint, listener, registered memory) and the blocking-wait helper shared by the client
// connection and the server listener. Only compiled when UCX is found (cmake/MembrainUcx.cmake).
//
// Waiting: progress is polled while there is work (ucp_worker_progress returns non-zero);
// when a pass makes no progress the worker is armed and the thread sleeps in poll() on the
// worker's event fd until the transport signals or the deadline passes - no busy spinning
// while idle.
#pragma once
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include <ucp/api/ucp.h>

namespace membrain::ucx {

// A UCX call failed; carries the UCS status text.
class UcxError : public std::runtime_error {
 public:
  UcxError(const std::string& what, ucs_status_t st)
      : std::runtime_error(what + ": " + ucs_status_string(st)), status_(st) {}
  ucs_status_t status() const { return status_; }

 private:
  ucs_status_t status_;
};

using Clock = std::chrono::steady_clock;

// Milliseconds until `deadline`, clamped to [0, cap].
int ms_until(Clock::time_point deadline, int cap = 1000);

// ucp_context_h. One per process side (client or server); workers keep it alive.
class Context {
 public:
  // Features: active messages, wakeup (event fd) and RMA (memory registration).
  // `server`: listeners rebind their port at once after a restart (CM_REUSEADDR, unless the
  // user's environment says otherwise).
  static std::shared_ptr<Context> create(const char* name, bool server = false);
  // The context shared by every client connection of this process (created on first use).
  static std::shared_ptr<Context> client_shared();
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  ucp_context_h get() const { return h_; }

 private:
  Context() = default;
  ucp_context_h h_ = nullptr;
};

// ucp_worker_h in UCS_THREAD_MODE_SERIALIZED (callers serialize access themselves).
class Worker {
 public:
  explicit Worker(std::shared_ptr<Context> ctx);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  ucp_worker_h get() const { return h_; }
  int event_fd() const { return efd_; }
  // Largest AM header this worker's transports carry (UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER).
  std::size_t max_am_header() const { return max_am_header_; }
  // Progresses until nothing more happens; returns whether anything did.
  bool progress_all();
  // Sleeps in poll() on the event fd (and `extra_fd` when >= 0) for up to `timeout_ms`,
  // after arming the worker. Returns immediately when the worker has pending events.
  void wait_event(int timeout_ms, int extra_fd = -1);
  void register_am(uint16_t id, ucp_am_recv_callback_t cb, void* arg);

 private:
  std::shared_ptr<Context> ctx_;
  ucp_worker_h h_ = nullptr;
  int efd_ = -1;
  std::size_t max_am_header_ = 0;
};

// ucp_ep_h. Closing is asynchronous in UCP: close() starts it (flush or force) and progresses
// the worker until it completes or `timeout_ms` passes; the destructor force-closes.
class Endpoint {
 public:
  Endpoint() = default;
  Endpoint(Worker* worker, ucp_ep_h ep) : worker_(worker), h_(ep) {}
  ~Endpoint() { close(true, 200); }
  Endpoint(Endpoint&& o) noexcept : worker_(o.worker_), h_(o.h_) { o.h_ = nullptr; }
  Endpoint& operator=(Endpoint&& o) noexcept {
    if (this != &o) {
      close(true, 200);
      worker_ = o.worker_;
      h_ = o.h_;
      o.h_ = nullptr;
    }
    return *this;
  }
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;

  ucp_ep_h get() const { return h_; }
  explicit operator bool() const { return h_ != nullptr; }
  void close(bool force, int timeout_ms);
  // Waits (progressing the worker) until everything sent so far has completed - which also
  // means the endpoint's wireup has finished. Returns the status, UCS_ERR_TIMED_OUT past
  // `deadline`.
  //
  // Why it matters: an endpoint made from a sockaddr starts on TCP lanes and switches to
  // shared-memory lanes during wireup. A rendezvous send posted before the switch is packed
  // for the old configuration and trips an assertion inside UCX 1.13 (rndv.c:168, assertions
  // are compiled into Debian's build), aborting the process. So no large send goes out on an
  // endpoint before one flush of it has completed.
  ucs_status_t flush(Clock::time_point deadline);
  // Hands the handle over without closing it (the caller closes it asynchronously).
  ucp_ep_h release() {
    ucp_ep_h e = h_;
    h_ = nullptr;
    return e;
  }

 private:
  Worker* worker_ = nullptr;
  ucp_ep_h h_ = nullptr;
};

// ucp_listener_h bound to a sockaddr; port 0 picks a free port (see port()).
class Listener {
 public:
  Listener(Worker& worker, const std::string& host, uint16_t port, ucp_listener_conn_callback_t cb,
           void* arg);
  ~Listener();
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  uint16_t port() const { return port_; }
  ucp_listener_h get() const { return h_; }

 private:
  ucp_listener_h h_ = nullptr;
  uint16_t port_ = 0;
};

// Memory registered with ucp_mem_map (pinned for RDMA; a no-op cost on shm/tcp).
class MemRegion {
 public:
  MemRegion(std::shared_ptr<Context> ctx, void* addr, std::size_t len);
  ~MemRegion();
  MemRegion(const MemRegion&) = delete;
  MemRegion& operator=(const MemRegion&) = delete;
  ucp_mem_h get() const { return h_; }
  void* addr() const { return addr_; }
  std::size_t size() const { return len_; }
  bool contains(const void* p, std::size_t n) const {
    auto a = static_cast<const uint8_t*>(addr_), q = static_cast<const uint8_t*>(p);
    return q >= a && q + n <= a + len_;
  }

 private:
  std::shared_ptr<Context> ctx_;
  ucp_mem_h h_ = nullptr;
  void* addr_;
  std::size_t len_;
};

// Completion record of one non-blocking UCP request, set by the callbacks below (pass the
// record as the request's user_data). `req` is the handle to ucp_request_free afterwards.
struct Completion {
  bool done = false;
  ucs_status_t status = UCS_INPROGRESS;
  void* req = nullptr;
  static void on_send(void* request, ucs_status_t st, void* user);
  static void on_recv(void* request, ucs_status_t st, size_t length, void* user);
};

// Endpoint error-handling mode from MEMBRAIN_UCX_ERR_MODE: "peer" (default) or "none".
// "peer" adds UCX's own failure detection (keepalive, reset notification): a dead peer is an
// error callback, never an abort, and forced closes are allowed. It restricts transports to
// those that support it; Context::create enables that support for shared memory and CMA, so
// one host still gets shm lanes. "none" has no failure detection (a rendezvous send to a dead
// peer never completes, forced close is refused), so it is only an explicit opt-in.
ucp_err_handling_mode_t err_mode_from_env();

// Fills a sockaddr_storage for host:port (numeric or resolvable IPv4/IPv6); throws UcxError.
std::size_t resolve_sockaddr(const std::string& host, uint16_t port, void* storage);

// AM ids of the Membrain protocol over UCP.
constexpr uint16_t kAmRequest = 0x4d31;  // client -> server: one protocol request frame
constexpr uint16_t kAmReply = 0x4d32;    // server -> client: one protocol reply frame
// One large value of the frame just sent (PUT request or GET reply), as its own AM so it
// moves by contiguous rendezvous (UCX 1.13 moves IOV rendezvous through bounce buffers).
// AM header: u64 request_id, u32 item index; AM data: the value.
constexpr uint16_t kAmValue = 0x4d33;
constexpr std::size_t kValueHeaderBytes = 12;
// Frames whose values total at most this travel inline (AM data of the frame itself).
constexpr uint64_t kInlineValueBytes = 64 << 10;

}  // namespace membrain::ucx
