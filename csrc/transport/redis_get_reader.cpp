#include "transport/redis_get_reader.h"

#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <string_view>

#include <sys/socket.h>
#include <sys/uio.h>

#include "common/checksum.h"
#include "common/deadline.h"

namespace membrain::redis {

namespace {

using Failure = GetBatchResult::Failure;
using Clock = std::chrono::steady_clock;

// Header reads are small, so little of a value's body detours through the buffer; a line that
// has not ended within kMaxLine bytes is a broken stream, not a reply.
constexpr std::size_t kChunk = 4096;
constexpr std::size_t kMaxLine = 64 << 10;
// The largest RESP3 blob error read (its text is only logged); it must fit the buffer.
constexpr int64_t kMaxBlobError = kMaxLine - 2;
// Redis refuses bulk strings above proto-max-bulk-len (512 MiB by default); a longer one is a
// broken or hostile stream, not something to drain.
constexpr int64_t kMaxBulk = int64_t{512} << 20;

struct Stop {
  Failure why;
  std::string detail;
};

std::string printable(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 40)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  return out;
}

// Buffered reads from one socket, all bounded by one deadline.
class ReplyStream {
 public:
  ReplyStream(int fd, int timeout_ms) : fd_(fd), dl_(timeout_ms), buf_(kChunk + kMaxLine) {}

  // The next line, without its CRLF; valid until the next read.
  std::string_view line() {
    std::size_t scanned = pos_;
    for (;;) {
      for (std::size_t i = scanned; i + 1 < end_; ++i) {
        if (buf_[i] == '\r' && buf_[i + 1] == '\n') {
          std::string_view out(reinterpret_cast<const char*>(buf_.data() + pos_), i - pos_);
          pos_ = i + 2;
          return out;
        }
      }
      scanned = end_ > pos_ ? end_ - 1 : pos_;  // a '\r' at the end may pair with the next byte
      if (end_ - pos_ > kMaxLine) throw Stop{Failure::protocol, "no line end within 64 KiB"};
      scanned -= compact();
      fill();
    }
  }

  void exact(uint8_t* out, std::size_t n) {
    while (end_ - pos_ < n) {
      compact();
      fill();
    }
    std::memcpy(out, buf_.data() + pos_, n);
    pos_ += n;
  }

  // Fills dst: what the buffer holds first, then the kernel writes straight into dst; the bytes
  // that follow the value in the same read (its trailer, the next header) land in the buffer.
  void into(uint8_t* dst, std::size_t n) {
    std::size_t have = std::min(end_ - pos_, n);
    std::memcpy(dst, buf_.data() + pos_, have);
    pos_ += have;
    if (have == n) return;
    pos_ = end_ = 0;  // the buffer is empty
    while (have < n) {
      iovec iov[2] = {{dst + have, n - have}, {buf_.data(), kChunk}};
      const std::size_t got = recv_some(iov, 2);
      if (got <= n - have) {
        have += got;
      } else {
        end_ = got - (n - have);
        have = n;
      }
    }
  }

  void skip(std::size_t n) {
    std::size_t have = std::min(end_ - pos_, n);
    pos_ += have;
    while (have < n) {
      pos_ = end_ = 0;
      iovec iov{buf_.data(), std::min(kChunk, n - have)};
      have += recv_some(&iov, 1);
    }
  }

  // The CRLF that ends a bulk string.
  void crlf() {
    uint8_t end[2];
    exact(end, 2);
    if (end[0] != '\r' || end[1] != '\n') throw Stop{Failure::protocol, "bulk string not terminated by CRLF"};
  }

  std::size_t leftover() const { return end_ - pos_; }

 private:
  // Moves the unread bytes to the front; returns how far they moved.
  std::size_t compact() {
    const std::size_t moved = pos_;
    if (moved) {
      std::memmove(buf_.data(), buf_.data() + pos_, end_ - pos_);
      end_ -= pos_;
      pos_ = 0;
    }
    return moved;
  }

  void fill() {
    iovec iov{buf_.data() + end_, std::min(kChunk, buf_.size() - end_)};
    end_ += recv_some(&iov, 1);
  }

  std::size_t recv_some(iovec* iov, int cnt) {
    for (;;) {
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<std::size_t>(cnt);
      // MSG_DONTWAIT: the socket may be in blocking mode; only poll() waits, with the time left.
      const ssize_t n = ::recvmsg(fd_, &msg, MSG_DONTWAIT);
      if (n > 0) {
        // Also when data keeps coming: a server streaming a long reply must not hold us past it.
        if (Clock::now() >= dl_.at) throw Stop{Failure::timed_out, "the GET batch ran past its deadline"};
        return static_cast<std::size_t>(n);
      }
      if (n == 0) throw Stop{Failure::closed, "Redis closed the connection mid-reply"};
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        throw Stop{Failure::closed, std::string("recv: ") + std::strerror(errno)};
      const int ms = dl_.remaining_ms();
      if (ms <= 0) throw Stop{Failure::timed_out, "the GET batch ran past its deadline"};
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, ms) < 0 && errno != EINTR)
        throw Stop{Failure::closed, std::string("poll: ") + std::strerror(errno)};
    }
  }

  int fd_;
  Deadline dl_;
  std::vector<uint8_t> buf_;
  std::size_t pos_ = 0, end_ = 0;
};

int64_t length(std::string_view field) {
  int64_t v = 0;
  const auto [end, ec] = std::from_chars(field.data(), field.data() + field.size(), v);
  if (ec != std::errc() || end != field.data() + field.size())
    throw Stop{Failure::protocol, "bad length '" + printable(field) + "'"};
  return v;
}

uint64_t load_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

GetBatchResult read_get_replies(int fd, const std::vector<MutSpan>& dests, int timeout_ms) {
  GetBatchResult r;
  r.hits.assign(dests.size(), 0);
  ReplyStream s(fd, timeout_ms);
  try {
    for (std::size_t i = 0; i < dests.size(); ++i) {
      const std::string_view head = s.line();
      if (head.empty()) throw Stop{Failure::protocol, "an empty reply line"};
      const std::string_view rest = head.substr(1);
      switch (head[0]) {
        case '-':
          r.errors.emplace_back(rest);
          continue;
        case '_':  // RESP3 null
          continue;
        case '!': {  // RESP3 blob error
          const int64_t n = length(rest);
          if (n < 0 || n > kMaxBlobError) throw Stop{Failure::protocol, "bad blob error length"};
          std::string text(static_cast<std::size_t>(n) + 2, '\0');
          s.exact(reinterpret_cast<uint8_t*>(text.data()), text.size());
          text.resize(static_cast<std::size_t>(n));
          r.errors.push_back(std::move(text));
          continue;
        }
        case '$':
          break;
        default:
          throw Stop{Failure::protocol, "a GET was answered with '" + printable(head) + "'"};
      }
      const int64_t n = length(rest);
      if (n == -1) continue;  // nil: not stored
      if (n < 0 || n > kMaxBulk) throw Stop{Failure::protocol, "bulk length " + std::to_string(n)};
      const MutSpan& d = dests[i];
      if (static_cast<uint64_t>(n) != d.size + kTrailer) {
        s.skip(static_cast<std::size_t>(n));  // another block size or a foreign value: a miss
        s.crlf();
        continue;
      }
      s.into(d.data, d.size);
      uint8_t trailer[kTrailer];
      s.exact(trailer, sizeof(trailer));
      s.crlf();
      r.hits[i] = checksum64(d.data, d.size, 0) == load_le64(trailer);
    }
    if (s.leftover())
      throw Stop{Failure::protocol, std::to_string(s.leftover()) + " bytes after the last reply"};
  } catch (const Stop& stop) {
    r.failure = stop.why;
    r.detail = stop.detail;
  }
  return r;
}

}  // namespace membrain::redis
