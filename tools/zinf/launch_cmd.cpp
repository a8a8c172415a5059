// `zinf launch --nproc N -- COMMAND...`: N local ranks of COMMAND with torchrun's variables, the
// CPU cores divided among them, signals forwarded, and the whole job ended with the failing
// rank's status when one rank fails. Also `zinf bench comm`: collectives between the ranks.
#include <netinet/in.h>
#include <sched.h>
#include <sys/prctl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <iostream>
#include <set>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/runtime/comm.hpp"
#include "zinf/runtime/nccl_comm.hpp"

namespace zinf::tools {
namespace {

using Clock = std::chrono::steady_clock;

std::atomic<int> g_signal{0};
std::atomic<int> g_signal_count{0};

extern "C" void on_launch_signal(int sig) {
  g_signal.store(sig);
  g_signal_count.fetch_add(1);
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw Error("cannot pick a port: {}", errno_text(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    const int e = errno;
    ::close(fd);
    throw Error("cannot pick a port: {}", errno_text(e));
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with code {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return fmt::format("was killed by signal {} ({})", WTERMSIG(status), ::strsignal(WTERMSIG(status)));
  return "stopped";
}

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

struct LaunchOptions {
  int nproc = 1;
  int master_port = 0;
  double grace_seconds = 10;
  bool no_affinity = false;
  std::vector<std::string> command;
};

int run_launch(const LaunchOptions& o) {
  if (o.command.empty()) throw Error("zinf launch: no command (usage: zinf launch --nproc N -- COMMAND ...)");
  const int port = o.master_port > 0 ? o.master_port : free_port();
  // The CPUs this process may use, cut into nproc contiguous groups.
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  std::vector<int> cpus;
  if (::sched_getaffinity(0, sizeof(allowed), &allowed) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
    }
  }
  const bool split = !o.no_affinity && static_cast<int>(cpus.size()) >= o.nproc;
  const int per_rank = split ? static_cast<int>(cpus.size()) / o.nproc : 0;

  struct sigaction sa {};
  sa.sa_handler = on_launch_signal;
  ::sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGHUP, &sa, nullptr);

  // Each rank's environment, built before fork (the child only calls async-signal-safe functions).
  std::vector<pid_t> pids(static_cast<std::size_t>(o.nproc), -1);
  std::vector<std::string> args = o.command;
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string job_id = fmt::format("{}-{}", ::getpid(), port);
  std::vector<std::vector<std::string>> envs(static_cast<std::size_t>(o.nproc));
  std::vector<std::vector<char*>> envps(static_cast<std::size_t>(o.nproc));
  const std::set<std::string> ours = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                      "MASTER_PORT", "ZINF_JOB_ID"};
  for (int r = 0; r < o.nproc; ++r) {
    auto& e = envs[static_cast<std::size_t>(r)];
    bool omp_set = false;
    for (char** v = environ; *v != nullptr; ++v) {
      const std::string kv(*v);
      const std::string key = kv.substr(0, kv.find('='));
      if (ours.count(key) > 0) continue;
      if (key == "OMP_NUM_THREADS") omp_set = true;
      e.push_back(kv);
    }
    e.push_back(fmt::format("RANK={}", r));
    e.push_back(fmt::format("LOCAL_RANK={}", r));
    e.push_back(fmt::format("WORLD_SIZE={}", o.nproc));
    e.push_back(fmt::format("LOCAL_WORLD_SIZE={}", o.nproc));
    e.push_back("MASTER_ADDR=127.0.0.1");
    e.push_back(fmt::format("MASTER_PORT={}", port));
    e.push_back(fmt::format("ZINF_JOB_ID={}", job_id));
    if (split && !omp_set) e.push_back(fmt::format("OMP_NUM_THREADS={}", per_rank));
    for (auto& kv : e) envps[static_cast<std::size_t>(r)].push_back(kv.data());
    envps[static_cast<std::size_t>(r)].push_back(nullptr);
  }
  const std::string cannot_run = fmt::format("zinf launch: cannot run '{}'\n", args[0]);
  sigset_t block, old;
  ::sigemptyset(&block);
  ::sigaddset(&block, SIGINT);
  ::sigaddset(&block, SIGTERM);
  ::sigaddset(&block, SIGHUP);
  const pid_t launcher = ::getpid();
  for (int r = 0; r < o.nproc; ++r) {
    // Signals wait until the child has its own handlers and process group.
    ::sigprocmask(SIG_BLOCK, &block, &old);
    const pid_t pid = ::fork();
    if (pid < 0) {
      const int e = errno;
      ::sigprocmask(SIG_SETMASK, &old, nullptr);
      for (pid_t p : pids) {
        if (p > 0) {
          ::kill(-p, SIGKILL);
          ::waitpid(p, nullptr, 0);
        }
      }
      throw Error("zinf launch: fork for rank {}: {}", r, errno_text(e));
    }
    if (pid == 0) {
      ::setpgid(0, 0);  // signals reach a rank only through the launcher
      struct sigaction dfl {};
      dfl.sa_handler = SIG_DFL;
      ::sigaction(SIGINT, &dfl, nullptr);
      ::sigaction(SIGTERM, &dfl, nullptr);
      ::sigaction(SIGHUP, &dfl, nullptr);
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // a launcher that dies takes its ranks along
      if (::getppid() != launcher) ::_exit(1);
      ::sigprocmask(SIG_SETMASK, &old, nullptr);
      if (split) {
        cpu_set_t mine;
        CPU_ZERO(&mine);
        for (int i = 0; i < per_rank; ++i) CPU_SET(cpus[static_cast<std::size_t>(r * per_rank + i)], &mine);
        ::sched_setaffinity(0, sizeof(mine), &mine);
      }
      ::execvpe(argv[0], argv.data(), envps[static_cast<std::size_t>(r)].data());
      ssize_t ignored = ::write(STDERR_FILENO, cannot_run.data(), cannot_run.size());
      (void)ignored;
      ::_exit(127);
    }
    ::setpgid(pid, pid);  // also here, so that a signal right after fork finds the group
    ::sigprocmask(SIG_SETMASK, &old, nullptr);
    pids[static_cast<std::size_t>(r)] = pid;
  }
  std::cerr << fmt::format("zinf launch: {} ranks of '{}' (MASTER_PORT {}{})\n", o.nproc, fmt::join(o.command, " "), port,
                           split ? fmt::format(", {} CPUs each", per_rank) : std::string());

  int result = 0;
  int alive = o.nproc;
  int forwarded = 0;
  bool failing = false;
  Clock::time_point kill_at{};
  std::vector<int> status(static_cast<std::size_t>(o.nproc), 0);
  auto signal_all = [&](int sig) {
    for (int r = 0; r < o.nproc; ++r) {
      // The rank's whole process group: a shell rank's children get it too.
      if (pids[static_cast<std::size_t>(r)] > 0) ::kill(-pids[static_cast<std::size_t>(r)], sig);
    }
  };
  while (alive > 0) {
    // Forward signals: the first asks every rank to stop (they save and exit); another kills.
    const int count = g_signal_count.load();
    if (count > forwarded) {
      if (count == 1) {
        std::cerr << fmt::format("zinf launch: forwarding {} to every rank\n", ::strsignal(g_signal.load()));
        signal_all(g_signal.load());
      } else {
        std::cerr << "zinf launch: second signal: killing every rank\n";
        signal_all(SIGKILL);
      }
      forwarded = count;
    }
    int st = 0;
    const pid_t pid = ::waitpid(-1, &st, WNOHANG);
    if (pid > 0) {
      for (int r = 0; r < o.nproc; ++r) {
        if (pids[static_cast<std::size_t>(r)] != pid) continue;
        pids[static_cast<std::size_t>(r)] = -1;
        --alive;
        const bool ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
        if (!ok && !failing && forwarded == 0) {
          failing = true;
          result = exit_code_of(st);
          std::cerr << fmt::format("zinf launch: rank {} {}; stopping the other {} rank(s)\n", r, describe_status(st),
                                   alive);
          signal_all(SIGTERM);
          kill_at = Clock::now() + std::chrono::milliseconds(static_cast<long>(o.grace_seconds * 1000));
        } else if (!ok && result == 0 && !failing) {
          result = exit_code_of(st);
        }
      }
      continue;
    }
    if (failing && alive > 0 && Clock::now() > kill_at) {
      std::cerr << fmt::format("zinf launch: {} rank(s) still running {:.0f} s after SIGTERM: killing them\n", alive,
                               o.grace_seconds);
      signal_all(SIGKILL);
      kill_at = Clock::now() + std::chrono::hours(1);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return result;
}

struct BenchCommOptions {
  std::string backend = "gloo";
  std::string size_text = "64M";
  int iterations = 5;
  bool json = false;
};

// Collectives between the ranks of this job: checks each result, then times them.
int run_bench_comm(const BenchCommOptions& o) {
  const runtime::RankInfo info = runtime::rank_info_from_environment();
  const bool gpu = o.backend == "nccl";
  // NCCL ranks (one GPU each, LOCAL_RANK's) are bootstrapped over Gloo.
  auto boot = runtime::make_gloo_communicator(info);
  std::unique_ptr<runtime::Communicator> nccl;
  if (gpu) nccl = runtime::make_nccl_communicator(*boot, info.local_rank);
  runtime::Communicator* comm = gpu ? nccl.get() : boot.get();
  const int w = comm->size(), r = comm->rank();
  const std::size_t n = parse_size(o.size_text, "--size") / sizeof(float) / static_cast<std::size_t>(w) *
                        static_cast<std::size_t>(w);
  if (n == 0) throw Error("--size {} is too small for {} ranks", o.size_text, w);
  std::vector<float> host_buf(n), host_shard(gpu ? 0 : n / static_cast<std::size_t>(w));
  runtime::DeviceFloats dev_buf, dev_shard;
  if (gpu) {
    dev_buf = runtime::DeviceFloats(n);
    dev_shard = runtime::DeviceFloats(n / static_cast<std::size_t>(w));
  }
  const std::span<float> buf = gpu ? dev_buf.span() : std::span<float>(host_buf);
  const std::span<float> shard = gpu ? dev_shard.span() : std::span<float>(host_shard);
  // Correctness first: the sum of (rank + 1) over ranks.
  std::fill(host_buf.begin(), host_buf.end(), static_cast<float>(r + 1));
  if (gpu) dev_buf.upload(host_buf.data(), n);
  comm->all_reduce_sum(buf);
  if (gpu) dev_buf.download(host_buf.data(), n);
  const float want = static_cast<float>(w * (w + 1) / 2);
  for (const float x : host_buf) {
    if (x != want) throw Error("rank {}: all-reduce gave {} where {} was expected", r, x, want);
  }
  auto time = [&](auto&& f) {
    double best = 1e30;
    for (int i = 0; i < o.iterations; ++i) {
      comm->barrier();
      const auto t0 = Clock::now();  // each collective returns once its result is in place
      f();
      best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
    }
    // The slowest rank's best time is the collective's.
    std::vector<float> all(static_cast<std::size_t>(w));
    const float mine = static_cast<float>(best);
    boot->all_gather(std::span<const float>(&mine, 1), all);
    return static_cast<double>(*std::max_element(all.begin(), all.end()));
  };
  const double bytes = static_cast<double>(n) * sizeof(float);
  const double t_ar = time([&] { comm->all_reduce_sum(buf); });
  const double t_ag = time([&] { comm->all_gather(std::span<const float>(buf.data(), shard.size()), buf); });
  const double t_rs = time([&] { comm->reduce_scatter_sum(buf, shard); });
  // Bus bandwidth as NCCL's tests define it: all-reduce moves 2(w-1)/w of the buffer per rank, the
  // others (w-1)/w.
  const double f2 = 2.0 * (w - 1) / w, f1 = static_cast<double>(w - 1) / w;
  if (r == 0) {
    if (o.json) {
      nlohmann::json j{{"ranks", w},
                       {"backend", o.backend},
                       {"bytes", bytes},
                       {"all_reduce", {{"seconds", t_ar}, {"bus_GBps", bytes * f2 / t_ar / 1e9}}},
                       {"all_gather", {{"seconds", t_ag}, {"bus_GBps", bytes * f1 / t_ag / 1e9}}},
                       {"reduce_scatter", {{"seconds", t_rs}, {"bus_GBps", bytes * f1 / t_rs / 1e9}}}};
      std::cout << j.dump(2) << "\n";
    } else {
      std::cout << fmt::format("zinf bench comm: {} ranks ({}, {}), {:.1f} MiB per collective, best of {}; results "
                               "checked\n",
                               w, gpu ? "NCCL " + runtime::nccl_version() + ", one GPU each" : std::string("Gloo over TCP"),
                               info.source, bytes / (1 << 20), o.iterations)
                << fmt::format("all-reduce      {:8.4f} s  bus {:6.2f} GB/s\n", t_ar, bytes * f2 / t_ar / 1e9)
                << fmt::format("all-gather      {:8.4f} s  bus {:6.2f} GB/s\n", t_ag, bytes * f1 / t_ag / 1e9)
                << fmt::format("reduce-scatter  {:8.4f} s  bus {:6.2f} GB/s\n", t_rs, bytes * f1 / t_rs / 1e9);
    }
  }
  comm->barrier();
  return kExitOk;
}

}  // namespace

void add_launch_commands(CLI::App& app, CLI::App& bench, Action& action) {
  auto o = std::make_shared<LaunchOptions>();
  CLI::App* cmd = app.add_subcommand("launch", "run N local ranks of a command (torchrun-style variables)");
  cmd->add_option("--nproc", o->nproc, "ranks to start (default 1)")->check(CLI::Range(1, 1024));
  cmd->add_option("--master-port", o->master_port, "rendezvous port (default: a free one)")->check(CLI::Range(1, 65535));
  cmd->add_option("--grace", o->grace_seconds, "seconds the other ranks get after one fails, before SIGKILL (default 10)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--no-affinity", o->no_affinity, "do not divide the CPU cores among the ranks");
  cmd->add_option("command", o->command, "the command each rank runs (after --)")->required();
  cmd->callback([o, &action] { action = [o] { return run_launch(*o); }; });

  auto b = std::make_shared<BenchCommOptions>();
  CLI::App* bc = bench.add_subcommand("comm", "all-reduce, all-gather and reduce-scatter between ranks (under zinf launch)");
  bc->add_option("--backend", b->backend, "gloo (CPU ranks, host memory; default) or nccl (one GPU per rank, LOCAL_RANK's)")
      ->check(CLI::IsMember({"gloo", "nccl"}));
  bc->add_option("--size", b->size_text, "bytes per collective (default 64M)");
  bc->add_option("--iterations", b->iterations, "timed repetitions, best kept (default 5)")->check(CLI::Range(1, 1000));
  bc->add_flag("--json", b->json, "one JSON object (rank 0)");
  bc->callback([b, &action] { action = [b] { return run_bench_comm(*b); }; });
}

}  // namespace zinf::tools
