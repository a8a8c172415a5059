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

}  // namespace

void add_launch_commands(CLI::App& app, Action& action) {
  auto o = std::make_shared<LaunchOptions>();
  CLI::App* cmd = app.add_subcommand("launch", "run N local ranks of a command (torchrun-style variables)");
  cmd->add_option("--nproc", o->nproc, "ranks to start (default 1)")->check(CLI::Range(1, 1024));
  cmd->add_option("--master-port", o->master_port, "rendezvous port (default: a free one)")->check(CLI::Range(1, 65535));
  cmd->add_option("--grace", o->grace_seconds, "seconds the other ranks get after one fails, before SIGKILL (default 10)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--no-affinity", o->no_affinity, "do not divide the CPU cores among the ranks");
  cmd->add_option("command", o->command, "the command each rank runs (after --)")->required();
  cmd->callback([o, &action] { action = [o] { return run_launch(*o); }; });
}

}  // namespace zinf::tools
