// One client-side UCX connection to a Membrain server, speaking protocol v1 (docs/protocol.md)
// over UCP Active Messages (docs/rdma.md explains the mapping). Same contract as TcpConnection:
// blocking batched calls, each bounded by a deadline; any timeout, transport error or protocol
// violation marks the connection broken and throws TransportError.
//
// Each connection owns its UCP worker and endpoint (created with ucp_ep_create on the server's
// sockaddr); the context is shared by all connections of the process. A call sends one AM per
// frame (header + PUT item table and keys in the AM header, values as the AM data straight from
// the caller's buffers) and progresses the worker - sleeping on its event fd when idle - until
// the reply AM arrives. GET values are received with ucp_am_recv_data_nbx straight into the
// destination buffers (rendezvous: zero-copy, RDMA on capable fabrics).
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "transport/protocol.h"
#include "transport/request_codec.h"   // ConstSpan, MutSpan, ValuePlacer, KeyListCall
#include "transport/tcp_connection.h"  // TransportError, Options
#include "transport/ucx/ucx_core.h"

namespace membrain::ucx {

class UcxConnection {
 public:
  using Options = TcpConnection::Options;
  using Placer = TcpConnection::Placer;

  // Creates the worker and endpoint and completes HELLO within connect_timeout_ms.
  explicit UcxConnection(Options options);
  ~UcxConnection();
  UcxConnection(const UcxConnection&) = delete;
  UcxConnection& operator=(const UcxConnection&) = delete;

  std::vector<uint8_t> put(const std::vector<std::string_view>& keys, const std::vector<ConstSpan>& values,
                           int timeout_ms);
  std::vector<uint8_t> get_into(const std::vector<std::string_view>& keys,
                                const std::vector<MutSpan>& buffers, int timeout_ms,
                                std::vector<uint64_t>* lengths = nullptr);
  std::vector<uint8_t> get_with(const std::vector<std::string_view>& keys, const Placer& placer,
                                int timeout_ms, std::vector<uint64_t>* lengths);
  std::vector<uint8_t> exists(const std::vector<std::string_view>& keys, int timeout_ms);
  uint32_t lookup_prefix(const std::vector<std::string_view>& keys, int timeout_ms);
  uint32_t del(const std::vector<std::string_view>& keys, int timeout_ms);
  std::string stats(int timeout_ms);
  double ping(int timeout_ms);

  // Test hook for hostile-input tests: sends `am_header` / `data` verbatim as one request AM
  // and returns the raw reply (40-byte header + header extension + data), or throws.
  std::vector<uint8_t> raw_call(const std::vector<uint8_t>& am_header, const std::vector<uint8_t>& data,
                                int timeout_ms);

  bool broken() const { return broken_; }
  void close();
  const proto::Limits& limits() const { return limits_; }
  const std::string& host() const { return opts_.host; }
  uint16_t port() const { return opts_.port; }
  // Largest frame meta (header + table + keys) sent in one AM header.
  std::size_t am_header_cap() const { return am_cap_; }
  // UCX's description of this endpoint's lanes (which transport carries what), as printed by
  // ucp_ep_print_info; for operators and tests checking that shared memory or RDMA is in use.
  std::string transport_info();

 private:
  using Req = Completion;
  struct Incoming;  // the reply AM as delivered by the callback
  static ucs_status_t on_reply(void* arg, const void* header, size_t header_len, void* data, size_t len,
                               const ucp_am_recv_param_t* param);
  static ucs_status_t on_value(void* arg, const void* header, size_t header_len, void* data, size_t len,
                               const ucp_am_recv_param_t* param);
  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t status);
  // Sends the value AMs of a split PUT; returns their send records.
  std::vector<Req*> send_values(uint64_t request_id,
                                const std::vector<std::pair<uint32_t, ConstSpan>>& values,
                                std::vector<std::vector<uint8_t>>* headers);
  // Receives the split values of the current GET reply into dests (index, span) in order.
  void recv_split(uint64_t request_id, const std::vector<std::pair<uint32_t, ConstSpan>>& dests,
                  Clock::time_point dl);
  void wait_until(const std::function<bool()>& ready, Clock::time_point dl);

  [[noreturn]] void fail(const std::string& what);
  void check_usable();
  void abort_inflight();
  // Marks broken and aborts in-flight operations, without throwing (see UnwindGuard).
  void break_stream();
  Req* track(ucs_status_ptr_t req, const char* what);
  void wait_op(Req* op, Clock::time_point dl);
  void finish_op(Req*);
  // Sends one request AM (header bytes, then data as an iov of spans) and waits for the
  // reply AM of `request_id`; leaves it in *in (data not yet consumed).
  void send_and_wait(const std::vector<uint8_t>& am_header, const std::vector<ConstSpan>& data,
                     Clock::time_point dl, const std::vector<std::pair<uint32_t, ConstSpan>>* split = nullptr,
                     uint64_t request_id = 0);
  // Receives the current reply's data into the given destinations (eager copy or rendezvous).
  void recv_data(std::vector<ConstSpan> dests_as_mut, Clock::time_point dl);
  std::vector<uint8_t> reply_body(Clock::time_point dl);
  void release_incoming();
  proto::Header check_reply(uint8_t op, uint64_t request_id, std::size_t ext_len);
  // Sends a request whose payload is one contiguous buffer and waits for its reply AM;
  // returns its request id.
  uint64_t send_request(proto::Op op, uint32_t count, const std::vector<uint8_t>& payload,
                        Clock::time_point dl);
  std::vector<uint8_t> simple_call(proto::Op op, uint32_t count, const std::vector<uint8_t>& payload,
                                   Clock::time_point dl);
  // This transport's part of EXISTS, LOOKUP_PREFIX and DELETE (see KeyListCall): the lock, one
  // deadline for all the chunks, and its round trip.
  template <class Result>
  Result run_key_list(Result (*op)(const KeyListCall&), const std::vector<std::string_view>& keys,
                      int timeout_ms);
  // [begin, end) frames of a batch within max_batch, max_payload_bytes and the AM header cap;
  // with value_sizes, also at most max_value_bytes of values per frame (see put()).
  std::vector<std::pair<std::size_t, std::size_t>> chunks(const std::vector<std::string_view>& keys,
                                                          const std::vector<std::size_t>* value_sizes,
                                                          std::size_t per_item,
                                                          std::size_t per_item_header) const;
  void hello(Clock::time_point dl);

  Options opts_;
  proto::Limits limits_;
  uint64_t next_id_ = 1;
  std::atomic<bool> broken_{false};
  std::mutex mu_;
  // Declaration order is destruction order in reverse: the endpoint closes first, then the
  // worker (cancelling anything left), and only then the completion records UCX may touch.
  std::list<std::unique_ptr<Req>> graveyard_;  // records of requests abandoned after a failure
  std::unique_ptr<Incoming> in_;
  std::shared_ptr<Context> ctx_;
  std::unique_ptr<Worker> worker_;
  Endpoint ep_;
  ucs_status_t ep_status_ = UCS_OK;
  std::size_t am_cap_ = 0;
  uint64_t expect_id_ = 0;
  bool busy_poll_ = false;  // MEMBRAIN_UCX_BUSY_POLL=1
};

}  // namespace membrain::ucx
