// Collectives between ranks (threads of this process, over Gloo's TCP transport), the TCP
// rendezvous, a rank that never arrives, and the launcher environment.
#include <gtest/gtest.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "zinf/common/error.hpp"
#include "zinf/runtime/comm.hpp"

namespace zinf::runtime {
namespace {

// Runs body(comm) on `w` thread ranks; rethrows the first failure.
void on_ranks(int w, const std::function<std::unique_ptr<Communicator>(int)>& make,
              const std::function<void(Communicator&)>& body) {
  std::vector<std::thread> threads;
  std::vector<std::string> errors(static_cast<std::size_t>(w));
  for (int r = 0; r < w; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto c = make(r);
        body(*c);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < w; ++r) EXPECT_EQ(errors[static_cast<std::size_t>(r)], "") << "rank " << r;
}

void check_collectives(Communicator& c) {
  const int w = c.size(), r = c.rank();
  // all-reduce of small integers: exact.
  std::vector<float> a(37);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(r * 100 + static_cast<int>(i));
  c.all_reduce_sum(a);
  for (std::size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i], static_cast<float>(100 * w * (w - 1) / 2 + w * static_cast<int>(i)));
  }
  // all-gather in rank order.
  std::vector<float> mine(5, static_cast<float>(r)), all(5 * static_cast<std::size_t>(w));
  c.all_gather(mine, all);
  for (int q = 0; q < w; ++q) {
    for (int i = 0; i < 5; ++i) ASSERT_EQ(all[static_cast<std::size_t>(q * 5 + i)], static_cast<float>(q));
  }
  // reduce-scatter: this rank's shard of the sum.
  std::vector<float> full(8 * static_cast<std::size_t>(w)), shard(8);
  for (std::size_t i = 0; i < full.size(); ++i) full[i] = static_cast<float>(i + static_cast<std::size_t>(r));
  c.reduce_scatter_sum(full, shard);
  for (std::size_t i = 0; i < 8; ++i) {
    const auto gi = static_cast<std::size_t>(r) * 8 + i;
    ASSERT_EQ(shard[i], static_cast<float>(w * static_cast<int>(gi) + w * (w - 1) / 2));
  }
  EXPECT_THROW(c.reduce_scatter_sum(std::vector<float>(static_cast<std::size_t>(w) * 8 + 1), shard), Error);
  // broadcast from the last rank.
  std::vector<float> b(11, static_cast<float>(r));
  c.broadcast(b, w - 1);
  for (const float x : b) ASSERT_EQ(x, static_cast<float>(w - 1));
  // Random floats: every rank ends with the same bits.
  std::mt19937 rng(static_cast<unsigned>(r + 1));
  std::normal_distribution<float> nd;
  std::vector<float> x(1000);
  for (float& v : x) v = nd(rng);
  c.all_reduce_sum(x);
  std::vector<float> gathered(x.size() * static_cast<std::size_t>(w));
  c.all_gather(x, gathered);
  for (int q = 1; q < w; ++q) {
    ASSERT_EQ(0, std::memcmp(gathered.data(), gathered.data() + static_cast<std::size_t>(q) * x.size(), x.size() * 4));
  }
  c.barrier();
}

TEST(Comm, CollectivesOnTwoAndFourThreadRanks) {
  for (const int w : {2, 4}) {
    const std::string id = "collectives-" + std::to_string(w);
    on_ranks(w, [&](int r) { return make_gloo_communicator_in_process(r, w, id); }, check_collectives);
  }
}

TEST(Comm, ASplitChannelRunsCollectivesBesideItsParent) {
  // The stage-3 prefetcher gathers on a split channel while the compute thread reduces on the
  // parent: both streams of collectives run at once and each gives exact results. Also a
  // reduce-scatter of 3 x 100k random floats against the all-reduce's sums.
  on_ranks(3, [](int r) { return make_gloo_communicator_in_process(r, 3, "split"); }, [](Communicator& c) {
    auto child = c.split("gather");
    ASSERT_EQ(child->rank(), c.rank());
    ASSERT_EQ(child->size(), 3);
    std::string child_error;
    std::thread t([&] {
      try {
        for (int k = 0; k < 50; ++k) {
          std::vector<float> mine(1000, static_cast<float>(c.rank() + k)), all(3000);
          child->all_gather(mine, all);
          for (int q = 0; q < 3; ++q) {
            if (all[static_cast<std::size_t>(q) * 1000 + 999] != static_cast<float>(q + k)) throw Error("gather {} wrong", k);
          }
        }
      } catch (const std::exception& e) {
        child_error = e.what();
      }
    });
    for (int k = 0; k < 50; ++k) {
      std::vector<float> v(3000, 1.0f), shard(1000);
      c.reduce_scatter_sum(v, shard);
      ASSERT_EQ(shard[0], 3.0f);
      ASSERT_EQ(shard[999], 3.0f);
    }
    t.join();
    ASSERT_EQ(child_error, "");
    std::mt19937 rng(static_cast<unsigned>(c.rank() + 5));
    std::normal_distribution<float> nd;
    std::vector<float> x(300000);
    for (float& v : x) v = nd(rng);
    std::vector<float> sum = x, shard(100000);
    c.all_reduce_sum(sum);
    c.reduce_scatter_sum(x, shard);
    for (std::size_t i = 0; i < shard.size(); ++i) {
      ASSERT_NEAR(shard[i], sum[static_cast<std::size_t>(c.rank()) * shard.size() + i], 1e-5f) << i;
    }
  });
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

TEST(Comm, TcpRendezvousLikeTorchrun) {
  const int port = free_port();
  on_ranks(
      3,
      [&](int r) {
        RankInfo info;
        info.rank = r;
        info.world_size = 3;
        info.master_addr = "127.0.0.1";
        info.master_port = port;
        return make_gloo_communicator(info);
      },
      check_collectives);
}

TEST(Comm, ARankThatNeverArrivesIsAnErrorNotAHang) {
  RankInfo info;
  info.rank = 0;
  info.world_size = 2;
  info.master_port = free_port();
  GlooOptions o;
  o.timeout = std::chrono::seconds(2);
  const auto t0 = std::chrono::steady_clock::now();
  try {
    make_gloo_communicator(info, o);
    ADD_FAILURE() << "rank 0 connected alone";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(20));
  // A rank whose rank 0 never comes up.
  info.rank = 1;
  info.master_port = free_port();
  EXPECT_THROW(make_gloo_communicator(info, o), Error);
}

// A rank whose peer has gone (its process died, or its thread's communicator was destroyed) gets
// an error from its next collectives: never a SIGPIPE that kills the process without a word.
TEST(Comm, APeerThatLeftIsAnErrorNotASignal) {
  GlooOptions o;
  o.timeout = std::chrono::seconds(5);
  std::unique_ptr<Communicator> c0, c1;
  std::thread t([&] { c1 = make_gloo_communicator_in_process(1, 2, "peer-left", o); });
  c0 = make_gloo_communicator_in_process(0, 2, "peer-left", o);
  t.join();
  c1.reset();  // rank 1 leaves
  int errors = 0;
  std::string last;
  for (int i = 0; i < 8; ++i) {
    std::vector<float> big(1 << 18, 1.0f);
    try {
      c0->all_reduce_sum(big);
    } catch (const std::exception& e) {
      ++errors;
      last = e.what();
    }
  }
  EXPECT_EQ(errors, 8) << last;
}

class EnvGuard {
 public:
  explicit EnvGuard(std::vector<std::pair<const char*, const char*>> vars) {
    for (const char* n : kAll) ::unsetenv(n);
    for (const auto& [n, v] : vars) ::setenv(n, v, 1);
  }
  ~EnvGuard() {
    for (const char* n : kAll) ::unsetenv(n);
  }
  static constexpr const char* kAll[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                         "MASTER_PORT", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                         "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_PROCID",
                                         "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_TASKS_PER_NODE",
                                         "SLURM_JOB_ID", "ZINF_JOB_ID", "ZINF_COMM_TIMEOUT"};
};

TEST(Comm, RankInfoFromTheLaunchersEnvironment) {
  {
    EnvGuard g({});
    const RankInfo r = rank_info_from_environment();
    EXPECT_EQ(r.world_size, 1);
    EXPECT_EQ(r.source, "single process");
  }
  {
    EnvGuard g({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"},
                {"MASTER_ADDR", "node7"}, {"MASTER_PORT", "1234"}});
    const RankInfo r = rank_info_from_environment();
    EXPECT_EQ(r.source, "torchrun");
    EXPECT_EQ(r.rank, 3);
    EXPECT_EQ(r.world_size, 8);
    EXPECT_EQ(r.local_rank, 1);
    EXPECT_EQ(r.local_world_size, 2);
    EXPECT_EQ(r.master_addr, "node7");
    EXPECT_EQ(r.master_port, 1234);
  }
  {
    EnvGuard g({{"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "4"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "0"}});
    const RankInfo r = rank_info_from_environment();
    EXPECT_EQ(r.source, "mpirun");
    EXPECT_EQ(r.rank, 2);
    EXPECT_EQ(r.local_world_size, 4);
  }
  {
    EnvGuard g({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
                {"SLURM_TASKS_PER_NODE", "4(x2)"}, {"SLURM_JOB_ID", "777"}, {"MASTER_ADDR", "10.0.0.2"}});
    const RankInfo r = rank_info_from_environment();
    EXPECT_EQ(r.source, "srun");
    EXPECT_EQ(r.local_world_size, 4);
    EXPECT_EQ(r.master_addr, "10.0.0.2");
    EXPECT_EQ(r.job_id, "zinf-777");
  }
  {
    EnvGuard g({{"RANK", "4"}, {"WORLD_SIZE", "4"}});
    EXPECT_THROW(rank_info_from_environment(), Error);
  }
  {
    EnvGuard g({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "http"}});
    EXPECT_THROW(rank_info_from_environment(), Error);
  }
  {
    EnvGuard g(std::vector<std::pair<const char*, const char*>>{{"ZINF_COMM_TIMEOUT", "2.5"}});
    EXPECT_EQ(default_comm_timeout(), std::chrono::milliseconds(2500));
  }
  {
    EnvGuard g(std::vector<std::pair<const char*, const char*>>{{"ZINF_COMM_TIMEOUT", "soon"}});
    EXPECT_THROW(default_comm_timeout(), Error);
  }
}

TEST(Comm, OneRankIsACopy) {
  auto c = make_single_communicator();
  std::vector<float> in{1, 2, 3}, out(3);
  c->all_gather(in, out);
  EXPECT_EQ(out, in);
  c->reduce_scatter_sum(in, out);
  EXPECT_EQ(out, in);
  c->all_reduce_sum(in);
  c->barrier();
  EXPECT_EQ(in, (std::vector<float>{1, 2, 3}));
  // A Gloo group of one rank behaves the same.
  auto g = make_gloo_communicator_in_process(0, 1, "one-rank");
  std::vector<float> out2(3);
  g->reduce_scatter_sum(in, out2);
  EXPECT_EQ(out2, in);
  g->all_gather(in, out2);
  EXPECT_EQ(out2, in);
}

}  // namespace
}  // namespace zinf::runtime
