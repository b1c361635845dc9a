#include "transport/tcp_connection.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "common/unwind_guard.h"

namespace membrain {

using proto::Header;
using proto::Op;

namespace {

constexpr std::size_t kIovBatch = IOV_MAX;  // the most iovecs one sendmsg/recvmsg accepts
constexpr std::size_t kDrainBytes = 256 << 10;
// Replies other than GET are tiny (statuses, counts, stats JSON); anything larger is a
// corrupted or hostile stream and we refuse to allocate for it.
constexpr uint64_t kMaxSmallReply = 64ull << 20;
constexpr int kWantSendBuffer = 4 << 20;
// PUT frames are cut once they carry this many value bytes (see put()); small enough that
// hashing one frame hides behind the transfer of the previous one, large enough that the
// per-frame header, reply and server bookkeeping stay negligible.
constexpr uint64_t kPutFrameBytes = 1 << 20;
// Replies of pipelined PUT frames are collected once this many are outstanding, so the
// server's reply backlog (and our receive buffer) stays small however large the batch.
constexpr std::size_t kMaxPutFramesInFlight = 32;
// GET values are received and verified in groups of about this many bytes (see get_with()).
constexpr uint64_t kVerifyGroupBytes = 256 << 10;

// PUT streams MiB-sized values and stalls on the default 16 KiB-4 MiB send-buffer autotuning
// ramp, so the send buffer is fixed at 4 MiB when the system allows it (setting SO_SNDBUF
// turns autotuning off; a clamped smaller size would do worse than autotuning). The receive
// buffer is left to autotuning (up to tcp_rmem[2]): interleaved A/B runs of 16 x 1 MiB GET on
// loopback gave a median 0.85 of the iperf3 limit with a fixed 4 MiB SO_RCVBUF against 1.01
// with autotuning (1 connection, 9 rounds), 0.84 against 0.88 (4 connections, 7 rounds).
int allowed_socket_buffer(const char* path) {
  std::ifstream f(path);
  long v = 0;
  if (f >> v) return static_cast<int>(std::min<long>(v, INT_MAX));
  return 0;
}

void set_socket_options(int fd) {
  const int one = 1;
  // Requests are written in one go and the reply is awaited: Nagle would only add latency.
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  static const int wmax = allowed_socket_buffer("/proc/sys/net/core/wmem_max");
  if (wmax >= kWantSendBuffer) ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &kWantSendBuffer, sizeof(int));
}

std::string errno_text(int err) {
  return std::string(std::strerror(err));
}

using Clock = std::chrono::steady_clock;
double since(Clock::time_point& t) {
  const auto now = Clock::now();
  const double s = std::chrono::duration<double>(now - t).count();
  t = now;
  return s;
}

}  // namespace

TcpConnection::TcpConnection(Options options) : opts_(std::move(options)) {
  if (!proto::valid_namespace(opts_.ns, limits_)) {
    throw std::invalid_argument("namespace must be 1..64 bytes of [A-Za-z0-9._-], got '" + opts_.ns + "'");
  }
  if (opts_.auth_token && opts_.auth_token->size() > 0xFFFF)
    throw std::invalid_argument("auth token too long");
  connect_socket();
  hello();
}

void TcpConnection::fail(const std::string& what) {
  broken_ = true;
  fd_.reset();
  throw TransportError(opts_.host + ":" + std::to_string(opts_.port) + ": " + what);
}

void TcpConnection::break_stream() {
  broken_ = true;
  fd_.reset();
}

void TcpConnection::close() {
  std::lock_guard<std::mutex> lock(mu_);
  broken_ = true;
  fd_.reset();
}

void TcpConnection::check_usable() {
  if (broken_ || !fd_)
    throw TransportError(opts_.host + ":" + std::to_string(opts_.port) + ": connection is closed");
}

void TcpConnection::connect_socket() {
  Deadline dl(opts_.connect_timeout_ms);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(opts_.port);
  const int rc = ::getaddrinfo(opts_.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) {
    broken_ = true;
    throw TransportError("cannot resolve " + opts_.host + ": " + ::gai_strerror(rc));
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard(res, &::freeaddrinfo);
  std::string last_error = "no addresses";
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    UniqueFd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
    if (!fd) {
      last_error = errno_text(errno);
      continue;
    }
    set_socket_options(fd.get());
    if (::connect(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
      if (errno != EINPROGRESS) {
        last_error = errno_text(errno);
        continue;
      }
      pollfd p{fd.get(), POLLOUT, 0};
      int prc;
      do {
        prc = ::poll(&p, 1, dl.remaining_ms());
      } while (prc < 0 && errno == EINTR);
      if (prc == 0) {
        last_error = "connect timed out after " + std::to_string(opts_.connect_timeout_ms) + " ms";
        break;  // the deadline is spent; other addresses would not get a chance anyway
      }
      int err = 0;
      socklen_t len = sizeof(err);
      ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
      if (prc < 0 || err != 0) {
        last_error = errno_text(prc < 0 ? errno : err);
        continue;
      }
    }
    fd_ = std::move(fd);
    return;
  }
  broken_ = true;
  throw TransportError("cannot connect to " + opts_.host + ":" + port + ": " + last_error);
}

void TcpConnection::hello() {
  Deadline dl(opts_.connect_timeout_ms);
  const auto payload = hello_payload(opts_.ns, opts_.auth_token.value_or(""));
  const auto reply = simple_call(Op::kHello, 0, payload, dl);
  if (auto why = parse_hello_reply(reply, &limits_); !why.empty()) fail(why);
}

// Microseconds to poll for a reply before sleeping in poll(); MEMBRAIN_TCP_SPIN_US, 0 = never.
// A thread that sleeps for a 100 us round trip often loses its (virtual) CPU: on the 2-vCPU
// VM here, LOOKUP_PREFIX of 64 keys had p50 0.20 ms and p99 0.3-1.2 ms sleeping, and p50
// 0.11 ms, p99 0.15-0.24 ms spinning up to 300 us first. The spin is bounded per call and
// yields the core on every pass, so a server thread sharing it still runs.
static long reply_spin_us() {
  static const long us = [] {
    const char* v = std::getenv("MEMBRAIN_TCP_SPIN_US");
    return v && *v ? std::clamp(std::atol(v), 0L, 100'000L) : 300L;  // at most 0.1 s
  }();
  return us;
}

void TcpConnection::wait_fd(short events, const Deadline& dl, bool spin) {
  if (spin && reply_spin_us() > 0) {
    const auto until = std::min(Clock::now() + std::chrono::microseconds(reply_spin_us()), dl.at);
    while (Clock::now() < until) {
      pollfd p{fd_.get(), events, 0};
      if (::poll(&p, 1, 0) != 0) return;  // ready, or an error the next syscall reports
      ::sched_yield();
    }
  }
  for (;;) {
    const int ms = dl.remaining_ms();
    if (ms <= 0) fail("timed out");
    pollfd p{fd_.get(), events, 0};
    const int rc = ::poll(&p, 1, ms);
    if (rc > 0) return;  // ready, or an error the next syscall will report
    if (rc < 0 && errno != EINTR) fail("poll: " + errno_text(errno));
  }
}

// Consumes `n` transferred bytes from iov[*i..]: skips whole entries, trims a partial one.
static void advance_iov(iovec* iov, std::size_t iovcnt, std::size_t* i, std::size_t n) {
  while (*i < iovcnt && n >= iov[*i].iov_len) {
    n -= iov[*i].iov_len;
    ++*i;
  }
  if (n > 0) {
    iov[*i].iov_base = static_cast<uint8_t*>(iov[*i].iov_base) + n;
    iov[*i].iov_len -= n;
  }
}

void TcpConnection::send_all(iovec* iov, std::size_t iovcnt, const Deadline& dl) {
  std::size_t i = 0;
  while (i < iovcnt) {
    msghdr msg{};
    msg.msg_iov = iov + i;
    msg.msg_iovlen = std::min(iovcnt - i, kIovBatch);
    // MSG_NOSIGNAL: a peer that went away must surface as an error, not kill the process.
    const ssize_t n = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        wait_fd(POLLOUT, dl);
        continue;
      }
      fail("send: " + errno_text(errno));
    }
    advance_iov(iov, iovcnt, &i, static_cast<std::size_t>(n));
  }
}

void TcpConnection::recv_vec(iovec* iov, std::size_t iovcnt, const Deadline& dl, bool spin) {
  std::size_t i = 0;
  while (i < iovcnt && iov[i].iov_len == 0) ++i;
  while (i < iovcnt) {
    msghdr msg{};
    msg.msg_iov = iov + i;
    msg.msg_iovlen = std::min(iovcnt - i, kIovBatch);
    const ssize_t n = ::recvmsg(fd_.get(), &msg, 0);
    if (n == 0) fail("server closed the connection");
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        wait_fd(POLLIN, dl, spin);
        spin = false;  // only the first wait of a reply: value streams sleep as usual
        continue;
      }
      fail("recv: " + errno_text(errno));
    }
    advance_iov(iov, iovcnt, &i, static_cast<std::size_t>(n));
  }
}

void TcpConnection::recv_exact(uint8_t* dst, std::size_t n, const Deadline& dl, bool spin) {
  iovec iov{dst, n};
  recv_vec(&iov, 1, dl, spin);
}

Header TcpConnection::recv_reply(uint8_t op, uint64_t request_id, const Deadline& dl, bool spin) {
  uint8_t raw[proto::kHeaderBytes];
  recv_exact(raw, sizeof(raw), dl, spin);
  Header h;
  if (auto why = check_reply_header(raw, op, request_id, &h); !why.empty()) fail(why);
  return h;
}

uint64_t TcpConnection::send_request(Op op, uint32_t count, const std::vector<uint8_t>& payload,
                                     const Deadline& dl) {
  check_usable();
  const Header h = request_header(op, next_id_++, count, payload.size());
  uint8_t raw[proto::kHeaderBytes];
  proto::encode_header(h, raw);
  iovec iov[2] = {{raw, sizeof(raw)}, {const_cast<uint8_t*>(payload.data()), payload.size()}};
  send_all(iov, payload.empty() ? 1 : 2, dl);
  return h.request_id;
}

std::vector<uint8_t> TcpConnection::simple_call(Op op, uint32_t count, const std::vector<uint8_t>& payload,
                                                const Deadline& dl, Header* reply_header) {
  const uint64_t request_id = send_request(op, count, payload, dl);
  const Header r = recv_reply(static_cast<uint8_t>(op), request_id, dl);
  if (r.payload_len > kMaxSmallReply)
    fail("reply payload of " + std::to_string(r.payload_len) + " bytes is implausible");
  std::vector<uint8_t> out(r.payload_len);
  if (!out.empty()) recv_exact(out.data(), out.size(), dl);
  if (reply_header) *reply_header = r;
  return out;
}

std::vector<std::pair<std::size_t, std::size_t>> TcpConnection::chunks(
    const std::vector<std::string_view>& keys, const std::vector<std::size_t>* value_sizes,
    std::size_t per_item_overhead, uint64_t target_value_bytes) const {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  std::size_t begin = 0;
  uint64_t bytes = 0, values = 0;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const uint64_t value = value_sizes ? (*value_sizes)[i] : 0;
    const uint64_t item = per_item_overhead + keys[i].size() + value;
    const bool full = (i - begin) >= limits_.max_batch ||
                      (i > begin && bytes + item > limits_.max_payload_bytes) ||
                      (i > begin && values >= target_value_bytes);
    if (full) {
      out.emplace_back(begin, i);
      begin = i;
      bytes = 0;
      values = 0;
    }
    bytes += item;
    values += value;
  }
  if (begin < keys.size()) out.emplace_back(begin, keys.size());
  return out;
}

std::vector<uint8_t> TcpConnection::put(const std::vector<std::string_view>& keys,
                                        const std::vector<ConstSpan>& values, int timeout_ms) {
  const PutPlan plan = plan_put(keys, values, limits_);
  std::lock_guard<std::mutex> lock(mu_);
  UnwindGuard guard([this] { break_stream(); });
  Deadline dl(timeout_ms);
  std::vector<uint8_t> status = put_statuses(keys.size());
  // One frame per ~kPutFrameBytes of values, pipelined: while the kernel's socket buffers and
  // the server drain frame k, this thread hashes frame k+1's values (which also pulls them into
  // cache for the send). One big frame would make the server wait for the whole batch's
  // checksums before the first value byte could leave.
  struct InFlight {
    uint64_t request_id;
    std::size_t begin, end;
  };
  std::deque<InFlight> inflight;
  auto collect_one = [&] {
    const InFlight f = inflight.front();
    inflight.pop_front();
    auto t = Clock::now();
    // No spin: a PUT reply comes only after the server has taken in the frame's values, and a
    // spinning client would take CPU from it when several connections share few cores.
    const Header r = recv_reply(static_cast<uint8_t>(Op::kPut), f.request_id, dl, /*spin=*/false);
    const std::size_t n = f.end - f.begin;
    if (auto why = check_status_count(Op::kPut, r.payload_len, n); !why.empty()) fail(why);
    std::vector<uint8_t> st(n);
    recv_exact(st.data(), n, dl);
    for (std::size_t j = f.begin; j < f.end; ++j) status[plan.index[j]] = st[j - f.begin];
    timings_.wait += since(t);
  };
  std::vector<uint8_t> meta;
  std::vector<iovec> iov;
  for (const auto& [b, e] : chunks(plan.keys, &plan.sizes, proto::kPutItemBytes, kPutFrameBytes)) {
    check_usable();
    if (inflight.size() >= kMaxPutFramesInFlight) collect_one();
    auto t = Clock::now();
    const uint64_t request_id = next_id_++;
    encode_put_meta(plan, b, e, request_id, &meta);
    timings_.checksum += since(t);
    // Header, item table and keys are small and contiguous: one iovec. Values follow, one
    // iovec each, pointing at the caller's memory.
    iov.clear();
    iov.push_back({meta.data(), meta.size()});
    for (std::size_t j = b; j < e; ++j) {
      const ConstSpan& v = plan.values[j];
      if (v.size) iov.push_back({const_cast<uint8_t*>(v.data), v.size});
    }
    send_all(iov.data(), iov.size(), dl);
    timings_.send += since(t);
    ++timings_.frames;
    inflight.push_back({request_id, b, e});
  }
  while (!inflight.empty()) collect_one();
  return status;
}

std::vector<uint8_t> TcpConnection::get_with(const std::vector<std::string_view>& keys, const Placer& placer,
                                             int timeout_ms, std::vector<uint64_t>* lengths) {
  validate_keys(keys, limits_.max_key_len);
  std::lock_guard<std::mutex> lock(mu_);
  UnwindGuard guard([this] { break_stream(); });
  Deadline dl(timeout_ms);
  std::vector<uint8_t> status = get_statuses(keys.size(), lengths);
  std::vector<uint8_t> table;
  std::vector<uint8_t> scratch;  // sink for values we must drain to keep the stream in sync
  std::vector<iovec> iov;
  GetFrame f;
  for (const auto& [b, e] : chunks(keys, nullptr, 2)) {
    const uint32_t n = static_cast<uint32_t>(e - b);
    auto t = Clock::now();
    const uint64_t request_id = send_request(Op::kGet, n, key_list_payload(keys, b, e), dl);
    timings_.send += since(t);

    const Header r = recv_reply(static_cast<uint8_t>(Op::kGet), request_id, dl);
    timings_.wait += since(t);
    ++timings_.frames;
    if (auto why = check_get_reply(r, n); !why.empty()) fail(why);
    table.resize(uint64_t(proto::kGetItemBytes) * n);
    recv_exact(table.data(), table.size(), dl);
    if (auto why = parse_get_table(r, table.data(), n, b, limits_.max_value_bytes, &f); !why.empty())
      fail(why);
    place_values(placer, &f);
    timings_.recv += since(t);  // the item table
    // Values are received a group at a time and each group is verified as soon as it has
    // landed, while its bytes are still in cache and while the kernel keeps receiving the
    // next group; verifying after the whole batch would add a second pass over cold memory.
    uint32_t settled = 0;  // items [0, settled) are verified
    uint64_t group_bytes = 0;
    iov.clear();
    auto land_group = [&](uint32_t upto) {
      if (!iov.empty()) {
        auto tr = Clock::now();
        recv_vec(iov.data(), iov.size(), dl);
        timings_.recv += since(tr);
      }
      auto tv = Clock::now();
      settle_values(f, settled, upto, &status, lengths);
      settled = upto;
      timings_.verify += since(tv);
      iov.clear();
      group_bytes = 0;
    };
    for (uint32_t j = 0; j < n; ++j) {
      if (f.length[j] > 0 && f.dest[j]) {
        iov.push_back({f.dest[j], f.length[j]});
      } else if (f.length[j] > 0) {
        if (scratch.empty()) scratch.resize(kDrainBytes);
        for (uint64_t left = f.length[j]; left > 0;) {
          const std::size_t take = static_cast<std::size_t>(std::min<uint64_t>(left, scratch.size()));
          iov.push_back({scratch.data(), take});
          left -= take;
        }
      }
      group_bytes += f.length[j];
      if (group_bytes >= kVerifyGroupBytes) land_group(j + 1);
    }
    land_group(n);
  }
  return status;
}

std::vector<uint8_t> TcpConnection::get_into(const std::vector<std::string_view>& keys,
                                             const std::vector<MutSpan>& buffers, int timeout_ms,
                                             std::vector<uint64_t>* lengths) {
  return get_with(keys, buffer_placer(keys, buffers), timeout_ms, lengths);
}

template <class Result>
Result TcpConnection::run_key_list(Result (*op)(const KeyListCall&),
                                   const std::vector<std::string_view>& keys, int timeout_ms) {
  validate_keys(keys, limits_.max_key_len);
  std::lock_guard<std::mutex> lock(mu_);
  Deadline dl(timeout_ms);
  return op({keys, chunks(keys, nullptr, 2),
             [this, &dl](Op o, uint32_t n, const std::vector<uint8_t>& payload) {
               return simple_call(o, n, payload, dl);
             },
             [this](const std::string& why) { fail(why); }});
}

std::vector<uint8_t> TcpConnection::exists(const std::vector<std::string_view>& keys, int timeout_ms) {
  return run_key_list(exists_in_chunks, keys, timeout_ms);
}

uint32_t TcpConnection::lookup_prefix(const std::vector<std::string_view>& keys, int timeout_ms) {
  return run_key_list(lookup_prefix_in_chunks, keys, timeout_ms);
}

uint32_t TcpConnection::del(const std::vector<std::string_view>& keys, int timeout_ms) {
  return run_key_list(delete_in_chunks, keys, timeout_ms);
}

std::string TcpConnection::stats(int timeout_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  Deadline dl(timeout_ms);
  const auto r = simple_call(Op::kStats, 0, {}, dl);
  return std::string(r.begin(), r.end());
}

TcpConnection::Timings TcpConnection::timings() {
  std::lock_guard<std::mutex> lock(mu_);
  return timings_;
}

void TcpConnection::reset_timings() {
  std::lock_guard<std::mutex> lock(mu_);
  timings_ = Timings{};
}

double TcpConnection::ping(int timeout_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  Deadline dl(timeout_ms);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<uint8_t> payload(8);
  proto::put_u64(payload.data(), next_id_);
  const auto r = simple_call(Op::kPing, 0, payload, dl);
  if (r != payload) fail("PING echo does not match");
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace membrain
