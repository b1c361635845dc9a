#include "server/event_loop.h"

#include <fcntl.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

namespace membrain::server {

int64_t monotonic_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

namespace {
constexpr int kTickMs = 50;              // timeouts are checked this often
constexpr int64_t kAcceptPauseMs = 100;  // listener out of epoll after running out of fds
}  // namespace

EventLoop::EventLoop(ServerContext& ctx, int listen_fd) : ctx_(ctx), listen_fd_(listen_fd) {
  epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_) throw std::runtime_error(std::string("epoll_create1: ") + std::strerror(errno));
  wake_.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!wake_) throw std::runtime_error(std::string("eventfd: ") + std::strerror(errno));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = wake_.get();
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, wake_.get(), &ev) != 0)
    throw std::runtime_error(std::string("epoll_ctl(eventfd): ") + std::strerror(errno));
  ev.events = EPOLLIN | EPOLLEXCLUSIVE;
  ev.data.fd = listen_fd_;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, listen_fd_, &ev) != 0)
    throw std::runtime_error(std::string("epoll_ctl(listen): ") + std::strerror(errno));
  spare_.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
}

void EventLoop::pause_accepting(int64_t now) {
  // Shed what is queued: each spare fd given up lets one accept() through, closed at once.
  for (int i = 0; i < 64 && spare_; ++i) {
    spare_.reset();
    UniqueFd shed(::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC));
    const bool got = static_cast<bool>(shed);
    shed.reset();
    spare_.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    if (!got) break;
    Counters::inc(ctx_.counters.connections_rejected);
  }
  Counters::inc(ctx_.counters.accept_pauses);
  if (accept_paused_until_ == 0) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, listen_fd_, nullptr);
  accept_paused_until_ = now + kAcceptPauseMs * 1'000'000LL;
}

void EventLoop::resume_accepting(int64_t now) {
  if (accept_paused_until_ == 0 || now < accept_paused_until_ || draining_) return;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLEXCLUSIVE;
  ev.data.fd = listen_fd_;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, listen_fd_, &ev) == 0) accept_paused_until_ = 0;
}

EventLoop::~EventLoop() {
  request_stop(0);
  join();
}

void EventLoop::start() {
  thread_ = std::thread([this] { run(); });
}

void EventLoop::request_stop(double drain_timeout_s) {
  drain_deadline_ns_.store(monotonic_ns() + static_cast<int64_t>(drain_timeout_s * 1e9));
  stop_.store(true);
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t r = ::write(wake_.get(), &one, sizeof one);
}

void EventLoop::join() {
  if (thread_.joinable()) thread_.join();
}

void EventLoop::update_interest(Connection& c) {
  auto it = conns_.find(c.fd());
  if (it == conns_.end()) return;
  // RDHUP only while reading: it stays raised after a half-close and would spin the loop.
  const uint32_t want = (c.wants_read() ? (EPOLLIN | EPOLLRDHUP) : 0u) | (c.wants_write() ? EPOLLOUT : 0u);
  if (want == it->second.events) return;
  epoll_event ev{};
  ev.events = want;
  ev.data.fd = c.fd();
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, c.fd(), &ev);
  it->second.events = want;
}

void EventLoop::close_connection(int fd) {
  auto it = conns_.find(fd);
  if (it == conns_.end()) return;
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
  conns_.erase(it);  // ~Connection closes the fd and drops its pins
}

void EventLoop::accept_ready(int64_t now) {
  for (int i = 0; i < 64; ++i) {
    UniqueFd fd(::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!fd) {
      if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) pause_accepting(now);
      return;  // EAGAIN: another worker took it
    }
    const uint64_t cur = ctx_.counters.connections_current.fetch_add(1, std::memory_order_relaxed);
    if (cur >= static_cast<uint64_t>(ctx_.config.max_connections)) {
      // Over the limit: accepted only to be closed, so the peer learns at once.
      ctx_.counters.connections_current.fetch_sub(1, std::memory_order_relaxed);
      Counters::inc(ctx_.counters.connections_rejected);
      continue;
    }
    Counters::inc(ctx_.counters.connections_total);
    const int one = 1;
    ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (ctx_.config.socket_buffer_bytes > 0) {
      const int b = ctx_.config.socket_buffer_bytes;
      ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDBUF, &b, sizeof b);
    }
    const int raw = fd.get();
    auto conn = std::make_unique<Connection>(std::move(fd), ctx_, now);  // owns the count from here
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.fd = raw;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, raw, &ev) != 0) continue;  // conn closes itself
    if (draining_) conn->begin_drain();
    conns_[raw] = Entry{std::move(conn), ev.events};
  }
}

void EventLoop::on_tick(int64_t now) {
  std::vector<int> dead;
  for (auto& [fd, e] : conns_) {
    e.conn->on_timer(now);
    if (e.conn->done())
      dead.push_back(fd);
    else
      update_interest(*e.conn);  // a PUT waiting for the pending-bytes budget may read again
  }
  for (int fd : dead) close_connection(fd);
}

void EventLoop::run() {
  std::vector<epoll_event> events(256);
  int64_t next_tick = monotonic_ns() + kTickMs * 1'000'000LL;
  for (;;) {
    const int n = ::epoll_wait(epoll_.get(), events.data(), static_cast<int>(events.size()), kTickMs);
    const int64_t now = monotonic_ns();
    if (stop_.load() && !draining_) {
      draining_ = true;
      if (accept_paused_until_ == 0) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, listen_fd_, nullptr);
      std::vector<int> dead;
      for (auto& [fd, e] : conns_) {
        e.conn->begin_drain();
        if (e.conn->done())
          dead.push_back(fd);
        else
          update_interest(*e.conn);
      }
      for (int fd : dead) close_connection(fd);
    }
    for (int i = 0; i < n; ++i) {
      const int fd = events[i].data.fd;
      const uint32_t ev = events[i].events;
      if (fd == wake_.get()) {
        uint64_t v;
        [[maybe_unused]] ssize_t r = ::read(wake_.get(), &v, sizeof v);
        continue;
      }
      if (fd == listen_fd_) {
        if (!draining_) accept_ready(now);
        continue;
      }
      auto it = conns_.find(fd);
      if (it == conns_.end()) continue;
      Connection& c = *it->second.conn;
      if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) c.on_readable(now);
      if (!c.done() && (ev & EPOLLOUT)) c.on_writable(now);
      // A hung-up socket with nothing left to send has nothing left to do.
      if (!c.done() && (ev & (EPOLLERR | EPOLLHUP)) && !c.wants_write()) c.hang_up();
      if (c.done())
        close_connection(fd);
      else
        update_interest(c);
    }
    if (now >= next_tick) {
      resume_accepting(now);
      on_tick(now);
      next_tick = now + kTickMs * 1'000'000LL;
    }
    if (draining_ && (conns_.empty() || now >= drain_deadline_ns_.load())) break;
  }
  conns_.clear();
}

}  // namespace membrain::server
