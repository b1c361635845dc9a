#include "transport/ucx/ucx_connection.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>

#include <sys/socket.h>

#include "common/unwind_guard.h"

namespace membrain::ucx {

using proto::Header;
using proto::Op;

namespace {
constexpr uint64_t kMaxSmallReply = 64ull << 20;  // STATS JSON and the like
// AM header budget when the transport does not report one.
constexpr std::size_t kDefaultAmCap = 4096;
}  // namespace

struct UcxConnection::Incoming {
  bool arrived = false;
  std::vector<uint8_t> header;  // AM header: frame header + extension (GET item table)
  void* data = nullptr;         // eager bytes (held or copied) or the rendezvous descriptor
  std::size_t len = 0;
  bool rndv = false;          // data is a rendezvous descriptor not yet received
  bool held = false;          // data is a UCX-owned eager buffer to release
  std::vector<uint8_t> copy;  // eager bytes copied out of the callback
  std::vector<void*> stray;   // descriptors of unexpected AMs, released outside the callback
  struct Piece {              // a value AM (split GET reply)
    std::vector<uint8_t> header;
    void* data = nullptr;
    std::size_t len = 0;
    bool rndv = false, held = false;
    std::vector<uint8_t> copy;
  };
  std::deque<Piece> pieces;
  std::string error;  // protocol violation seen in the callback
};

UcxConnection::UcxConnection(Options options) : opts_(std::move(options)), in_(std::make_unique<Incoming>()) {
  // Latency over CPU: poll the worker without ever sleeping on its event fd.
  const char* bp = std::getenv("MEMBRAIN_UCX_BUSY_POLL");
  busy_poll_ = bp && *bp && *bp != '0';
  const auto dl = Clock::now() + std::chrono::milliseconds(std::max(1, opts_.connect_timeout_ms));
  const std::string where = "ucx://" + opts_.host + ":" + std::to_string(opts_.port);
  try {
    ctx_ = Context::client_shared();
    worker_ = std::make_unique<Worker>(ctx_);
    worker_->register_am(kAmReply, &UcxConnection::on_reply, this);
    worker_->register_am(kAmValue, &UcxConnection::on_value, this);
    am_cap_ = worker_->max_am_header() ? worker_->max_am_header() : kDefaultAmCap;
    sockaddr_storage ss{};
    const std::size_t len = resolve_sockaddr(opts_.host, opts_.port, &ss);
    ucp_ep_params_t p{};
    p.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                   UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
    p.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    p.sockaddr.addr = reinterpret_cast<const sockaddr*>(&ss);
    p.sockaddr.addrlen = static_cast<socklen_t>(len);
    p.err_mode = err_mode_from_env();
    p.err_handler.cb = &UcxConnection::on_ep_error;
    p.err_handler.arg = this;
    ucp_ep_h ep = nullptr;
    const ucs_status_t st = ucp_ep_create(worker_->get(), &p, &ep);
    if (st != UCS_OK) throw UcxError("ucp_ep_create", st);
    ep_ = Endpoint(worker_.get(), ep);
  } catch (const UcxError& e) {
    broken_ = true;
    throw TransportError(where + ": " + e.what());
  }
  hello(dl);
  // No value may travel by rendezvous before wireup has settled (see Endpoint::flush).
  std::lock_guard<std::mutex> lock(mu_);
  const ucs_status_t st = ep_.flush(dl);
  if (st != UCS_OK) {
    broken_ = true;
    throw TransportError(where + ": endpoint did not settle after HELLO: " + ucs_status_string(st));
  }
}

std::string UcxConnection::transport_info() {
  std::lock_guard<std::mutex> lock(mu_);
  check_usable();
  char* text = nullptr;
  std::size_t len = 0;
  FILE* f = ::open_memstream(&text, &len);
  if (!f) return {};
  ucp_ep_print_info(ep_.get(), f);
  std::fclose(f);
  std::string out(text ? text : "", len);
  std::free(text);
  return out;
}

UcxConnection::~UcxConnection() {
  std::lock_guard<std::mutex> lock(mu_);
  release_incoming();
  if (ep_) ep_.close(broken_.load(), 100);
}

void UcxConnection::close() {
  std::lock_guard<std::mutex> lock(mu_);
  release_incoming();
  if (ep_) ep_.close(broken_.load(), 100);
}

void UcxConnection::check_usable() {
  if (broken_ || !ep_) {
    throw TransportError("ucx://" + opts_.host + ":" + std::to_string(opts_.port) + ": connection is closed");
  }
}

void UcxConnection::fail(const std::string& what) {
  broken_ = true;
  abort_inflight();
  throw TransportError("ucx://" + opts_.host + ":" + std::to_string(opts_.port) + ": " + what);
}

void UcxConnection::break_stream() {
  if (broken_.exchange(true)) return;  // fail() got here first and already aborted
  abort_inflight();
}

void UcxConnection::abort_inflight() {
  release_incoming();
  if (ep_) ep_.close(true, 100);  // force: outstanding requests complete with an error
  // Give them a moment to complete so no receive into a caller's buffer outlives the call.
  const auto dl = Clock::now() + std::chrono::milliseconds(300);
  auto pending = [&] {
    for (auto& o : graveyard_) {
      if (!o->done) return true;
    }
    return false;
  };
  while (pending() && Clock::now() < dl) {
    if (!worker_->progress_all()) worker_->wait_event(5);
  }
  for (auto it = graveyard_.begin(); it != graveyard_.end();) {
    if ((*it)->done) {
      if ((*it)->req) ucp_request_free((*it)->req);
      it = graveyard_.erase(it);
    } else {
      ++it;
    }
  }
}

ucs_status_t UcxConnection::on_reply(void* arg, const void* header, size_t header_len, void* data, size_t len,
                                     const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxConnection*>(arg);
  Incoming& in = *self->in_;
  const bool rndv = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
  const bool persistent = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA;
  if (in.arrived || self->expect_id_ == ~uint64_t{0}) {
    in.error = "unexpected reply from server";
    if (rndv || persistent) in.stray.push_back(data);
    return (rndv || persistent) ? UCS_INPROGRESS : UCS_OK;
  }
  in.arrived = true;
  in.header.assign(static_cast<const uint8_t*>(header), static_cast<const uint8_t*>(header) + header_len);
  in.len = len;
  if (rndv) {
    in.rndv = true;
    in.data = data;
    return UCS_INPROGRESS;  // keeps the descriptor for ucp_am_recv_data_nbx / ucp_am_data_release
  }
  if (persistent) {
    in.held = true;
    in.data = data;
    return UCS_INPROGRESS;
  }
  in.copy.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + len);
  in.data = in.copy.data();
  return UCS_OK;
}

ucs_status_t UcxConnection::on_value(void* arg, const void* header, size_t header_len, void* data, size_t len,
                                     const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxConnection*>(arg);
  Incoming::Piece pc;
  pc.header.assign(static_cast<const uint8_t*>(header), static_cast<const uint8_t*>(header) + header_len);
  pc.len = len;
  pc.data = data;
  const bool rndv = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
  const bool persistent = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA;
  if (rndv) {
    pc.rndv = true;
  } else if (persistent) {
    pc.held = true;
  } else {
    pc.copy.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + len);
    pc.data = pc.copy.data();
  }
  self->in_->pieces.push_back(std::move(pc));
  return (rndv || persistent) ? UCS_INPROGRESS : UCS_OK;
}

void UcxConnection::wait_until(const std::function<bool()>& ready, Clock::time_point dl) {
  while (!ready()) {
    if (!in_->error.empty()) fail(in_->error);
    if (ep_status_ != UCS_OK) fail(std::string("connection lost: ") + ucs_status_string(ep_status_));
    if (worker_->progress_all()) continue;
    if (ready()) break;
    if (Clock::now() >= dl) fail("timed out");
    if (!busy_poll_) worker_->wait_event(std::max(1, ms_until(dl, 100)));
  }
}

std::vector<UcxConnection::Req*> UcxConnection::send_values(
    uint64_t request_id, const std::vector<std::pair<uint32_t, ConstSpan>>& values,
    std::vector<std::vector<uint8_t>>* headers) {
  std::vector<Req*> out;
  headers->reserve(values.size());  // stable addresses: UCX may read a header until completion
  for (const auto& [index, v] : values) {
    headers->emplace_back(kValueHeaderBytes);
    proto::put_u64(headers->back().data(), request_id);
    proto::put_u32(headers->back().data() + 8, index);
    graveyard_.push_back(std::make_unique<Req>());
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS |
                     UCP_OP_ATTR_FIELD_DATATYPE;
    p.cb.send = &Completion::on_send;
    p.user_data = graveyard_.back().get();
    p.flags = UCP_AM_SEND_FLAG_REPLY;
    p.datatype = ucp_dt_make_contig(1);
    ucs_status_ptr_t r =
        ucp_am_send_nbx(ep_.get(), kAmValue, headers->back().data(), kValueHeaderBytes, v.data, v.size, &p);
    Req* op = track(r, "ucp_am_send_nbx (value)");
    if (op) {
      out.push_back(op);
    } else {
      graveyard_.pop_back();
    }
  }
  return out;
}

void UcxConnection::recv_split(uint64_t request_id, const std::vector<std::pair<uint32_t, ConstSpan>>& dests,
                               Clock::time_point dl) {
  std::vector<Req*> ops;
  for (const auto& [index, d] : dests) {
    wait_until([&] { return !in_->pieces.empty(); }, dl);
    Incoming::Piece pc = std::move(in_->pieces.front());
    in_->pieces.pop_front();
    const bool ok = pc.header.size() == kValueHeaderBytes && proto::get_u64(pc.header.data()) == request_id &&
                    proto::get_u32(pc.header.data() + 8) == index && pc.len == d.size;
    if (!ok || !pc.rndv) {
      if (ok) std::memcpy(const_cast<uint8_t*>(d.data), pc.data, d.size);
      if (pc.held || pc.rndv) ucp_am_data_release(worker_->get(), pc.data);
      if (!ok) fail("value AM does not match the GET reply's item table");
      continue;
    }
    graveyard_.push_back(std::make_unique<Req>());
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
    p.cb.recv_am = &Completion::on_recv;
    p.user_data = graveyard_.back().get();
    p.datatype = ucp_dt_make_contig(1);
    ucs_status_ptr_t r =
        ucp_am_recv_data_nbx(worker_->get(), pc.data, const_cast<uint8_t*>(d.data), d.size, &p);
    Req* op = track(r, "ucp_am_recv_data_nbx (value)");
    if (op) {
      ops.push_back(op);
    } else {
      graveyard_.pop_back();
    }
  }
  for (Req* op : ops) wait_op(op, dl);
}

void UcxConnection::on_ep_error(void* arg, ucp_ep_h, ucs_status_t status) {
  static_cast<UcxConnection*>(arg)->ep_status_ = status;
}

void UcxConnection::release_incoming() {
  Incoming& in = *in_;
  if (worker_) {
    if ((in.held || in.rndv) && in.data) ucp_am_data_release(worker_->get(), in.data);
    for (void* d : in.stray) ucp_am_data_release(worker_->get(), d);
    for (auto& pc : in.pieces) {
      if (pc.held || pc.rndv) ucp_am_data_release(worker_->get(), pc.data);
    }
  }
  in.pieces.clear();
  in.stray.clear();
  in.arrived = in.held = in.rndv = false;
  in.data = nullptr;
  in.len = 0;
  in.copy.clear();
  in.header.clear();
}

UcxConnection::Req* UcxConnection::track(ucs_status_ptr_t req, const char* what) {
  if (req == nullptr) return nullptr;  // completed in place
  if (UCS_PTR_IS_ERR(req)) {
    // The record (already in graveyard_) will never be completed: mark it so.
    graveyard_.back()->done = true;
    graveyard_.back()->req = nullptr;
    fail(std::string(what) + ": " + ucs_status_string(UCS_PTR_STATUS(req)));
  }
  Req* op = graveyard_.back().get();
  op->req = req;
  return op;
}

void UcxConnection::finish_op(Req* op) {
  for (auto it = graveyard_.begin(); it != graveyard_.end(); ++it) {
    if (it->get() == op) {
      if (op->req) ucp_request_free(op->req);
      graveyard_.erase(it);
      return;
    }
  }
}

void UcxConnection::wait_op(Req* op, Clock::time_point dl) {
  if (!op) return;
  while (!op->done) {
    if (ep_status_ != UCS_OK) fail(std::string("connection lost: ") + ucs_status_string(ep_status_));
    if (worker_->progress_all()) continue;
    if (op->done) break;
    if (Clock::now() >= dl) fail("timed out");
    if (!busy_poll_) worker_->wait_event(std::max(1, ms_until(dl, 100)));
  }
  const ucs_status_t st = op->status;
  finish_op(op);
  if (st != UCS_OK) fail(std::string("transfer failed: ") + ucs_status_string(st));
}

void UcxConnection::send_and_wait(const std::vector<uint8_t>& am_header, const std::vector<ConstSpan>& data,
                                  Clock::time_point dl,
                                  const std::vector<std::pair<uint32_t, ConstSpan>>* split,
                                  uint64_t request_id) {
  check_usable();
  release_incoming();
  std::vector<ucp_dt_iov_t> iov;
  for (const auto& s : data) {
    if (s.size) iov.push_back({const_cast<uint8_t*>(s.data), s.size});
  }
  graveyard_.push_back(std::make_unique<Req>());
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS |
                   UCP_OP_ATTR_FIELD_DATATYPE;
  p.cb.send = &Completion::on_send;
  p.user_data = graveyard_.back().get();
  p.flags = UCP_AM_SEND_FLAG_REPLY;
  const void* buf = nullptr;
  std::size_t count = 0;
  if (iov.size() == 1) {
    p.datatype = ucp_dt_make_contig(1);
    buf = iov[0].buffer;
    count = iov[0].length;
  } else if (iov.size() > 1) {
    p.datatype = ucp_dt_make_iov();
    buf = iov.data();
    count = iov.size();
  } else {
    p.datatype = ucp_dt_make_contig(1);
  }
  ucs_status_ptr_t r =
      ucp_am_send_nbx(ep_.get(), kAmRequest, am_header.data(), am_header.size(), buf, count, &p);
  Req* op = track(r, "ucp_am_send_nbx");
  if (!op) {
    graveyard_.pop_back();
  }
  std::vector<std::vector<uint8_t>> value_headers;
  std::vector<Req*> value_ops;
  if (split) value_ops = send_values(request_id, *split, &value_headers);
  auto sent = [&] {
    for (Req* v : value_ops) {
      if (!v->done) return false;
    }
    return true;
  };
  // Wait for the reply; the send (rendezvous: the server pulling our values) completes first.
  while (!in_->arrived || (op && !op->done) || !sent()) {
    if (!in_->error.empty()) fail(in_->error);
    if (ep_status_ != UCS_OK && !in_->arrived)
      fail(std::string("connection lost: ") + ucs_status_string(ep_status_));
    if (worker_->progress_all()) continue;
    if (in_->arrived && (!op || op->done) && sent()) break;
    if (Clock::now() >= dl) fail("timed out");
    if (!busy_poll_) worker_->wait_event(std::max(1, ms_until(dl, 100)));
  }
  value_ops.push_back(op);
  for (Req* v : value_ops) {
    if (!v) continue;
    const ucs_status_t st = v->status;
    finish_op(v);
    if (st != UCS_OK) fail(std::string("send failed: ") + ucs_status_string(st));
  }
}

void UcxConnection::recv_data(std::vector<ConstSpan> dests, Clock::time_point dl) {
  Incoming& in = *in_;
  if (!in.rndv) {
    const uint8_t* src = static_cast<const uint8_t*>(in.data);
    for (const auto& d : dests) {
      if (d.size) std::memcpy(const_cast<uint8_t*>(d.data), src, d.size);
      src += d.size;
    }
    return;
  }
  std::vector<ucp_dt_iov_t> iov;
  for (const auto& d : dests) {
    if (d.size) iov.push_back({const_cast<uint8_t*>(d.data), d.size});
  }
  graveyard_.push_back(std::make_unique<Req>());
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
  p.cb.recv_am = &Completion::on_recv;
  p.user_data = graveyard_.back().get();
  void* buf;
  std::size_t count;
  if (iov.size() == 1) {
    p.datatype = ucp_dt_make_contig(1);
    buf = iov[0].buffer;
    count = iov[0].length;
  } else {
    p.datatype = ucp_dt_make_iov();
    buf = iov.data();
    count = iov.size();
  }
  void* desc = in.data;
  in.rndv = false;  // UCP owns the descriptor from here on, whatever happens
  in.data = nullptr;
  ucs_status_ptr_t r = ucp_am_recv_data_nbx(worker_->get(), desc, buf, count, &p);
  Req* op = track(r, "ucp_am_recv_data_nbx");
  if (!op) {
    graveyard_.pop_back();
    return;
  }
  wait_op(op, dl);
}

Header UcxConnection::check_reply(uint8_t op, uint64_t request_id, std::size_t ext_len) {
  const Incoming& in = *in_;
  if (in.header.size() < proto::kHeaderBytes) fail("reply AM header too short");
  Header h;
  if (auto why = check_reply_header(in.header.data(), op, request_id, &h); !why.empty()) fail(why);
  if (in.header.size() != proto::kHeaderBytes + ext_len) fail("reply AM header has an unexpected length");
  const bool split_get = op == static_cast<uint8_t>(Op::kGet) && in.len == 0;  // values follow as value AMs
  if (!split_get && h.payload_len != ext_len + in.len)
    fail("reply payload_len does not match the bytes carried");
  return h;
}

std::vector<uint8_t> UcxConnection::reply_body(Clock::time_point dl) {
  if (in_->len > kMaxSmallReply)
    fail("reply payload of " + std::to_string(in_->len) + " bytes is implausible");
  std::vector<uint8_t> out(in_->len);
  recv_data({{out.data(), out.size()}}, dl);
  release_incoming();
  return out;
}

uint64_t UcxConnection::send_request(Op op, uint32_t count, const std::vector<uint8_t>& payload,
                                     Clock::time_point dl) {
  const Header h = request_header(op, next_id_++, count, payload.size());
  std::vector<uint8_t> hdr(proto::kHeaderBytes);
  proto::encode_header(h, hdr.data());
  expect_id_ = h.request_id;
  send_and_wait(hdr, {{payload.data(), payload.size()}}, dl);
  return h.request_id;
}

std::vector<uint8_t> UcxConnection::simple_call(Op op, uint32_t count, const std::vector<uint8_t>& payload,
                                                Clock::time_point dl) {
  const uint64_t request_id = send_request(op, count, payload, dl);
  check_reply(static_cast<uint8_t>(op), request_id, 0);
  return reply_body(dl);
}

void UcxConnection::hello(Clock::time_point dl) {
  const auto payload = hello_payload(opts_.ns, opts_.auth_token.value_or(""));
  std::lock_guard<std::mutex> lock(mu_);
  const auto reply = simple_call(Op::kHello, 0, payload, dl);
  if (auto why = parse_hello_reply(reply, &limits_); !why.empty()) fail(why);
}

std::vector<std::pair<std::size_t, std::size_t>> UcxConnection::chunks(
    const std::vector<std::string_view>& keys, const std::vector<std::size_t>* value_sizes,
    std::size_t per_item, std::size_t per_item_header) const {
  // per_item_header: AM header bytes per item besides its key (PUT: table row + key; GET:
  // the reply's table row). 0 = the frame's items do not travel in an AM header.
  // A PUT frame's values arrive by rendezvous: the server reserves all of them when the frame
  // comes in, within its per-connection budget of pending bytes (by default the largest value,
  // --max-pending-put-bytes-per-connection), and refuses the items beyond it. A frame that
  // carries at most max_value_bytes of values stays within that default budget.
  std::vector<std::pair<std::size_t, std::size_t>> out;
  std::size_t begin = 0;
  uint64_t bytes = 0, values = 0, hdr = proto::kHeaderBytes;
  const bool keys_in_header = per_item_header == proto::kPutItemBytes && value_sizes != nullptr;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const uint64_t value = value_sizes ? (*value_sizes)[i] : 0;
    const uint64_t item = per_item + keys[i].size() + value;
    const uint64_t item_hdr = per_item_header ? per_item_header + (keys_in_header ? keys[i].size() : 0) : 0;
    const bool full = (i - begin) >= limits_.max_batch ||
                      (i > begin && bytes + item > limits_.max_payload_bytes) ||
                      (i > begin && values + value > limits_.max_value_bytes) ||
                      (i > begin && item_hdr && hdr + item_hdr > am_cap_);
    if (full) {
      out.emplace_back(begin, i);
      begin = i;
      bytes = 0;
      values = 0;
      hdr = proto::kHeaderBytes;
    }
    bytes += item;
    values += value;
    hdr += item_hdr;
  }
  if (begin < keys.size()) out.emplace_back(begin, keys.size());
  return out;
}

std::vector<uint8_t> UcxConnection::put(const std::vector<std::string_view>& keys,
                                        const std::vector<ConstSpan>& values, int timeout_ms) {
  const PutPlan plan = plan_put(keys, values, limits_);
  std::lock_guard<std::mutex> lock(mu_);
  UnwindGuard guard([this] { break_stream(); });
  const auto dl = Clock::now() + std::chrono::milliseconds(timeout_ms);
  std::vector<uint8_t> status = put_statuses(keys.size());
  std::vector<uint8_t> meta;
  std::vector<ConstSpan> data;
  for (const auto& [b, e] : chunks(plan.keys, &plan.sizes, proto::kPutItemBytes, proto::kPutItemBytes)) {
    const uint64_t request_id = next_id_++;
    // AM header: frame header, item table, keys. AM data: the values, from the caller's memory;
    // past kInlineValueBytes they travel as one value AM each instead.
    const bool split = encode_put_meta(plan, b, e, request_id, &meta) > kInlineValueBytes;
    data.clear();
    std::vector<std::pair<uint32_t, ConstSpan>> split_values;
    for (std::size_t j = b; j < e; ++j) {
      const ConstSpan& v = plan.values[j];
      if (!split) {
        data.push_back(v);
      } else if (v.size) {
        split_values.emplace_back(static_cast<uint32_t>(j - b), v);
      }
    }
    expect_id_ = request_id;
    send_and_wait(meta, data, dl, split ? &split_values : nullptr, request_id);
    check_reply(static_cast<uint8_t>(Op::kPut), request_id, 0);
    const auto st = reply_body(dl);
    if (auto why = check_status_count(Op::kPut, st.size(), e - b); !why.empty()) fail(why);
    for (std::size_t j = b; j < e; ++j) status[plan.index[j]] = st[j - b];
  }
  return status;
}

std::vector<uint8_t> UcxConnection::get_with(const std::vector<std::string_view>& keys, const Placer& placer,
                                             int timeout_ms, std::vector<uint64_t>* lengths) {
  validate_keys(keys, limits_.max_key_len);
  std::lock_guard<std::mutex> lock(mu_);
  UnwindGuard guard([this] { break_stream(); });
  const auto dl = Clock::now() + std::chrono::milliseconds(timeout_ms);
  std::vector<uint8_t> status = get_statuses(keys.size(), lengths);
  std::vector<uint8_t> scratch;
  GetFrame f;
  for (const auto& [b, e] : chunks(keys, nullptr, 2, proto::kGetItemBytes)) {
    const uint32_t n = static_cast<uint32_t>(e - b);
    const uint64_t request_id = send_request(Op::kGet, n, key_list_payload(keys, b, e), dl);
    // Reply: AM header = frame header + item table; AM data = the hits' values.
    const Header r =
        check_reply(static_cast<uint8_t>(Op::kGet), request_id, uint64_t(proto::kGetItemBytes) * n);
    if (auto why = check_get_reply(r, n); !why.empty()) fail(why);
    const uint8_t* table = in_->header.data() + proto::kHeaderBytes;
    // With the values inline, check_reply has matched payload_len to the bytes carried, so
    // this also proves they are exactly the hits' values.
    if (auto why = parse_get_table(r, table, n, b, limits_.max_value_bytes, &f); !why.empty()) fail(why);
    const bool split = in_->len == 0 && f.value_bytes > 0;  // values follow as value AMs
    place_values(placer, &f);
    std::vector<ConstSpan> spans;
    uint64_t drain = 0;
    for (uint32_t j = 0; j < n; ++j) {
      if (f.length[j] && !f.dest[j]) drain = std::max(drain, f.length[j]);
    }
    if (drain > scratch.size()) scratch.resize(drain);  // values we must consume but not keep
    std::vector<std::pair<uint32_t, ConstSpan>> split_dests;
    for (uint32_t j = 0; j < n; ++j) {
      if (f.length[j] == 0) continue;
      spans.push_back({f.dest[j] ? f.dest[j] : scratch.data(), f.length[j]});
      split_dests.emplace_back(j, spans.back());
    }
    if (split) {
      recv_split(request_id, split_dests, dl);
    } else if (!spans.empty()) {
      recv_data(std::move(spans), dl);
    }
    release_incoming();
    settle_values(f, 0, n, &status, lengths);
  }
  return status;
}

std::vector<uint8_t> UcxConnection::get_into(const std::vector<std::string_view>& keys,
                                             const std::vector<MutSpan>& buffers, int timeout_ms,
                                             std::vector<uint64_t>* lengths) {
  return get_with(keys, buffer_placer(keys, buffers), timeout_ms, lengths);
}

template <class Result>
Result UcxConnection::run_key_list(Result (*op)(const KeyListCall&),
                                   const std::vector<std::string_view>& keys, int timeout_ms) {
  validate_keys(keys, limits_.max_key_len);
  std::lock_guard<std::mutex> lock(mu_);
  const auto dl = Clock::now() + std::chrono::milliseconds(timeout_ms);
  return op({keys, chunks(keys, nullptr, 2, 0),
             [this, dl](Op o, uint32_t n, const std::vector<uint8_t>& payload) {
               return simple_call(o, n, payload, dl);
             },
             [this](const std::string& why) { fail(why); }});
}

std::vector<uint8_t> UcxConnection::exists(const std::vector<std::string_view>& keys, int timeout_ms) {
  return run_key_list(exists_in_chunks, keys, timeout_ms);
}

uint32_t UcxConnection::lookup_prefix(const std::vector<std::string_view>& keys, int timeout_ms) {
  return run_key_list(lookup_prefix_in_chunks, keys, timeout_ms);
}

uint32_t UcxConnection::del(const std::vector<std::string_view>& keys, int timeout_ms) {
  return run_key_list(delete_in_chunks, keys, timeout_ms);
}

std::string UcxConnection::stats(int timeout_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto dl = Clock::now() + std::chrono::milliseconds(timeout_ms);
  const auto r = simple_call(Op::kStats, 0, {}, dl);
  return std::string(r.begin(), r.end());
}

double UcxConnection::ping(int timeout_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto dl = Clock::now() + std::chrono::milliseconds(timeout_ms);
  const auto t0 = Clock::now();
  std::vector<uint8_t> payload(8);
  proto::put_u64(payload.data(), next_id_);
  const auto r = simple_call(Op::kPing, 0, payload, dl);
  if (r != payload) fail("PING echo does not match");
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::vector<uint8_t> UcxConnection::raw_call(const std::vector<uint8_t>& am_header,
                                             const std::vector<uint8_t>& data, int timeout_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto dl = Clock::now() + std::chrono::milliseconds(timeout_ms);
  expect_id_ = 0;
  send_and_wait(am_header, {{data.data(), data.size()}}, dl);
  std::vector<uint8_t> out = in_->header;
  std::vector<uint8_t> body(in_->len);
  recv_data({{body.data(), body.size()}}, dl);
  release_incoming();
  out.insert(out.end(), body.begin(), body.end());
  return out;
}

}  // namespace membrain::ucx
