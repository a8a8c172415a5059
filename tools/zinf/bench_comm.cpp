// `zinf bench comm`: all-reduce, all-gather and reduce-scatter between the ranks of a job (run under
// `zinf launch`), over Gloo (host memory) or NCCL (one GPU per rank).
#include <chrono>
#include <cmath>
#include <iostream>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/runtime/comm.hpp"
#include "zinf/runtime/nccl_comm.hpp"

namespace zinf::tools {
namespace {

using Clock = std::chrono::steady_clock;

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

void add_bench_comm_command(CLI::App& bench, Action& action) {
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
