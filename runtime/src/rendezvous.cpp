// The ranks' meeting point: the launcher's environment (rank_info_from_environment), and the
// TCP key-value store that rank 0 serves on MASTER_ADDR:MASTER_PORT, through which the ranks
// exchange their Gloo addresses (the role torchrun's TCPStore plays); an in-process store for
// ranks that are threads (tests). Every wait has a timeout, so a rank that died ends the job with
// an error instead of a hang.
#include "rendezvous.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gloo/rendezvous/hash_store.h>
#include <gloo/rendezvous/prefix_store.h>

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


// The address Gloo's transport binds to: the option's, else the interface that reaches rank 0
// (loopback for a local job; on another host, whatever address this host reaches rank 0 from).
std::string bind_address(const RankInfo& info, const GlooOptions& options) {
  if (!options.interface_address.empty()) return options.interface_address;
  std::string bind = info.master_addr == "localhost" ? "127.0.0.1" : info.master_addr;
  if (info.rank == 0 || bind == "127.0.0.1") return bind;
  sockaddr_in local{};
  socklen_t len = sizeof(local);
  const int probe = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
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
  return bind;
}

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

Rendezvous tcp_rendezvous(const RankInfo& info, const GlooOptions& options) {
  // Rank 0 serves the store; every rank connects to it.
  struct Parts {
    std::unique_ptr<StoreServer> server;
    std::shared_ptr<TcpStore> store;
    std::shared_ptr<gloo::rendezvous::PrefixStore> prefixed;
  };
  auto parts = std::make_shared<Parts>();
  if (info.rank == 0) parts->server = std::make_unique<StoreServer>(info.master_port, options.timeout);
  parts->store = std::make_shared<TcpStore>(info.master_addr, info.master_port, info.rank, options.timeout);
  // Keys carry the job id: ranks of another job that reach this store (the same port) cannot
  // overwrite this job's addresses.
  parts->prefixed = std::make_shared<gloo::rendezvous::PrefixStore>(info.job_id, *parts->store);
  Rendezvous r;
  r.store = parts->prefixed.get();
  r.bind = bind_address(info, options);
  r.keep_alive = parts;
  return r;
}

Rendezvous in_process_rendezvous(const std::string& id) {
  auto store = shared_store(id);
  Rendezvous r;
  r.store = store.get();
  r.bind = "127.0.0.1";
  r.keep_alive = store;
  return r;
}

}  // namespace zinf::runtime
