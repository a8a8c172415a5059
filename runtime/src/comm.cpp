// Communicators: Gloo over TCP for CPU ranks, a one-rank stand-in, the launcher environment, and
// the TCP key-value store the ranks rendezvous through.
#include "zinf/runtime/comm.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/hash_store.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>
#include <gloo/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "zinf/common/error.hpp"

namespace zinf::runtime {
namespace {

// Gloo writes to its sockets with writev: a write to a peer that has gone (its process died)
// would raise SIGPIPE, whose default action ends this process without a word. Ignored (unless
// the program installed a handler of its own), the write fails with EPIPE and Gloo throws, so the
// collective reports the lost peer.
void ignore_sigpipe() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction old{};
    if (::sigaction(SIGPIPE, nullptr, &old) == 0 && old.sa_handler == SIG_DFL) {
      struct sigaction ign{};
      ign.sa_handler = SIG_IGN;
      sigemptyset(&ign.sa_mask);
      ::sigaction(SIGPIPE, &ign, nullptr);
    }
  });
}

using Clock = std::chrono::steady_clock;

std::optional<std::string> env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

int env_int(const char* name, const std::string& text, int lo, int hi) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(text.c_str(), &end, 10);
  if (errno != 0 || end == text.c_str() || *end != '\0' || v < lo || v > hi) {
    throw Error("{}='{}' is not a whole number in [{}, {}]", name, text, lo, hi);
  }
  return static_cast<int>(v);
}

// --- the rendezvous store: a tiny key-value service on rank 0 -------------------------------------
// Requests: u8 op ('S' set, 'G' get), u32 key length, key, and for 'S' u32 value length, value.
// A get waits (up to the timeout) until the key is set; the reply is u8 1, u32 length, value, or
// u8 0 when the key never came.

void send_all(int fd, const void* data, std::size_t n) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw Error("rendezvous: send failed: {}", errno_text(errno));
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

bool recv_all(int fd, void* data, std::size_t n) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t r = ::recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

class StoreServer {
 public:
  StoreServer(int port, std::chrono::milliseconds timeout) : timeout_(timeout) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) throw Error("rendezvous: socket: {}", errno_text(errno));
    const int one = 1;
    ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    a.sin_port = htons(static_cast<std::uint16_t>(port));
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || ::listen(fd_, 256) != 0) {
      const int e = errno;
      ::close(fd_);
      throw Error("rank 0 cannot listen on port {} for the rendezvous: {} (another job on this port? set MASTER_PORT "
                  "to a free one)",
                  port, errno_text(e));
    }
    accept_thread_ = std::thread([this] { accept_loop(); });
  }
  ~StoreServer() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    ::shutdown(fd_, SHUT_RDWR);
    accept_thread_.join();
    {
      std::lock_guard lock(mu_);
      for (int c : clients_) ::shutdown(c, SHUT_RDWR);
    }
    for (auto& t : client_threads_) t.join();
    ::close(fd_);
    for (int c : clients_) ::close(c);
  }

 private:
  void accept_loop() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 200) <= 0) continue;
      const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      std::lock_guard lock(mu_);
      clients_.push_back(c);
      client_threads_.emplace_back([this, c] { serve(c); });
    }
  }
  void serve(int c) {
    while (!stop_) {
      char op = 0;
      std::uint32_t klen = 0;
      if (!recv_all(c, &op, 1) || !recv_all(c, &klen, 4) || klen > (1u << 20)) return;
      std::string key(klen, '\0');
      if (!recv_all(c, key.data(), klen)) return;
      if (op == 'S') {
        std::uint32_t vlen = 0;
        if (!recv_all(c, &vlen, 4) || vlen > (64u << 20)) return;
        std::vector<char> value(vlen);
        if (!recv_all(c, value.data(), vlen)) return;
        {
          std::lock_guard lock(mu_);
          map_[key] = std::move(value);
        }
        cv_.notify_all();
        const char ok = 1;
        try {
          send_all(c, &ok, 1);
        } catch (const Error&) {
          return;
        }
      } else if (op == 'G') {
        std::vector<char> value;
        bool found = false;
        {
          std::unique_lock lock(mu_);
          found = cv_.wait_for(lock, timeout_, [&] { return stop_ || map_.count(key) > 0; }) && !stop_;
          if (found) value = map_[key];
        }
        try {
          const char flag = found ? 1 : 0;
          send_all(c, &flag, 1);
          if (found) {
            const auto n = static_cast<std::uint32_t>(value.size());
            send_all(c, &n, 4);
            send_all(c, value.data(), n);
          }
        } catch (const Error&) {
          return;
        }
      } else {
        return;
      }
    }
  }

  std::chrono::milliseconds timeout_;
  int fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread accept_thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::vector<char>> map_;
  std::vector<int> clients_;
  std::vector<std::thread> client_threads_;
};

class TcpStore : public gloo::rendezvous::Store {
 public:
  TcpStore(const std::string& host, int port, int rank, std::chrono::milliseconds timeout)
      : host_(host), port_(port), timeout_(timeout) {
    const auto deadline = Clock::now() + timeout;
    addrinfo hints{};
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    const int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
    if (rc != 0) throw Error("rank {}: MASTER_ADDR '{}' does not resolve: {}", rank, host, ::gai_strerror(rc));
    // Rank 0 may not be listening yet: retry until the timeout.
    while (true) {
      fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (fd_ >= 0 && ::connect(fd_, res->ai_addr, res->ai_addrlen) == 0) break;
      const int e = errno;
      if (fd_ >= 0) ::close(fd_);
      fd_ = -1;
      if (Clock::now() > deadline) {
        ::freeaddrinfo(res);
        throw Error("rank {} could not reach rank 0 at {}:{} within {} s ({}): is rank 0 running, and are MASTER_ADDR "
                    "and MASTER_PORT the same for every rank?",
                    rank, host, port, timeout.count() / 1000, errno_text(e));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ::freeaddrinfo(res);
    const int one = 1;
    ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    // A rank 0 that stops answering (its host gone) ends a wait too, a little after the server's
    // own timeout.
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(timeout.count() / 1000 + 10);
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  }
  ~TcpStore() override {
    if (fd_ >= 0) ::close(fd_);
  }

  void set(const std::string& key, const std::vector<char>& data) override {
    std::lock_guard lock(mu_);
    const char op = 'S';
    const auto klen = static_cast<std::uint32_t>(key.size());
    const auto vlen = static_cast<std::uint32_t>(data.size());
    send_all(fd_, &op, 1);
    send_all(fd_, &klen, 4);
    send_all(fd_, key.data(), klen);
    send_all(fd_, &vlen, 4);
    send_all(fd_, data.data(), vlen);
    char ok = 0;
    if (!recv_all(fd_, &ok, 1)) throw Error("rendezvous: rank 0 ({}:{}) closed the connection", host_, port_);
  }
  std::vector<char> get(const std::string& key) override {
    std::lock_guard lock(mu_);
    const char op = 'G';
    const auto klen = static_cast<std::uint32_t>(key.size());
    send_all(fd_, &op, 1);
    send_all(fd_, &klen, 4);
    send_all(fd_, key.data(), klen);
    char flag = 0;
    if (!recv_all(fd_, &flag, 1)) throw Error("rendezvous: rank 0 ({}:{}) closed the connection", host_, port_);
    if (flag == 0) {
      throw Error("rendezvous: '{}' did not arrive within {} s: a rank did not start or died (check every rank's "
                  "output)",
                  key, timeout_.count() / 1000);
    }
    std::uint32_t n = 0;
    std::vector<char> value;
    if (!recv_all(fd_, &n, 4)) throw Error("rendezvous: rank 0 closed the connection");
    value.resize(n);
    if (!recv_all(fd_, value.data(), n)) throw Error("rendezvous: rank 0 closed the connection");
    return value;
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds&) override {
    for (const auto& k : keys) (void)get(k);  // a get blocks until the key is there
  }

 private:
  std::string host_;
  int port_;
  std::chrono::milliseconds timeout_;
  int fd_ = -1;
  std::mutex mu_;
};

// In-process stores for thread ranks, by id.
std::shared_ptr<gloo::rendezvous::HashStore> shared_store(const std::string& id) {
  static std::mutex mu;
  static std::map<std::string, std::weak_ptr<gloo::rendezvous::HashStore>> stores;
  std::lock_guard lock(mu);
  auto s = stores[id].lock();
  if (!s) {
    s = std::make_shared<gloo::rendezvous::HashStore>();
    stores[id] = s;
  }
  return s;
}

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(int rank, int size, gloo::rendezvous::Store& store, const std::string& bind,
                   std::chrono::milliseconds timeout, std::unique_ptr<StoreServer> server,
                   std::shared_ptr<void> keep_alive)
      : server_(std::move(server)), keep_alive_(std::move(keep_alive)), store_(&store), timeout_(timeout) {
    ignore_sigpipe();
    try {
      gloo::transport::tcp::attr attr;
      attr.hostname = bind;
      device_ = gloo::transport::tcp::CreateDevice(attr);
    } catch (const std::exception& e) {
      throw Error("rank {} of {}: cannot open a TCP transport on '{}': {}", rank, size, bind, e.what());
    }
    connect(rank, size, store);
  }
  // A channel of its own over the parent's transport and rendezvous store (split()).
  GlooCommunicator(const GlooCommunicator& parent, const std::string& name)
      : keep_alive_(parent.keep_alive_), device_(parent.device_), timeout_(parent.timeout_) {
    auto prefixed = std::make_shared<gloo::rendezvous::PrefixStore>(
        fmt::format("split-{}-{}", parent.splits_, name), *parent.store_);
    store_ = prefixed.get();
    split_store_ = prefixed;
    connect(parent.rank(), parent.size(), *prefixed);
  }

  std::unique_ptr<Communicator> split(const std::string& name) override {
    ++splits_;
    try {
      return std::make_unique<GlooCommunicator>(*this, name);
    } catch (const Error& e) {
      throw Error("opening communication channel '{}': {}", name, e.what());
    }
  }
  int rank() const override { return context_->rank; }
  int size() const override { return context_->size; }

  void all_reduce_sum(std::span<float> data) override {
    if (data.empty()) return;
    run("all-reduce", [&] {
      gloo::AllreduceOptions o(context_);
      o.setOutput(data.data(), data.size());
      o.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
      o.setTag(next_tag());
      gloo::allreduce(o);
    });
  }
  void all_gather(std::span<const float> in, std::span<float> out) override {
    ZINF_ASSERT(out.size() == in.size() * static_cast<std::size_t>(size()), "all_gather: output size");
    if (in.empty()) return;
    run("all-gather", [&] {
      gloo::AllgatherOptions o(context_);
      o.setInput(const_cast<float*>(in.data()), in.size());
      o.setOutput(out.data(), out.size());
      o.setTag(next_tag());
      gloo::allgather(o);
    });
  }
  void reduce_scatter_sum(std::span<const float> in, std::span<float> out) override {
    const auto w = static_cast<std::size_t>(size());
    if (in.size() % w != 0 || out.size() != in.size() / w) {
      throw Error("reduce_scatter: {} elements do not split into {} shards of {}", in.size(), w, out.size());
    }
    if (in.empty()) return;
    if (w == 1) {
      std::copy(in.begin(), in.end(), out.begin());
      return;
    }
    // A ring: W - 1 steps, each rank sending one shard-sized chunk to the next rank and adding the
    // one it receives from the previous rank; after the last step rank r holds the sum of shard r.
    // Every byte crosses the wire (W - 1) / W times, as in NCCL's reduce-scatter. Each shard's
    // sum runs in a fixed rank order, so the result does not depend on timing.
    run("reduce-scatter", [&] {
      const std::size_t n = out.size();
      const std::size_t bytes = n * sizeof(float);
      const int r = rank(), ranks = size();
      // One chunk of running sum travels the ring: step k sends the chunk summed so far (the
      // input's own chunk at k = 0) and adds the received one to the next input chunk. Only two
      // chunks of scratch; the last sum lands in `out`.
      acc_.resize(n);
      recv_.resize(n);
      const std::uint32_t tag = next_tag();
      const auto slot = static_cast<std::uint64_t>(gloo::Slot::build(kReduceScatterSlotPrefix, tag));
      // Gloo only reads from a send buffer; its interface takes a mutable pointer.
      auto in_buf = context_->createUnboundBuffer(const_cast<float*>(in.data()), in.size() * sizeof(float));
      auto acc_buf = context_->createUnboundBuffer(acc_.data(), bytes);
      auto recv_buf = context_->createUnboundBuffer(recv_.data(), bytes);
      const int next = (r + 1) % ranks, prev = (r + ranks - 1) % ranks;
      for (int k = 0; k < ranks - 1; ++k) {
        const auto send_idx = static_cast<std::size_t>(((r - 1 - k) % ranks + ranks) % ranks);
        const auto recv_idx = static_cast<std::size_t>(((r - 2 - k) % ranks + ranks) % ranks);
        const std::uint64_t s = slot + static_cast<std::uint64_t>(k);
        if (k == 0) {
          in_buf->send(next, s, send_idx * bytes, bytes);
        } else {
          acc_buf->send(next, s, 0, bytes);
        }
        recv_buf->recv(prev, s, 0, bytes);
        recv_buf->waitRecv(timeout_);
        (k == 0 ? in_buf : acc_buf)->waitSend(timeout_);
        float* dst = k == ranks - 2 ? out.data() : acc_.data();
        const float* mine = in.data() + recv_idx * n;
        for (std::size_t i = 0; i < n; ++i) dst[i] = mine[i] + recv_[i];
      }
    });
  }
  void broadcast(std::span<float> data, int root) override {
    broadcast_bytes(std::as_writable_bytes(data), root);
  }
  void broadcast_bytes(std::span<std::byte> data, int root) override {
    if (data.empty()) return;
    run("broadcast", [&] {
      gloo::BroadcastOptions o(context_);
      o.setOutput(reinterpret_cast<std::uint8_t*>(data.data()), data.size());
      o.setRoot(root);
      o.setTag(next_tag());
      gloo::broadcast(o);
    });
  }
  void barrier(std::chrono::milliseconds timeout) override {
    run("barrier", [&] {
      gloo::BarrierOptions o(context_);
      o.setTag(next_tag());
      if (timeout.count() > 0) o.setTimeout(timeout);
      gloo::barrier(o);
    });
  }

 private:
  template <typename F>
  void run(const char* what, F&& f) {
    try {
      f();
    } catch (const std::exception& e) {
      throw Error("rank {} of {}: {} failed: {} (a rank has probably died or stalled; see its error)", rank(), size(),
                  what, e.what());
    }
  }
  std::uint32_t next_tag() { return tag_++; }
  void connect(int rank, int size, gloo::rendezvous::Store& store) {
    try {
      auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, size);
      ctx->setTimeout(timeout_);
      ctx->connectFullMesh(store, device_);
      context_ = ctx;
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Error("rank {} of {}: connecting the ranks failed: {}", rank, size, e.what());
    }
  }
  // Not one of Gloo's own prefixes (types.h), so its slots never meet a Gloo collective's.
  static constexpr std::uint8_t kReduceScatterSlotPrefix = 0x7a;

  std::unique_ptr<StoreServer> server_;
  std::shared_ptr<void> keep_alive_;
  gloo::rendezvous::Store* store_ = nullptr;
  std::shared_ptr<gloo::rendezvous::Store> split_store_;
  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::Context> context_;
  std::chrono::milliseconds timeout_;
  std::vector<float> acc_, recv_;
  std::uint32_t tag_ = 0;
  int splits_ = 0;
};

class SingleCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_reduce_sum(std::span<float>) override {}
  void all_gather(std::span<const float> in, std::span<float> out) override {
    ZINF_ASSERT(out.size() == in.size());
    std::copy(in.begin(), in.end(), out.begin());
  }
  void reduce_scatter_sum(std::span<const float> in, std::span<float> out) override {
    ZINF_ASSERT(out.size() == in.size());
    std::copy(in.begin(), in.end(), out.begin());
  }
  void broadcast(std::span<float>, int) override {}
  void broadcast_bytes(std::span<std::byte>, int) override {}
  void barrier(std::chrono::milliseconds) override {}
  std::unique_ptr<Communicator> split(const std::string&) override { return std::make_unique<SingleCommunicator>(); }
};

}  // namespace

std::chrono::milliseconds default_comm_timeout() {
  const auto v = env("ZINF_COMM_TIMEOUT");
  if (!v) return std::chrono::seconds(60);
  char* end = nullptr;
  const double s = std::strtod(v->c_str(), &end);
  if (end == v->c_str() || *end != '\0' || !(s > 0) || s > 1e7) {
    throw Error("ZINF_COMM_TIMEOUT='{}' is not a positive number of seconds", *v);
  }
  return std::chrono::milliseconds(static_cast<std::int64_t>(s * 1000));
}

RankInfo rank_info_from_environment() {
  RankInfo r;
  const auto pick = [](std::initializer_list<const char*> names) -> std::pair<const char*, std::optional<std::string>> {
    for (const char* n : names) {
      if (auto v = env(n)) return {n, v};
    }
    return {nullptr, std::nullopt};
  };
  struct Scheme {
    const char* source;
    const char *rank, *size, *local_rank, *local_size;
  };
  const Scheme schemes[] = {
      {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"},
      {"mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
       "OMPI_COMM_WORLD_LOCAL_SIZE"},
      {"srun", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_TASKS_PER_NODE"},
  };
  const Scheme* found = nullptr;
  for (const Scheme& s : schemes) {
    if (env(s.rank) && env(s.size)) {
      found = &s;
      break;
    }
  }
  if (found == nullptr) {
    r.source = "single process";
    return r;
  }
  r.source = found->source;
  r.world_size = env_int(found->size, *env(found->size), 1, 1 << 20);
  r.rank = env_int(found->rank, *env(found->rank), 0, r.world_size - 1);
  r.local_rank = env(found->local_rank) ? env_int(found->local_rank, *env(found->local_rank), 0, r.world_size - 1) : 0;
  if (auto ls = env(found->local_size)) {
    // SLURM_TASKS_PER_NODE reads like "4(x2),3": this node's count is not known, the first is used.
    const std::string head = ls->substr(0, ls->find_first_of("(,"));
    r.local_world_size = env_int(found->local_size, head, 1, r.world_size);
  } else {
    r.local_world_size = r.world_size;
  }
  if (r.local_rank >= r.local_world_size) {
    throw Error("{}={} is outside the {} local ranks ({})", found->local_rank, r.local_rank, r.local_world_size,
                found->local_size);
  }
  if (auto addr = env("MASTER_ADDR")) r.master_addr = *addr;
  const auto [id_name, id] = pick({"ZINF_JOB_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "OMPI_MCA_ess_base_jobid"});
  (void)id_name;
  if (id) r.job_id = "zinf-" + *id;
  if (auto port = env("MASTER_PORT")) r.master_port = env_int("MASTER_PORT", *port, 1, 65535);
  return r;
}

std::unique_ptr<Communicator> make_gloo_communicator(const RankInfo& info, const GlooOptions& options) {
  if (info.world_size == 1) return make_single_communicator();
  std::unique_ptr<StoreServer> server;
  if (info.rank == 0) server = std::make_unique<StoreServer>(info.master_port, options.timeout);
  auto store = std::make_shared<TcpStore>(info.master_addr, info.master_port, info.rank, options.timeout);
  // Bind Gloo's transport to the interface that reaches rank 0 (loopback for a local job).
  std::string bind = options.interface_address;
  if (bind.empty()) bind = (info.master_addr == "localhost") ? "127.0.0.1" : info.master_addr;
  if (options.interface_address.empty() && info.rank != 0 && bind != "127.0.0.1") {
    // On another host, bind to whatever address this host reaches rank 0 from.
    sockaddr_in local{};
    socklen_t len = sizeof(local);
    int probe = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    addrinfo hints{};
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_DGRAM;
    addrinfo* res = nullptr;
    if (probe >= 0 && ::getaddrinfo(info.master_addr.c_str(), "9", &hints, &res) == 0) {
      if (::connect(probe, res->ai_addr, res->ai_addrlen) == 0 &&
          ::getsockname(probe, reinterpret_cast<sockaddr*>(&local), &len) == 0) {
        char buf[INET_ADDRSTRLEN] = {};
        ::inet_ntop(AF_INET, &local.sin_addr, buf, sizeof(buf));
        bind = buf;
      }
      ::freeaddrinfo(res);
    }
    if (probe >= 0) ::close(probe);
  }
  // Keys carry the job id: ranks of another job that reach this store (the same port) cannot
  // overwrite this job's addresses.
  auto prefixed = std::make_shared<gloo::rendezvous::PrefixStore>(info.job_id, *store);
  auto keep = std::make_shared<std::pair<std::shared_ptr<TcpStore>, std::shared_ptr<gloo::rendezvous::PrefixStore>>>(
      store, prefixed);
  return std::make_unique<GlooCommunicator>(info.rank, info.world_size, *prefixed, bind, options.timeout,
                                            std::move(server), std::shared_ptr<void>(keep));
}

std::unique_ptr<Communicator> make_gloo_communicator_in_process(int rank, int size, const std::string& store_id,
                                                               const GlooOptions& options) {
  auto store = shared_store(store_id);
  auto& store_ref = *store;
  return std::make_unique<GlooCommunicator>(rank, size, store_ref, "127.0.0.1", options.timeout, nullptr,
                                            std::shared_ptr<void>(store));
}

std::unique_ptr<Communicator> make_single_communicator() { return std::make_unique<SingleCommunicator>(); }

}  // namespace zinf::runtime
