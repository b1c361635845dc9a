// One worker thread: its own epoll instance watching the shared listening socket
// (EPOLLEXCLUSIVE, so one worker wakes per incoming connection and accepts it itself - no
// hand-off queue) and the connections it accepted. Level-triggered: a connection that stops
// reading (backlog, drain) just drops EPOLLIN from its interest set.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <unordered_map>

#include "common/unique_fd.h"
#include "server/connection.h"

namespace membrain::server {

class EventLoop {
 public:
  EventLoop(ServerContext& ctx, int listen_fd);
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  void start();
  // Stop accepting; let connections finish what they started, for at most drain_timeout_s.
  void request_stop(double drain_timeout_s);
  void join();

 private:
  void run();
  void accept_ready(int64_t now);
  void update_interest(Connection& c);
  void close_connection(int fd);
  void on_tick(int64_t now);
  // Out of file descriptors (EMFILE/ENFILE/...): sheds the queued clients with the spare fd
  // (accept and close, so they learn at once instead of hanging in the backlog) and takes the
  // listener out of this loop's epoll for kAcceptPauseMs (level-triggered, it would spin).
  void pause_accepting(int64_t now);
  void resume_accepting(int64_t now);

  ServerContext& ctx_;
  int listen_fd_;
  UniqueFd epoll_;
  UniqueFd wake_;  // eventfd: request_stop() wakes epoll_wait
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> drain_deadline_ns_{0};
  bool draining_ = false;
  UniqueFd spare_;                   // /dev/null, given up to accept-and-close when fds run out
  int64_t accept_paused_until_ = 0;  // 0 = the listener is in this loop's epoll
  struct Entry {
    std::unique_ptr<Connection> conn;
    uint32_t events = 0;  // current epoll interest
  };
  std::unordered_map<int, Entry> conns_;
};

int64_t monotonic_ns();

}  // namespace membrain::server
