// UCX listener of the Membrain server. One progress thread owns the UCP worker, the listener
// and every endpoint; frames arrive as active messages (docs/rdma.md):
//   AM header = 40-byte frame header [+ PUT item table and keys]
//   AM data   = the rest of the payload (PUT: the values; otherwise the key list / bytes)
// Replies go back the same way (GET: item table in the AM header, values as the AM data, sent
// from the pinned storage chunks). PUT values sent by rendezvous are received with
// ucp_am_recv_data_nbx straight into their reserved storage chunks.
//
// Each connection handles one frame at a time, in arrival order, so replies keep request order
// and a GET sees the PUTs sent before it. The thread spins on ucp_worker_progress only while
// transfers are in flight; otherwise it arms the worker and sleeps on its event fd.
#include "server/ucx_listener.h"

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <list>
#include <thread>
#include <unordered_map>
#include <vector>

#include <sys/eventfd.h>

#include "server/request.h"
#include "server/session.h"
#include "transport/ucx/ucx_core.h"

namespace membrain::server {

namespace {

using namespace membrain::ucx;  // UCP plumbing shared with the client (transport/ucx/ucx_core.h)

using proto::Header;
using proto::Op;
using proto::Status;

constexpr std::size_t kMaxQueuedFrames = 256;         // per connection, before it is refused
constexpr std::size_t kMaxQueuedBytes = 64ull << 20;  // eager bytes held per connection
// Before HELLO has succeeded (auth on) a peer may queue only a HELLO's worth: a few frames and
// bytes, so an unauthenticated client cannot make the server hold 64 MiB of its messages.
constexpr std::size_t kMaxPreAuthFrames = 4;
constexpr std::size_t kMaxPreAuthBytes = 64 << 10;
// PUT values the server will not store (NO_SPACE, TOO_LARGE, BAD_REQUEST items) are received
// into this one shared buffer, reused as many times as the value needs (an iov of repeated
// entries): what is allocated never depends on a length the peer declared.
constexpr std::size_t kDrainBytes = 1 << 20;
constexpr int64_t kCloseGraceMs = 2000;  // flush-close budget before forcing

struct Inbound {
  std::vector<uint8_t> header;  // AM header (copied out of the callback)
  void* data = nullptr;         // eager bytes or rendezvous descriptor
  std::size_t len = 0;
  bool rndv = false;
  bool held = false;      // UCX-owned eager buffer (release with ucp_am_data_release)
  bool is_value = false;  // a kAmValue message (one value of a split PUT)
  std::vector<uint8_t> copy;
};

// The frame whose data is being received by rendezvous (one receive, or one per value of a
// split PUT whose values arrive as separate value AMs).
// PUT value bytes reserved in storage before they arrived (rendezvous: the peer posted them, the
// receive has not completed), counted in Counters::pending_put_bytes while the frame is active,
// within --max-pending-put-bytes[-per-connection] like TCP's. Returned when the frame goes.
struct PendingBudget {
  std::atomic<uint64_t>* total = nullptr;
  uint64_t held = 0;
  PendingBudget() = default;
  PendingBudget(const PendingBudget&) = delete;
  PendingBudget& operator=(const PendingBudget&) = delete;
  ~PendingBudget() {
    if (total && held) total->fetch_sub(held, std::memory_order_relaxed);
  }
  bool take(std::atomic<uint64_t>& t, uint64_t n, const ServerConfig& cfg) {
    if (n == 0) return true;
    if (held + n > cfg.max_pending_put_bytes_per_connection) return false;
    uint64_t cur = t.load(std::memory_order_relaxed);
    do {
      if (cur + n > cfg.max_pending_put_bytes) return false;
    } while (!t.compare_exchange_weak(cur, cur + n, std::memory_order_relaxed));
    total = &t;
    held += n;
    return true;
  }
};

struct Active {
  std::vector<std::unique_ptr<Completion>> parts;  // one per receive issued
  PendingBudget budget;                            // rendezvous values reserved, not yet received
  bool all_issued = true;                          // split PUT: false until every value AM is taken
  Header hdr;
  Inbound in;
  std::vector<uint8_t> payload;  // non-PUT payload
  std::vector<uint8_t> keys;     // split PUT: the AM header (table and keys), kept until every value came
  PutFrame put;                  // PUT (server/session.h)
  std::vector<ucp_dt_iov_t> iov;
  std::deque<std::vector<ucp_dt_iov_t>> value_iov;  // split PUT: iovs of values received into the drain
  std::vector<std::size_t> expect;                  // split PUT: items whose value AMs are awaited, in order
  std::size_t next = 0;

  bool settled() const {
    for (const auto& p : parts) {
      if (!p->done) return false;
    }
    return true;
  }
  bool finished() const { return all_issued && settled(); }
  ucs_status_t status() const {
    for (const auto& p : parts) {
      if (p->status != UCS_OK) return p->status;
    }
    return UCS_OK;
  }
  void free_requests() {
    for (auto& p : parts) {
      if (p->req) ucp_request_free(p->req);
      p->req = nullptr;
    }
  }
};

struct Conn {
  ucp_ep_h ep = nullptr;
  std::string ns = "default";
  bool authed = false;
  const TokenGrant* grant = nullptr;
  std::deque<Inbound> inbox;
  std::size_t inbox_bytes = 0;
  std::size_t inbox_frames = 0;  // request frames queued (value AMs are bounded by their frame)
  bool overflow = false;         // queued more than allowed (pre-auth bound): refuse and close
  std::unique_ptr<Active> active;
  int sends = 0;            // replies not yet completed
  uint64_t send_bytes = 0;  // their bytes (pinned values included): --max-reply-bytes-per-connection
  bool closing = false;     // an error reply is queued: close once it is sent
  bool dead = false;        // the peer is gone: force-close
  // Wireup: until the flush posted at accept has completed, replies go eagerly (no
  // rendezvous), see Endpoint::flush for the UCX assertion this avoids.
  void* flush_req = nullptr;
  bool settled = false;
  Clock::time_point closing_since{};
  Clock::time_point last_activity = Clock::now();
  Clock::time_point accepted = Clock::now();  // for the authentication deadline
};

struct SendOp {
  Completion done;
  ucp_ep_h ep;
  std::vector<uint8_t> header;
  std::vector<uint8_t> body;
  std::vector<ObjectRef> pins;
  std::vector<ucp_dt_iov_t> iov;
  uint64_t bytes = 0;  // header + data, counted in Conn::send_bytes until completed
};

class Impl final : public UcxListener {
 public:
  Impl(ServerContext& ctx, const std::string& host, uint16_t port) : ctx_(ctx), limits_(ctx.config.limits) {
    try {
      uctx_ = Context::create("membrain-server", /*server=*/true);
      worker_ = std::make_unique<Worker>(uctx_);
      worker_->register_am(kAmRequest, &Impl::on_request, this);
      worker_->register_am(kAmValue, &Impl::on_value, this);
      listener_ = std::make_unique<Listener>(*worker_, host, port, &Impl::on_conn, this);
    } catch (const UcxError& e) {
      throw std::runtime_error(std::string("UCX listener: ") + e.what());
    }
    stop_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (stop_fd_ < 0) throw std::runtime_error("eventfd failed");
    port_ = listener_->port();
    thread_ = std::thread([this] { run(); });
  }
  ~Impl() override {
    stop();
    if (stop_fd_ >= 0) ::close(stop_fd_);
  }
  uint16_t port() const override { return port_; }
  void stop() override {
    if (stopping_.exchange(true)) {
      if (thread_.joinable()) thread_.join();
      return;
    }
    const uint64_t one = 1;
    (void)!::write(stop_fd_, &one, sizeof one);
    if (thread_.joinable()) thread_.join();
  }

 private:
  static void on_conn(ucp_conn_request_h req, void* arg) {
    static_cast<Impl*>(arg)->conn_reqs_.push_back(req);
  }

  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t) {
    static_cast<Impl*>(arg)->errored_.push_back(ep);
  }

  static ucs_status_t on_request(void* arg, const void* header, size_t header_len, void* data, size_t len,
                                 const ucp_am_recv_param_t* param) {
    return static_cast<Impl*>(arg)->enqueue(header, header_len, data, len, param, false);
  }
  static ucs_status_t on_value(void* arg, const void* header, size_t header_len, void* data, size_t len,
                               const ucp_am_recv_param_t* param) {
    return static_cast<Impl*>(arg)->enqueue(header, header_len, data, len, param, true);
  }

  ucs_status_t enqueue(const void* header, size_t header_len, void* data, size_t len,
                       const ucp_am_recv_param_t* param, bool is_value) {
    Impl* self = this;
    const bool rndv = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
    const bool persistent = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA;
    Conn* c = nullptr;
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) && param->reply_ep) {
      auto it = self->conns_.find(param->reply_ep);
      if (it != self->conns_.end() && !it->second->closing && !it->second->dead) c = it->second.get();
    }
    if (!c) {  // no way to answer (no reply endpoint) or a connection being closed: drop it
      if (rndv || persistent) self->stray_.push_back(data);
      return (rndv || persistent) ? UCS_INPROGRESS : UCS_OK;
    }
    if (!c->authed && (c->inbox_frames >= kMaxPreAuthFrames || c->inbox_bytes + len > kMaxPreAuthBytes)) {
      // Not authenticated yet: nothing more is held for this peer (service() closes it).
      c->overflow = true;
      if (rndv || persistent) self->stray_.push_back(data);
      return (rndv || persistent) ? UCS_INPROGRESS : UCS_OK;
    }
    Inbound in;
    in.is_value = is_value;
    in.header.assign(static_cast<const uint8_t*>(header), static_cast<const uint8_t*>(header) + header_len);
    in.len = len;
    in.data = data;
    if (rndv) {
      in.rndv = true;
    } else if (persistent) {
      in.held = true;
    } else {
      in.copy.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + len);
      in.data = in.copy.data();
    }
    c->inbox_bytes += rndv ? 0 : len;
    c->inbox_frames += is_value ? 0 : 1;
    c->last_activity = Clock::now();
    c->inbox.push_back(std::move(in));
    // INPROGRESS keeps a rendezvous descriptor (or a persistent eager buffer) for later.
    return (rndv || persistent) ? UCS_INPROGRESS : UCS_OK;
  }

  void release(Inbound& in) {
    if ((in.rndv || in.held) && in.data) ucp_am_data_release(worker_->get(), in.data);
    in.data = nullptr;
    in.rndv = in.held = false;
  }

  void run() {
    while (!stopping_.load()) {
      bool busy = worker_->progress_all();
      busy |= service();
      if (busy || (spin_ && in_flight())) continue;  // spin only while transfers are in flight
      worker_->wait_event(100, stop_fd_);
    }
    shutdown();
  }

  bool in_flight() const { return !sends_.empty() || actives_ > 0; }

  bool service() {
    bool did = false;
    for (void* d : stray_) ucp_am_data_release(worker_->get(), d);
    did |= !stray_.empty();
    stray_.clear();
    while (!conn_reqs_.empty()) {
      ucp_conn_request_h req = conn_reqs_.front();
      conn_reqs_.pop_front();
      accept(req);
      did = true;
    }
    for (ucp_ep_h ep : errored_) {
      auto it = conns_.find(ep);
      if (it != conns_.end()) it->second->dead = true;
    }
    did |= !errored_.empty();
    errored_.clear();
    // Completed replies.
    for (auto it = sends_.begin(); it != sends_.end();) {
      if (!(*it)->done.done) {
        ++it;
        continue;
      }
      finish_send(**it);
      it = sends_.erase(it);
      did = true;
    }
    std::vector<ucp_ep_h> gone;
    for (auto& [ep, cp] : conns_) {
      Conn& c = *cp;
      while (c.active && !c.active->all_issued && !c.closing && !c.dead && !c.inbox.empty()) {
        Inbound in = std::move(c.inbox.front());
        c.inbox.pop_front();
        c.inbox_bytes -= in.rndv ? 0 : in.len;
        c.inbox_frames -= in.is_value ? 0 : 1;
        take_value(c, std::move(in));
        did = true;
      }
      if (c.active && c.active->finished()) {
        complete_active(c);
        did = true;
      }
      while (!c.active && !c.closing && !c.dead && !c.inbox.empty()) {
        Inbound in = std::move(c.inbox.front());
        c.inbox.pop_front();
        c.inbox_bytes -= in.rndv ? 0 : in.len;
        c.inbox_frames -= in.is_value ? 0 : 1;
        start_frame(c, std::move(in));
        did = true;
      }
      if (!c.closing && !c.dead &&
          (c.overflow || c.inbox_frames > kMaxQueuedFrames ||
           c.inbox.size() > kMaxQueuedFrames + 2 * limits_.max_batch || c.inbox_bytes > kMaxQueuedBytes)) {
        refuse(c, Header{}, Status::kTooLarge);  // a peer pipelining without bounds
      }
      const auto now = Clock::now();
      if (!c.dead && !c.authed && auth_ns_ > 0 && now - c.accepted > std::chrono::nanoseconds(auth_ns_)) {
        Counters::inc(ctx_.counters.timeouts);  // auth on and no successful HELLO in time
        Counters::inc(ctx_.counters.auth_failures);
        c.dead = true;
      }
      if (!c.dead && idle_ns_ > 0 && now - c.last_activity > std::chrono::nanoseconds(idle_ns_)) {
        // Idle (or a transfer stuck) past idle_timeout: with UCP_ERR_HANDLING_MODE_NONE this
        // is also how a vanished client is noticed.
        Counters::inc(ctx_.counters.timeouts);
        c.dead = true;
      }
      if (c.dead || (c.closing && ((!c.active && c.sends == 0) ||
                                   now - c.closing_since > std::chrono::milliseconds(kCloseGraceMs)))) {
        gone.push_back(ep);
      }
    }
    for (ucp_ep_h ep : gone) {
      drop(ep);
      did = true;
    }
    reap_zombies();
    // Endpoint closes in progress.
    for (auto it = closing_.begin(); it != closing_.end();) {
      if (ucp_request_check_status(*it) != UCS_INPROGRESS) {
        ucp_request_free(*it);
        it = closing_.erase(it);
      } else {
        ++it;
      }
    }
    return did;
  }

  void accept(ucp_conn_request_h req) {
    // One count for TCP and UCX together (--max-connections bounds the server, not a transport).
    const uint64_t cur = ctx_.counters.connections_current.fetch_add(1, std::memory_order_relaxed);
    if (cur >= static_cast<uint64_t>(ctx_.config.max_connections)) {
      ctx_.counters.connections_current.fetch_sub(1, std::memory_order_relaxed);
      Counters::inc(ctx_.counters.connections_rejected);
      ucp_listener_reject(listener_->get(), req);
      return;
    }
    ucp_ep_params_t p{};
    p.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                   UCP_EP_PARAM_FIELD_ERR_HANDLER;
    p.conn_request = req;
    p.err_mode = err_mode_from_env();
    p.err_handler.cb = &Impl::on_ep_error;
    p.err_handler.arg = this;
    ucp_ep_h ep = nullptr;
    if (ucp_ep_create(worker_->get(), &p, &ep) != UCS_OK) {
      // UCX has already released the connection request when ucp_ep_create fails with it
      // (e.g. the client gave up mid-wireup); rejecting it again was a use-after-free that
      // crashed the server inside uct_listener_reject.
      ctx_.counters.connections_current.fetch_sub(1, std::memory_order_relaxed);
      Counters::inc(ctx_.counters.connections_rejected);
      return;
    }
    auto c = std::make_unique<Conn>();
    c->ep = ep;
    c->authed = !ctx_.config.auth_enabled();
    ucp_request_param_t fp{};
    ucs_status_ptr_t fr = ucp_ep_flush_nbx(ep, &fp);
    if (fr == nullptr)
      c->settled = true;
    else if (UCS_PTR_IS_ERR(fr))
      c->dead = true;
    else
      c->flush_req = fr;
    conns_.emplace(ep, std::move(c));
    Counters::inc(ctx_.counters.connections_total);
  }

  // Unmaps the connection and closes its endpoint (force when the peer is gone or stuck). A
  // receive still in flight completes (with an error) once the endpoint is closed; the
  // connection waits for that among the zombies, since the receive targets its buffers.
  void drop(ucp_ep_h ep) {
    auto it = conns_.find(ep);
    if (it == conns_.end()) return;
    std::unique_ptr<Conn> c = std::move(it->second);
    conns_.erase(it);
    forget_flush(*c);
    for (auto& in : c->inbox) release(in);
    c->inbox.clear();
    ctx_.counters.connections_current.fetch_sub(1, std::memory_order_relaxed);
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = (c->dead || c->active || c->sends) ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &p);
    if (r && !UCS_PTR_IS_ERR(r)) closing_.push_back(r);
    if (c->active) zombies_.push_back(std::move(c));
  }

  void reap_zombies() {
    for (auto it = zombies_.begin(); it != zombies_.end();) {
      Active* a = (*it)->active.get();
      if (a && !a->settled()) {
        ++it;
        continue;
      }
      if (a) {
        a->free_requests();
        --actives_;
      }
      it = zombies_.erase(it);
    }
  }

  // A frame-level refusal: reply with `st` and close after it is sent.
  void refuse(Conn& c, const Header& h, Status st) {
    if (st != Status::kUnauthorized) Counters::inc(ctx_.counters.protocol_errors);
    Reply r;
    r.status = st;
    send_reply(c, h, std::move(r));
    c.closing = true;
    c.closing_since = Clock::now();
  }

  void start_frame(Conn& c, Inbound in) {
    Header h;
    if (in.is_value) {  // a value AM with no split PUT waiting for it
      release(in);
      return refuse(c, h, Status::kBadRequest);
    }
    if (in.header.size() < proto::kHeaderBytes) {
      release(in);
      return refuse(c, h, Status::kBadRequest);
    }
    const auto err = proto::decode_header(in.header.data(), &h);
    if (err != proto::HeaderError::kNone) {
      Header echo;
      if (err != proto::HeaderError::kBadMagic) {
        echo.request_id = proto::get_u64(in.header.data() + 8);
        echo.opcode = in.header[5];
      }
      release(in);
      return refuse(
          c, echo,
          err == proto::HeaderError::kBadVersion ? Status::kUnsupportedVersion : Status::kBadRequest);
    }
    Counters::inc(ctx_.counters.bytes_in, in.header.size() + in.len);
    const uint8_t op = h.opcode;
    const Status st = check_request_frame(ctx_, h, c.authed);  // opcode, auth, per-op limits
    if (st != Status::kOk) {
      release(in);
      return refuse(c, h, st);
    }
    const std::size_t ext = in.header.size() - proto::kHeaderBytes;
    if (op == static_cast<uint8_t>(Op::kPut))
      return start_put(c, h, std::move(in));  // checks its own lengths
    if (ext + uint64_t{in.len} != h.payload_len) {
      release(in);
      return refuse(c, h, Status::kBadRequest);  // the AM does not carry payload_len bytes
    }
    if (ext != 0) {
      release(in);
      return refuse(c, h, Status::kBadRequest);
    }
    if (!in.rndv) {
      execute(c, h, static_cast<const uint8_t*>(in.data), in.len);
      release(in);
      return;
    }
    auto a = std::make_unique<Active>();
    a->hdr = h;
    a->payload.resize(in.len);
    a->in = std::move(in);
    std::vector<ucp_dt_iov_t> iov{{a->payload.data(), a->payload.size()}};
    receive(c, std::move(a), std::move(iov));
  }

  void execute(Conn& c, const Header& h, const uint8_t* p, std::size_t len) {
    Reply r = execute_request(ctx_, h, p, len, &c.ns, &c.authed, &c.grant);
    if (r.close) return refuse(c, h, r.status);
    send_reply(c, h, std::move(r));
  }

  void start_put(Conn& c, const Header& h, Inbound in) {
    // AM header: frame header, item table, keys. Validate everything before reserving.
    const uint32_t count = h.count;
    const std::size_t ext = in.header.size() - proto::kHeaderBytes;
    const uint64_t table = uint64_t{count} * proto::kPutItemBytes;
    if (ext < table) {
      release(in);
      return refuse(c, h, Status::kBadRequest);
    }
    auto a = std::make_unique<Active>();
    a->hdr = h;
    const Status st =
        a->put.parse(h, in.header.data() + proto::kHeaderBytes, proto::kHeaderBytes + table, limits_);
    if (st != Status::kOk) {
      release(in);
      return refuse(c, h, st);
    }
    const uint64_t keys_total = a->put.keys_bytes(), values_total = a->put.values_bytes();
    // The keys travel in the AM header, the values (exactly) in the AM data.
    const bool split = in.len == 0 && values_total > 0;  // the values follow as value AMs
    if (table + keys_total != ext || (!split && values_total != in.len)) {
      release(in);
      return refuse(c, h, Status::kBadRequest);
    }
    if (split) {
      // Values come one AM each: each is reserved when its AM arrives (take_value), so a frame
      // that declares values and never sends them makes the server evict nothing. Empty
      // values send no AM and are reserved now.
      a->keys.assign(in.header.begin(), in.header.end());
      for (std::size_t i = 0; i < a->put.items().size(); ++i) {
        if (a->put.items()[i].value_len)
          a->expect.push_back(i);
        else
          a->put.reserve(ctx_, c.ns, i, a->keys.data());
      }
      a->all_issued = a->expect.empty();
      release(in);  // no data of its own (it may still be a UCX-held buffer)
      c.active = std::move(a);
      ++actives_;
      return;
    }
    // One AM carries every value: they are here (eager) or posted by the peer (rendezvous).
    for (std::size_t i = 0; i < a->put.items().size(); ++i)
      reserve_value(c, *a, i, in.header.data(), in.rndv);
    if (!in.rndv) {  // eager: the values are here already
      const uint8_t* src = static_cast<const uint8_t*>(in.data);
      for (auto& it : a->put.items()) {
        if (it.obj && it.value_len) std::memcpy(it.obj->data(), src, it.value_len);
        src += it.value_len;
      }
      release(in);
      a->in = std::move(in);
      finish_put(c, *a);
      return;
    }
    // Rendezvous: one scatter receive straight into the reserved chunks; values that will
    // not be stored land in the drain buffer (reused: their bytes are discarded).
    std::vector<ucp_dt_iov_t> iov;
    for (auto& it : a->put.items()) {
      if (it.value_len == 0) continue;
      if (it.obj)
        iov.push_back({it.obj->data(), it.value_len});
      else
        append_drain(&iov, it.value_len);
    }
    a->in = std::move(in);
    receive(c, std::move(a), std::move(iov));
  }

  // Storage for PUT item i; a rendezvous value (not here yet) needs the pending-bytes budget
  // first, and without it is refused (NO_SPACE, drained) rather than reserved.
  void reserve_value(Conn& c, Active& a, std::size_t i, const uint8_t* keys, bool rndv) {
    const PutItem& it = a.put.items()[i];
    if (it.status != static_cast<uint8_t>(Status::kOk) || it.obj) return;
    if (rndv && !a.budget.take(ctx_.counters.pending_put_bytes, it.value_len, ctx_.config))
      return a.put.refuse(ctx_, i);
    a.put.reserve(ctx_, c.ns, i, keys);
  }

  // Entries covering `len` bytes, each pointing at (at most all of) the shared drain buffer.
  void append_drain(std::vector<ucp_dt_iov_t>* iov, uint64_t len) {
    if (!drain_) drain_.reset(new uint8_t[kDrainBytes]);
    for (; len > 0; len -= std::min<uint64_t>(len, kDrainBytes))
      iov->push_back({drain_.get(), static_cast<std::size_t>(std::min<uint64_t>(len, kDrainBytes))});
  }

  void receive(Conn& c, std::unique_ptr<Active> a, std::vector<ucp_dt_iov_t> iov) {
    a->iov = std::move(iov);
    a->parts.push_back(std::make_unique<Completion>());
    Completion* done = a->parts.back().get();
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
    p.cb.recv_am = &Completion::on_recv;
    p.user_data = done;
    void* buf;
    std::size_t count;
    if (a->iov.size() == 1) {
      p.datatype = ucp_dt_make_contig(1);
      buf = a->iov[0].buffer;
      count = a->iov[0].length;
    } else {
      p.datatype = ucp_dt_make_iov();
      buf = a->iov.data();
      count = a->iov.size();
    }
    void* desc = a->in.data;
    a->in.rndv = false;  // UCP owns the descriptor now
    a->in.data = nullptr;
    ucs_status_ptr_t r = ucp_am_recv_data_nbx(worker_->get(), desc, buf, count, &p);
    if (UCS_PTR_IS_ERR(r)) {
      c.dead = true;
      return;
    }
    if (r == nullptr) {
      done->done = true;
      done->status = UCS_OK;
    } else {
      done->req = r;
    }
    c.active = std::move(a);
    ++actives_;
  }

  // The next value AM of the split PUT in c.active: received straight into its chunk.
  void take_value(Conn& c, Inbound in) {
    Active& a = *c.active;
    const PutItem* it = a.next < a.expect.size() ? &a.put.items()[a.expect[a.next]] : nullptr;
    const bool ok = it && in.is_value && in.header.size() == kValueHeaderBytes &&
                    proto::get_u64(in.header.data()) == a.hdr.request_id &&
                    proto::get_u32(in.header.data() + 8) == a.expect[a.next] && in.len == it->value_len;
    if (!ok) {
      release(in);
      a.all_issued = true;  // nothing more will be taken; in-flight receives still finish
      return refuse(c, a.hdr, Status::kBadRequest);
    }
    ++a.next;
    if (a.next == a.expect.size()) a.all_issued = true;
    PutItem& item = a.put.items()[a.expect[a.next - 1]];
    reserve_value(c, a, a.expect[a.next - 1], a.keys.data(), in.rndv);  // here (eager) or posted (rndv)
    if (!in.rndv) {
      if (item.obj) std::memcpy(item.obj->data(), in.data, in.len);  // a dropped value is not copied
      release(in);
      return;
    }
    a.parts.push_back(std::make_unique<Completion>());
    Completion* done = a.parts.back().get();
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
    p.cb.recv_am = &Completion::on_recv;
    p.user_data = done;
    void* buf;
    std::size_t count;
    if (item.obj) {
      p.datatype = ucp_dt_make_contig(1);
      buf = item.obj->data();
      count = item.value_len;
    } else {
      a.value_iov.emplace_back();
      append_drain(&a.value_iov.back(), item.value_len);
      p.datatype = ucp_dt_make_iov();
      buf = a.value_iov.back().data();
      count = a.value_iov.back().size();
    }
    void* desc = in.data;
    in.rndv = false;
    in.data = nullptr;
    ucs_status_ptr_t r = ucp_am_recv_data_nbx(worker_->get(), desc, buf, count, &p);
    if (UCS_PTR_IS_ERR(r)) {
      done->done = true;
      done->status = UCS_PTR_STATUS(r);
    } else if (r == nullptr) {
      done->done = true;
      done->status = UCS_OK;
    } else {
      done->req = r;
    }
  }

  void complete_active(Conn& c) {
    std::unique_ptr<Active> a = std::move(c.active);
    --actives_;
    c.last_activity = Clock::now();
    a->free_requests();
    if (a->status() != UCS_OK) {  // transfer failed: the peer is gone
      c.dead = true;
      return;
    }
    if (c.dead || c.closing) return;
    if (a->hdr.opcode == static_cast<uint8_t>(Op::kPut)) return finish_put(c, *a);
    execute(c, a->hdr, a->payload.data(), a->payload.size());
  }

  void finish_put(Conn& c, Active& a) {
    for (std::size_t i = 0; i < a.put.items().size(); ++i) a.put.landed(ctx_, i);  // verify, publish
    Reply r;
    r.count = static_cast<uint32_t>(a.put.items().size());
    r.body = a.put.reply_body();
    send_reply(c, a.hdr, std::move(r));
  }

  void send_reply(Conn& c, const Header& req, Reply r) {
    auto s = std::make_unique<SendOp>();
    s->ep = c.ep;
    uint64_t values = 0;
    for (const auto& o : r.pins) values += o->value_len;
    const Header h = reply_header(req, r.count, r.status, r.body.size() + values);
    const bool is_get = req.opcode == static_cast<uint8_t>(Op::kGet) && r.status == Status::kOk;
    // GET: the item table rides in the AM header so the client can place the values before
    // receiving them; everything else: the body is the AM data.
    s->header.resize(proto::kHeaderBytes + (is_get ? r.body.size() : 0));
    proto::encode_header(h, s->header.data());
    Counters::inc(ctx_.counters.bytes_out, proto::kHeaderBytes + r.body.size() + values);
    if (!is_get) {
      s->body = std::move(r.body);
      if (!s->body.empty()) s->iov.push_back({s->body.data(), s->body.size()});
      post(c, std::move(s), kAmReply);
      return;
    }
    std::memcpy(s->header.data() + proto::kHeaderBytes, r.body.data(), r.body.size());
    if (values <= kInlineValueBytes) {  // small: the values are the reply's AM data
      for (const auto& o : r.pins) {
        if (o->value_len) s->iov.push_back({o->data(), o->value_len});
      }
      s->pins = std::move(r.pins);
      post(c, std::move(s), kAmReply);
      return;
    }
    // Large: the reply carries no data; each value follows as its own AM, sent contiguously
    // from its pinned storage chunk (rendezvous: zero-copy / RDMA).
    post(c, std::move(s), kAmReply);
    std::size_t k = 0;
    for (uint32_t j = 0; j < r.count && k < r.pins.size(); ++j) {
      if (r.body[std::size_t{j} * proto::kGetItemBytes] != static_cast<uint8_t>(Status::kOk)) continue;
      ObjectRef& o = r.pins[k++];
      if (!o->value_len) continue;
      auto v = std::make_unique<SendOp>();
      v->ep = c.ep;
      v->header.resize(kValueHeaderBytes);
      proto::put_u64(v->header.data(), req.request_id);
      proto::put_u32(v->header.data() + 8, j);
      v->iov.push_back({o->data(), o->value_len});
      v->pins.push_back(std::move(o));
      post(c, std::move(v), kAmValue);
    }
  }

  // Whether the accept-time flush has completed (then rendezvous sends are safe).
  static bool settle(Conn& c) {
    if (!c.settled && c.flush_req && ucp_request_check_status(c.flush_req) != UCS_INPROGRESS) {
      ucp_request_free(c.flush_req);
      c.flush_req = nullptr;
      c.settled = true;  // on error the endpoint is failing anyway; its sends will say so
    }
    return c.settled;
  }

  static void forget_flush(Conn& c) {
    if (c.flush_req) ucp_request_free(c.flush_req);  // UCX releases it when it completes
    c.flush_req = nullptr;
  }

  void post(Conn& c, std::unique_ptr<SendOp> s, uint16_t am_id) {
    if (c.dead) return;
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
    if (!settle(c)) {
      // A client may send GET the moment it is connected, before wireup has finished.
      p.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_AM_SEND_FLAG_EAGER;
    }
    p.cb.send = &Completion::on_send;
    p.user_data = &s->done;
    const void* buf = nullptr;
    std::size_t count = 0;
    if (s->iov.size() == 1) {
      p.datatype = ucp_dt_make_contig(1);
      buf = s->iov[0].buffer;
      count = s->iov[0].length;
    } else if (s->iov.size() > 1) {
      p.datatype = ucp_dt_make_iov();
      buf = s->iov.data();
      count = s->iov.size();
    } else {
      p.datatype = ucp_dt_make_contig(1);
    }
    ucs_status_ptr_t ret = ucp_am_send_nbx(c.ep, am_id, s->header.data(), s->header.size(), buf, count, &p);
    if (UCS_PTR_IS_ERR(ret)) {
      c.dead = true;
      return;
    }
    if (ret == nullptr) return;  // completed in place; `s` (and its pins) go now
    s->done.req = ret;
    s->bytes = s->header.size();
    for (const auto& v : s->iov) s->bytes += v.length;
    c.send_bytes += s->bytes;
    if (c.send_bytes > ctx_.config.max_reply_bytes_per_connection && !c.dead) {
      Counters::inc(ctx_.counters.reply_limit_closes);  // a peer that does not take its replies
      c.dead = true;
    }
    ++c.sends;
    sends_.push_back(std::move(s));
  }

  void finish_send(SendOp& s) {
    if (s.done.req) ucp_request_free(s.done.req);
    auto it = conns_.find(s.ep);
    if (it == conns_.end()) return;
    --it->second->sends;
    it->second->send_bytes -= s.bytes;
    it->second->last_activity = Clock::now();
    if (s.done.status != UCS_OK) it->second->dead = true;
  }

  void shutdown() {
    listener_.reset();
    for (auto& [ep, c] : conns_) c->dead = true;
    std::vector<ucp_ep_h> eps;
    for (auto& [ep, c] : conns_) eps.push_back(ep);
    // Outstanding receives and sends complete (with errors) once their endpoints are closed.
    for (ucp_ep_h ep : eps) {
      auto it = conns_.find(ep);
      forget_flush(*it->second);
      for (auto& in : it->second->inbox) release(in);
      it->second->inbox.clear();
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
      ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &p);
      if (r && !UCS_PTR_IS_ERR(r)) closing_.push_back(r);
    }
    const auto dl = Clock::now() + std::chrono::milliseconds(500);
    auto pending = [&] {
      for (auto& [ep, c] : conns_) {
        if (c->active && !c->active->settled()) return true;
      }
      for (auto& s : sends_) {
        if (!s->done.done) return true;
      }
      for (void* r : closing_) {
        if (ucp_request_check_status(r) == UCS_INPROGRESS) return true;
      }
      for (auto& z : zombies_) {
        if (z->active && !z->active->settled()) return true;
      }
      return false;
    };
    while (pending() && Clock::now() < dl) {
      if (!worker_->progress_all()) worker_->wait_event(5);
    }
    for (void* d : stray_) ucp_am_data_release(worker_->get(), d);
    stray_.clear();
    for (auto& s : sends_) {
      if (s->done.done && s->done.req) ucp_request_free(s->done.req);
    }
    for (auto& [ep, c] : conns_) {
      if (c->active && c->active->settled()) c->active->free_requests();
    }
    for (void* r : closing_) {
      if (ucp_request_check_status(r) != UCS_INPROGRESS) ucp_request_free(r);
    }
    closing_.clear();
    ctx_.counters.connections_current.fetch_sub(conns_.size(), std::memory_order_relaxed);
    reap_zombies();
    worker_.reset();  // cancels whatever is left; only then may the buffers go
    sends_.clear();
    conns_.clear();
    zombies_.clear();
  }

  ServerContext& ctx_;
  const proto::Limits& limits_;
  std::shared_ptr<Context> uctx_;
  // Records UCX may still complete into are declared before the worker, so the worker
  // (destroyed first) has cancelled them by the time they go.
  std::list<std::unique_ptr<SendOp>> sends_;
  std::unique_ptr<uint8_t[]> drain_;  // kDrainBytes, allocated on first use (see kDrainBytes)
  std::unordered_map<ucp_ep_h, std::unique_ptr<Conn>> conns_;
  std::list<std::unique_ptr<Conn>> zombies_;  // closed, waiting for an in-flight receive to end
  std::unique_ptr<Worker> worker_;
  std::unique_ptr<Listener> listener_;
  std::deque<ucp_conn_request_h> conn_reqs_;
  std::vector<ucp_ep_h> errored_;
  std::vector<void*> stray_;
  std::vector<void*> closing_;
  std::size_t actives_ = 0;
  int64_t idle_ns_ = static_cast<int64_t>(ctx_.config.idle_timeout_s * 1e9);
  int64_t auth_ns_ = static_cast<int64_t>(ctx_.config.auth_timeout_s * 1e9);
  // MEMBRAIN_UCX_SERVER_SPIN=1: keep polling while transfers are in flight instead of sleeping
  // on the event fd (lower latency when cores are plentiful; contention on small machines).
  bool spin_ = [] {
    const char* v = std::getenv("MEMBRAIN_UCX_SERVER_SPIN");
    return v && *v && *v != '0';
  }();
  uint16_t port_ = 0;
  int stop_fd_ = -1;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace

std::unique_ptr<UcxListener> UcxListener::start(ServerContext& ctx, const std::string& host, uint16_t port) {
  return std::make_unique<Impl>(ctx, host, port);
}

}  // namespace membrain::server
