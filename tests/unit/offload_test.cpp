// Offload: host memory accounting and preflight, the partition store's placement, the pipelined
// optimizer step (bit-identical to the kernel on whole arrays for every placement of state and
// parameters, with or without overlap, in default and exact mode), late gradients, faults (a
// corrupt extent, an I/O error mid-step), and the mapping from a DeepSpeed config.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <oneapi/tbb/task_arena.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>

#include "io_test_util.hpp"
#include "zinf/io/engine.hpp"
#include "zinf/io/swap_store.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/kernels/half.hpp"
#include "zinf/configs/parse.hpp"
#include "zinf/offload/host_memory.hpp"
#include "zinf/offload/offload.hpp"
#include "zinf/offload/optimizer_step.hpp"
#include "zinf/offload/partition_store.hpp"

namespace zinf::offload {
namespace {

namespace kc = kernels::cpu;
using io::testing::ScratchDir;

TEST(HostMemory, AccountsPerPurposeAndEnforcesTheBudget) {
  HostMemory mem(1u << 20, PinMode::kPageable);
  {
    HostBuffer a = mem.allocate(Purpose::kOptimizerState, 100000, "state");
    EXPECT_EQ(a.size(), 102400u);  // rounded up to 4 KiB
    HostBuffer b = mem.allocate(Purpose::kStaging, 4096, "staging");
    EXPECT_EQ(mem.used(Purpose::kOptimizerState), 102400u);
    EXPECT_EQ(mem.used(), 102400u + 4096u);
    EXPECT_IO_ERROR(mem.allocate(Purpose::kGradients, 1u << 20, "grads"), "budget", "optimizer state", "grads");
    EXPECT_EQ(mem.used(), 102400u + 4096u);  // the refused allocation left no trace
    HostMemoryPlan plan;
    plan.add(Purpose::kParameters, 2u << 20);
    EXPECT_IO_ERROR(mem.preflight(plan), "exceeds the budget", "parameter shards 2.00 MiB");
  }
  EXPECT_EQ(mem.used(), 0u);
}

TEST(HostMemory, PageLockedAllocationsWork) {
  HostMemory mem(0, PinMode::kLocked);
  if (!can_lock_unlimited() && memlock_limit_bytes() < (8u << 20)) {
    GTEST_SKIP() << "the memlock limit here is below 8 MiB and this user cannot raise it";
  }
  HostBuffer b = mem.allocate(Purpose::kStaging, 8u << 20, "staging");
  std::memset(b.data(), 1, b.size());
  EXPECT_EQ(mem.used(Purpose::kStaging), 8u << 20);
  EXPECT_NE(mem.report().find("page-locked"), std::string::npos);
}

TEST(HostMemory, PinsWithCudaWhenAGpuIsVisible) {
  const PinMode mode = default_pin_mode(true);
  EXPECT_EQ(default_pin_mode(false), PinMode::kPageable);
  if (mode != PinMode::kCudaHost) {
    GTEST_SKIP() << "no GPU visible to this process (or a build without CUDA): pinned memory comes from mlock here";
  }
  HostMemory mem(0, mode);
  HostBuffer b = mem.allocate(Purpose::kStaging, 64u << 20, "staging");
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b.data()) % 4096, 0u);
  std::memset(b.data(), 7, b.size());
  EXPECT_EQ(b.data()[b.size() - 1], std::byte{7});
  EXPECT_NE(mem.report().find("cudaHostAlloc"), std::string::npos) << mem.report();
  b = HostBuffer();
  EXPECT_EQ(mem.used(), 0u);
}

TEST(HostMemory, APlanThatLeavesTooLittleFreeIsRefused) {
  // The preflight keeps 5% of the machine (at least 4 GiB) free for the rest of the process and the
  // OS: a plan that fits MemAvailable but leaves less is refused, with the numbers, before
  // anything is allocated (not killed by the OOM handler later).
  ::unsetenv("ZINF_HOST_RESERVE_BYTES");
  const std::uint64_t reserve = host_memory_reserve_bytes();
  EXPECT_GE(reserve, 4ull << 30);
  EXPECT_GE(reserve, total_memory_bytes() / 20);
  const std::uint64_t avail = available_memory_bytes();
  ASSERT_GT(avail, reserve / 2);
  HostMemory mem(0, PinMode::kPageable);
  HostMemoryPlan plan;
  plan.add(Purpose::kOptimizerState, avail - reserve / 2);
  EXPECT_IO_ERROR(mem.preflight(plan), "must stay free", "optimizer state");
  EXPECT_EQ(mem.used(), 0u);
  HostMemoryPlan small;
  small.add(Purpose::kOptimizerState, 1u << 20);
  EXPECT_NO_THROW(mem.preflight(small));
  ::setenv("ZINF_HOST_RESERVE_BYTES", "12345", 1);
  EXPECT_EQ(host_memory_reserve_bytes(), 12345u);
  ::setenv("ZINF_HOST_RESERVE_BYTES", "lots", 1);
  EXPECT_IO_ERROR(host_memory_reserve_bytes(), "ZINF_HOST_RESERVE_BYTES='lots'");
  ::setenv("ZINF_HOST_RESERVE_BYTES", "99999999999999999999999", 1);
  EXPECT_IO_ERROR(host_memory_reserve_bytes(), "is not a byte count");
  // Pageable memory counts against what is available, not against the budget.
  HostMemory budgeted(1u << 20, PinMode::kPageable);
  HostMemoryPlan pageable;
  pageable.pageable = 64u << 20;
  ::setenv("ZINF_HOST_RESERVE_BYTES", "0", 1);
  EXPECT_NO_THROW(budgeted.preflight(pageable));
  // (More than the machine has: MemAvailable, read again by the preflight, moves while other tests
  // run beside this one.)
  pageable.pageable = total_memory_bytes() + 1;
  EXPECT_IO_ERROR(budgeted.preflight(pageable), "pageable");
  ::unsetenv("ZINF_HOST_RESERVE_BYTES");
}

TEST(PartitionStore, TheCallersGradientShardsAreInTheStoresPreflight) {
  // The trainer's page-locked gradient shards are allocated after the store: the store's
  // preflight counts them, so a run that cannot hold both is refused before either is allocated.
  const std::vector<UnitSpec> units = {{"a", 1u << 20}};
  HostMemory fits(20u << 20, PinMode::kPageable);  // state 12 MiB + parameters 2 MiB + 4 MiB
  StoreOptions o;
  o.caller_gradient_bytes = 4u << 20;
  EXPECT_NO_THROW(PartitionStore(units, o, fits, nullptr));
  HostMemory tight(16u << 20, PinMode::kPageable);
  EXPECT_IO_ERROR(PartitionStore(units, o, tight, nullptr), "exceeds the budget", "gradients 4.00 MiB");
  EXPECT_EQ(tight.used(), 0u);
}

TEST(HostMemory, MemlockLimitIsReportedBeforeAnythingIsAllocated) {
  const int rc = io::testing::run_unprivileged([] {
    struct rlimit rl {1u << 20, 1u << 20};
    if (::setrlimit(RLIMIT_MEMLOCK, &rl) != 0) return 2;
    HostMemory mem(0, PinMode::kLocked);
    HostMemoryPlan plan;
    plan.add(Purpose::kOptimizerState, 64u << 20);
    try {
      mem.preflight(plan);
      return 3;
    } catch (const Error& e) {
      std::printf("preflight: %s\n", e.what());
      const std::string m = e.what();
      if (m.find("memlock limit is 1.00 MiB") == std::string::npos) return 4;
      if (m.find("ulimit -l unlimited") == std::string::npos) return 5;
    }
    try {
      (void)mem.allocate(Purpose::kStaging, 8u << 20, "staging");
      return 6;
    } catch (const Error& e) {
      std::printf("allocate: %s\n", e.what());
      return std::string(e.what()).find("page-lock") != std::string::npos ? 0 : 7;
    }
  });
  EXPECT_EQ(rc, 0) << "child exit code (3 preflight passed, 4/5 message, 6 allocation passed, 7 message)";
}

// ---------------------------------------------------------------------------------------------
// The optimizer step: every placement gives the same bits.

const std::vector<UnitSpec> kUnits = {{"embed", 100003}, {"layers.0", 4096}, {"head", 777}};

struct Placement {
  double ratio = 0.0;
  bool params_on_nvme = false;
  std::uint64_t max_in_cpu = 0;  // with params_on_nvme
  unsigned buffers = 4;
  StepperOptions stepper;
  bool feed_from_thread = false;  // gradients and the scale arrive from another thread, late
  std::vector<std::size_t> order;
};

Placement place(double ratio, bool params_on_nvme, std::uint64_t max_in_cpu, unsigned buffers,
                StepperOptions stepper = {}) {
  Placement p;
  p.ratio = ratio;
  p.params_on_nvme = params_on_nvme;
  p.max_in_cpu = max_in_cpu;
  p.buffers = buffers;
  p.stepper = stepper;
  return p;
}

struct StepRun {
  std::vector<std::vector<float>> master, m, v;
  std::vector<std::vector<std::uint16_t>> bf16;
  std::vector<std::size_t> done;
};

std::vector<float> init_values(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(-1, 1);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

std::vector<std::uint16_t> grads_for(std::size_t unit, std::size_t n, int step) {
  auto f = init_values(n, 1000 * step + unit);
  // Some subnormal products, where AVX512-BF16 rounding and the portable code differ.
  for (std::size_t i = 0; i < n; i += 97) f[i] *= 1e-30f;
  std::vector<std::uint16_t> g(n);
  kc::convert(f.data(), kc::DType::kF32, g.data(), kc::DType::kBF16, n);
  return g;
}

kc::AdamConfig adam_for(int step) {
  kc::AdamConfig c;
  c.lr = 1e-2;
  c.weight_decay = 0.01;
  c.step = step;
  c.grad_scale = 0.5f;
  return c;
}

io::EngineOptions test_engine() {
  io::EngineOptions eo;
  eo.block_size = 65536;
  eo.queue_depth = 8;
  eo.intra_op_parallelism = 2;
  return eo;
}

// A scratch directory with an engine, a swap store on it and pageable host memory.
struct NvmeScratch {
  explicit NvmeScratch(const io::EngineOptions& eo = io::EngineOptions{}) : engine(eo), swap(engine, {{dir.path()}, 0}) {}
  ScratchDir dir;
  io::IoEngine engine;
  io::SwapStore swap;
  HostMemory mem{0, PinMode::kPageable};
};

// All optimizer state on NVMe, in slices of `slice_elems`, with `buffers` staging buffers.
StoreOptions all_on_nvme(std::uint64_t slice_elems, unsigned buffers = 4) {
  StoreOptions so;
  so.nvme_ratio = 1.0;
  so.slice_elems = slice_elems;
  so.optimizer_buffers = buffers;
  return so;
}

// Every unit of kUnits set to its init_values (moments zero).
void set_initial_state(PartitionStore& store) {
  for (std::size_t u = 0; u < kUnits.size(); ++u) store.set_state(u, init_values(kUnits[u].numel, u));
}

StepRun run_steps(const Placement& pl, const std::string& dir, int steps) {
  io::IoEngine engine(test_engine());
  std::unique_ptr<io::SwapStore> swap;
  if (pl.ratio > 0 || pl.params_on_nvme) swap = std::make_unique<io::SwapStore>(engine, io::SwapStoreOptions{{dir}, 0});
  HostMemory mem(0, PinMode::kPageable);
  StoreOptions so;
  so.nvme_ratio = pl.ratio;
  so.slice_elems = 8192;
  so.optimizer_buffers = pl.buffers;
  so.params_on_nvme = pl.params_on_nvme;
  so.max_in_cpu = pl.max_in_cpu;
  so.param_buffers = 16;
  so.param_buffer_elems = 16384;
  PartitionStore store(kUnits, so, mem, swap.get(), swap.get());
  set_initial_state(store);
  tbb::task_arena arena(2);
  OptimizerStepper stepper(store, arena, pl.stepper);
  StepRun r;
  StepFeed feed(kUnits.size());
  for (int step = 1; step <= steps; ++step) {
    std::vector<std::vector<std::uint16_t>> grads;
    for (std::size_t u = 0; u < kUnits.size(); ++u) grads.push_back(grads_for(u, kUnits[u].numel, step));
    StepInputs in;
    in.adam = adam_for(step);
    in.order = pl.order;
    std::thread backward;
    if (pl.feed_from_thread) {
      feed.reset();
      in.feed_from(feed);
      in.adam.grad_scale = 123.0f;  // must be ignored: the scale comes from the feed
      // Backward order (last unit first), slowly, then the scale once every gradient is in.
      backward = std::thread([&] {
        for (std::size_t u = kUnits.size(); u-- > 0;) {
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
          feed.post_gradient(u, grads[u].data());
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        feed.post_grad_scale(0.5f);
      });
    } else {
      in.gradient = [&](std::size_t u) -> const void* { return grads[u].data(); };
    }
    r.done.clear();
    in.unit_done = [&](std::size_t u) { r.done.push_back(u); };
    const StepStats st = stepper.step(in);
    if (backward.joinable()) backward.join();
    EXPECT_EQ(st.elements, 100003u + 4096u + 777u);
    EXPECT_EQ(st.slices, store.slices().size());
    EXPECT_EQ(st.bytes_read, store.nvme_state_elements() * 12);
    EXPECT_EQ(st.bytes_written, store.nvme_state_elements() * 12 + store.nvme_param_elements() * 2);
  }
  for (std::size_t u = 0; u < kUnits.size(); ++u) {
    const std::size_t n = kUnits[u].numel;
    r.master.emplace_back(n);
    r.m.emplace_back(n);
    r.v.emplace_back(n);
    store.read_state(u, r.master.back(), r.m.back(), r.v.back());
    r.bf16.emplace_back(n);
    ParamLease lease = store.fetch(u);
    lease.copy_to(r.bf16.back());
  }
  return r;
}

void expect_same(const StepRun& a, const StepRun& b, const std::string& what) {
  for (std::size_t u = 0; u < kUnits.size(); ++u) {
    const std::size_t n = kUnits[u].numel;
    EXPECT_EQ(std::memcmp(a.master[u].data(), b.master[u].data(), n * 4), 0) << what << ", unit " << u << " master";
    EXPECT_EQ(std::memcmp(a.m[u].data(), b.m[u].data(), n * 4), 0) << what << ", unit " << u << " exp_avg";
    EXPECT_EQ(std::memcmp(a.v[u].data(), b.v[u].data(), n * 4), 0) << what << ", unit " << u << " exp_avg_sq";
    EXPECT_EQ(a.bf16[u], b.bf16[u]) << what << ", unit " << u << " bf16";
  }
}

// The reference: the kernel on whole arrays, no store, no pipeline.
StepRun reference_run(int steps, bool exact) {
  StepRun r;
  for (std::size_t u = 0; u < kUnits.size(); ++u) {
    const std::size_t n = kUnits[u].numel;
    std::vector<float> p = init_values(n, u), m(n, 0), v(n, 0);
    std::vector<std::uint16_t> out(n);
    for (int step = 1; step <= steps; ++step) {
      const auto g = grads_for(u, n, step);
      kc::Exec exec;
      exec.native_bf16 = !exact;
      kc::adam_step(adam_for(step),
                    {p.data(), g.data(), kc::DType::kBF16, m.data(), v.data(), kc::DType::kF32, out.data(),
                     kc::DType::kBF16, n},
                    exec);
    }
    r.master.push_back(p);
    r.m.push_back(m);
    r.v.push_back(v);
    r.bf16.push_back(out);
  }
  return r;
}

TEST(OptimizerStep, EveryPlacementGivesTheKernelsBits) {
  ScratchDir dir;
  for (const bool exact : {false, true}) {
    StepperOptions so;
    so.exact = exact;
    const StepRun ref = reference_run(3, exact);
    const std::string mode = exact ? "exact" : "default";
    struct Case {
      std::string name;
      Placement p;
    };
    std::vector<Case> cases = {
        {"host", place(0.0, false, 0, 4, so)},
        {"nvme", place(1.0, false, 0, 4, so)},
        {"half on nvme, 2 buffers", place(0.5, false, 0, 2, so)},
        {"nvme, 1 buffer", place(1.0, false, 0, 1, so)},
        {"nvme state and parameters", place(1.0, true, 0, 3, so)},
        {"host state, parameters past max_in_cpu on nvme", place(0.0, true, 100003, 4, so)},
        {"a third on nvme, parameters on nvme", place(0.33, true, 4096, 2, so)},
    };
    StepperOptions serial = so;
    serial.overlap = false;
    cases.push_back({"nvme, overlap off", place(1.0, true, 0, 4, serial)});
    StepperOptions phased = so;
    phased.phased = true;
    cases.push_back({"nvme state and parameters, phased I/O", place(1.0, true, 0, 3, phased)});
    cases.push_back({"a third on nvme, phased I/O, 1 buffer", place(0.33, true, 4096, 1, phased)});
    cases.push_back({"host, phased I/O", place(0.0, false, 0, 2, phased)});
    for (const Case& c : cases) {
      const StepRun r = run_steps(c.p, dir.path(), 3);
      expect_same(r, ref, mode + ": " + c.name);
      EXPECT_EQ(r.done, (std::vector<std::size_t>{0, 1, 2})) << c.name << ": units finish once each, in order";
    }
  }
}

TEST(OptimizerStep, GradientsAndScaleMayArriveWhileTheStepRuns) {
  ScratchDir dir;
  Placement p = place(1.0, true, 4096, 3);
  p.feed_from_thread = true;
  expect_same(run_steps(p, dir.path(), 2), reference_run(2, false), "late gradients");
  p.stepper.phased = true;
  expect_same(run_steps(p, dir.path(), 2), reference_run(2, false), "late gradients, phased I/O");
}

TEST(OptimizerStep, UnitsAreSteppedInTheOrderGiven) {
  ScratchDir dir;
  Placement p = place(1.0, false, 0, 2);
  p.order = {2, 0, 1};
  const StepRun r = run_steps(p, dir.path(), 2);
  EXPECT_EQ(r.done, (std::vector<std::size_t>{2, 0, 1}));
  expect_same(r, reference_run(2, false), "order 2, 0, 1");
}

TEST(OptimizerStep, BadInputsAreClearErrors) {
  HostMemory mem(0, PinMode::kPageable);
  PartitionStore store(kUnits, {}, mem, nullptr);
  tbb::task_arena arena(1);
  OptimizerStepper stepper(store, arena);
  StepInputs in;
  EXPECT_IO_ERROR(stepper.step(in), "no gradient source");
  std::vector<std::uint16_t> g(100003);
  in.gradient = [&](std::size_t) -> const void* { return g.data(); };
  in.order = {0, 7};
  EXPECT_IO_ERROR(stepper.step(in), "unit 7 does not exist");
  in.order = {1, 1};
  EXPECT_IO_ERROR(stepper.step(in), "unit 1 is listed twice");
  // Validation happens before anything is touched: the stepper still works.
  in.order = {};
  EXPECT_NO_THROW(stepper.step(in));
}

TEST(PartitionStore, TheGpusUnitsLeaveMaxInCpuToTheOthers) {
  // With parameters on NVMe, max_in_cpu goes to units in order; units whose compute copy lives on
  // the GPU (the GPU's share of the optimizer) skip it, so the units the CPU steps get it.
  StoreOptions o;
  o.params_on_nvme = true;
  o.slice_elems = 8192;
  o.param_buffers = 16;
  const auto tiers = [&](std::uint64_t max_in_cpu, std::vector<char> gpu_units) {
    NvmeScratch nv(test_engine());
    o.max_in_cpu = max_in_cpu;
    o.gpu_units = std::move(gpu_units);
    PartitionStore store(kUnits, o, nv.mem, nullptr, &nv.swap);
    std::vector<Tier> t;
    for (std::size_t u = 0; u < kUnits.size(); ++u) t.push_back(store.param_tier(u));
    if (store.param_tier(0) == Tier::kNvme) {
      // Its parameters still come back through the staging buffers (the trainer's upload at start).
      store.set_state(0, init_values(kUnits[0].numel, 0));
      std::vector<std::uint16_t> bf(kUnits[0].numel);
      store.fetch(0).copy_to(bf);
      EXPECT_EQ(bf[7], kernels::f32_to_bf16(init_values(kUnits[0].numel, 0)[7]));
    }
    return t;
  };
  using T = std::vector<Tier>;
  EXPECT_EQ(tiers(kUnits[1].numel + kUnits[2].numel, {}), (T{Tier::kNvme, Tier::kHost, Tier::kHost}));
  EXPECT_EQ(tiers(kUnits[0].numel, {}), (T{Tier::kHost, Tier::kNvme, Tier::kNvme}));
  EXPECT_EQ(tiers(kUnits[0].numel, {1, 0, 0}), (T{Tier::kNvme, Tier::kHost, Tier::kHost}));
}

TEST(OptimizerStep, AFailedGradientSourceStopsTheStepAndLaterSteps) {
  NvmeScratch nv(test_engine());
  auto& [dir, engine, swap, mem] = nv;
  PartitionStore store(kUnits, all_on_nvme(8192), mem, &swap);
  set_initial_state(store);
  tbb::task_arena arena(2);
  OptimizerStepper stepper(store, arena);
  StepFeed feed(kUnits.size());
  StepInputs in;
  in.feed_from(feed);
  std::thread backward([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    feed.fail("backward ran out of GPU memory");
  });
  EXPECT_IO_ERROR(stepper.step(in), "optimizer step stopped: backward ran out of GPU memory");
  backward.join();
  feed.reset();
  EXPECT_IO_ERROR(stepper.step(in), "an earlier optimizer step failed", "restart from the last checkpoint");
  // The reads that had started were waited: the store's tensors are usable (no read in flight).
  std::vector<float> master(777), m(777), v(777);
  store.read_state(2, master, m, v);
  EXPECT_EQ(master, init_values(777, 2));
}

// ---------------------------------------------------------------------------------------------
// Faults: a corrupt extent and an I/O error during a step.

void flip_byte(const io::SwapStore& swap, io::TensorId id, std::uint64_t at) {
  const auto loc = swap.locate(id).front();
  const int fd = ::open(loc.file.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  char c = 0;
  ASSERT_EQ(::pread(fd, &c, 1, static_cast<off_t>(loc.offset + at)), 1);
  c ^= 0x20;
  ASSERT_EQ(::pwrite(fd, &c, 1, static_cast<off_t>(loc.offset + at)), 1);
  ::close(fd);
}

TEST(OptimizerStep, ACorruptNvmeSliceStopsTheStepBeforeItsDataIsUsed) {
  NvmeScratch nv;
  auto& [dir, engine, swap, mem] = nv;
  PartitionStore store(kUnits, all_on_nvme(8192, 3), mem, &swap);
  set_initial_state(store);
  const Slice* victim = nullptr;
  for (const Slice& s : store.slices()) {
    if (s.unit == 1) victim = &s;
  }
  ASSERT_NE(victim, nullptr);
  flip_byte(swap, victim->state_id, 100);
  tbb::task_arena arena(2);
  OptimizerStepper stepper(store, arena);
  std::vector<std::vector<std::uint16_t>> grads;
  for (std::size_t u = 0; u < kUnits.size(); ++u) grads.push_back(grads_for(u, kUnits[u].numel, 1));
  StepInputs in;
  in.gradient = [&](std::size_t u) -> const void* { return grads[u].data(); };
  const std::vector<std::uint16_t> bf16_before(store.host_params(1), store.host_params(1) + 4096);
  EXPECT_IO_ERROR(stepper.step(in), "checksum mismatch", "layers.0.optimizer[0:4096]", dir.path());
  // The corrupt slice's parameters were not updated from corrupt state.
  EXPECT_EQ(std::vector<std::uint16_t>(store.host_params(1), store.host_params(1) + 4096), bf16_before);
  // Unit 2, which comes after, kept its state on disk: it still reads back as set.
  std::vector<float> master(777), m(777), v(777);
  store.read_state(2, master, m, v);
  EXPECT_EQ(master, init_values(777, 2));
  EXPECT_IO_ERROR(stepper.step(in), "an earlier optimizer step failed", "checksum mismatch");
}

TEST(PartitionStore, ACorruptParameterSliceIsNotHandedOut) {
  NvmeScratch nv;
  auto& [dir, engine, swap, mem] = nv;
  StoreOptions so;
  so.params_on_nvme = true;
  so.max_in_cpu = 0;
  so.param_buffers = 2;
  so.param_buffer_elems = 4096;
  PartitionStore store({{"a", 8000}}, so, mem, nullptr, &swap);
  store.set_state(0, init_values(8000, 5));
  flip_byte(swap, store.slices()[1].param_id, 8);
  ParamLease lease = store.fetch(0);
  EXPECT_IO_ERROR(lease.wait(), "checksum mismatch", "a.params[4096:8000]");
  EXPECT_TRUE(lease.pieces().empty());
  std::vector<std::uint16_t> out(8000);
  EXPECT_IO_ERROR(lease.copy_to(out), "checksum mismatch");  // a failed lease never copies out
  lease = ParamLease();  // buffers go back: both are free again
  ParamLease again = store.fetch(0);
  EXPECT_EQ(again.pieces().size(), 2u);
}

TEST(PartitionStore, TryFetchReadsAheadOnlyWithFreeBuffers) {
  // The stage-3 prefetcher reads the next unit while it holds this one: try_fetch never waits.
  NvmeScratch nv;
  auto& [dir, engine, swap, mem] = nv;
  StoreOptions so;
  so.params_on_nvme = true;
  so.max_in_cpu = 0;
  so.param_buffers = 3;
  so.param_buffer_elems = 4096;
  so.slice_elems = 4096;
  PartitionStore store({{"a", 8000}, {"b", 4000}}, so, mem, nullptr, &swap);
  store.set_state(0, init_values(8000, 5));
  store.set_state(1, init_values(4000, 6));
  ParamLease a = store.fetch(0);  // 2 of the 3 buffers
  std::optional<ParamLease> b = store.try_fetch(1);
  ASSERT_TRUE(b.has_value());  // the third
  EXPECT_FALSE(store.try_fetch(1).has_value());  // none left: no wait, no lease
  std::vector<std::uint16_t> out(4000);
  b->copy_to(out);
  for (std::size_t i = 0; i < out.size(); i += 501) {
    EXPECT_EQ(out[i], kernels::f32_to_bf16(init_values(4000, 6)[i])) << i;
  }
  b.reset();
  a = ParamLease();
  EXPECT_TRUE(store.try_fetch(0).has_value());
}

// Runs in a fresh process (a death test re-executes the binary): RLIMIT_FSIZE makes writes past
// an offset fail with EFBIG, and a forked copy of a process that already runs oneTBB workers
// would not be safe. Returns 0 when everything held.
int io_error_during_step() {
  ScratchDir dir;
  // A checkpoint of an earlier step next to the swap directory: it must come out untouched.
  const std::string ckpt = dir.path() + "/checkpoint.bin";
  const std::vector<std::byte> ckpt_bytes = io::testing::random_bytes(1u << 16, 7);
  std::FILE* f = std::fopen(ckpt.c_str(), "wb");
  if (f == nullptr || std::fwrite(ckpt_bytes.data(), 1, ckpt_bytes.size(), f) != ckpt_bytes.size()) return 10;
  std::fclose(f);
  {
    io::IoEngine engine(test_engine());
    io::SwapStore swap(engine, {{dir.sub("swap")}, 0});
    HostMemory mem(0, PinMode::kPageable);
    PartitionStore store(kUnits, all_on_nvme(8192, 2), mem, &swap);
    set_initial_state(store);
    // Writes at or past the head's extent now fail with EFBIG (the kernel's RLIMIT_FSIZE check).
    std::signal(SIGXFSZ, SIG_IGN);
    const Slice& head = store.slices().back();
    const auto head_loc = swap.locate(head.state_id).front();
    struct rlimit lim {};
    ::getrlimit(RLIMIT_FSIZE, &lim);
    const struct rlimit old = lim;
    lim.rlim_cur = head_loc.offset;
    if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) return 2;
    tbb::task_arena arena(2);
    OptimizerStepper stepper(store, arena);
    std::vector<std::vector<std::uint16_t>> grads;
    for (std::size_t u = 0; u < kUnits.size(); ++u) grads.push_back(grads_for(u, kUnits[u].numel, 1));
    StepInputs in;
    in.gradient = [&](std::size_t u) -> const void* { return grads[u].data(); };
    try {
      stepper.step(in);
      return 3;
    } catch (const Error& e) {
      std::fprintf(stderr, "step error: %s\n", e.what());
      const std::string m = e.what();
      if (m.find("head.optimizer[0:777]") == std::string::npos || m.find(head_loc.file) == std::string::npos) return 4;
    }
    ::setrlimit(RLIMIT_FSIZE, &old);
    try {
      stepper.step(in);
      return 5;
    } catch (const Error& e) {
      if (std::string(e.what()).find("restart from the last checkpoint") == std::string::npos) return 6;
    }
    // Slices written before the failure hold the stepped state (their checksums verify).
    std::vector<float> master(4096), m(4096), v(4096);
    store.read_state(1, master, m, v);
    if (master == init_values(4096, 1)) return 7;
  }
  std::vector<std::byte> now(ckpt_bytes.size());
  f = std::fopen(ckpt.c_str(), "rb");
  if (f == nullptr || std::fread(now.data(), 1, now.size(), f) != now.size()) return 11;
  std::fclose(f);
  return now == ckpt_bytes ? 0 : 12;
}

TEST(OptimizerStep, AnIoErrorDuringTheStepNamesTheFileAndDamagesNoCheckpoint) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  // Exit codes: 3 the step passed, 4 its message, 5 a second step ran, 6 its message, 7 earlier
  // slices were not written, 10-12 the checkpoint file (12: it changed).
  EXPECT_EXIT(std::exit(io_error_during_step()), ::testing::ExitedWithCode(0), "step error: .*File too large");
}

// ---------------------------------------------------------------------------------------------
// Placement and options.

TEST(PartitionStore, PlacesStateByRatioAndParametersByMaxInCpu) {
  NvmeScratch nv;
  auto& [dir, engine, swap, mem] = nv;
  StoreOptions so;
  so.nvme_ratio = 0.5;
  so.slice_elems = 10000;  // rounded down to 8192
  so.params_on_nvme = true;
  so.max_in_cpu = 104099;  // embed + layers.0 fit; the head does not
  so.param_buffers = 4;
  so.param_buffer_elems = 1u << 20;
  PartitionStore store(kUnits, so, mem, &swap, &swap);
  EXPECT_EQ(store.slice_elems(), 8192u);
  EXPECT_EQ(store.param_tier(0), Tier::kHost);
  EXPECT_EQ(store.param_tier(1), Tier::kHost);
  EXPECT_EQ(store.param_tier(2), Tier::kNvme);
  EXPECT_EQ(store.host_params(2), nullptr);
  // embed: floor(0.5 x 100003) = 50001 -> 49152 (a multiple of 2048) on NVMe; layers.0: 2048; head: 0.
  EXPECT_EQ(store.nvme_state_elements(), 49152u + 2048u);
  EXPECT_EQ(store.nvme_param_elements(), 777u);
  std::uint64_t covered = 0;
  for (const Slice& s : store.slices()) {
    EXPECT_EQ(s.begin % kSliceAlign, 0u);
    EXPECT_LE(s.size(), 8192u);
    EXPECT_EQ(s.state_tier, s.unit == 0 ? (s.end <= 49152 ? Tier::kNvme : Tier::kHost)
                                        : (s.unit == 1 && s.end <= 2048 ? Tier::kNvme : Tier::kHost));
    if (s.state_tier == Tier::kHost) {
      EXPECT_EQ(reinterpret_cast<std::uintptr_t>(s.host_state) % 4096, 0u);
    }
    covered += s.size();
  }
  EXPECT_EQ(covered, store.total_elements());
  EXPECT_NE(store.describe().find("3 units"), std::string::npos) << store.describe();
  // One block per purpose: host state, host parameters, staging.
  EXPECT_GT(mem.used(Purpose::kOptimizerState), 0u);
  EXPECT_GT(mem.used(Purpose::kParameters), 0u);
  EXPECT_EQ(mem.used(Purpose::kStaging),
            4 * (8192u * 12 + 8192u * 2) + 4 * 4096u);  // 4 optimizer buffers + 4 parameter buffers of 777 bf16
}

TEST(PartitionStore, DiskFullIsReportedWhenTheStoreIsBuilt) {
  io::testing::SmallFs small(4u << 20);
  if (!small.ok()) GTEST_SKIP() << small.reason();
  io::IoEngine engine(io::EngineOptions{});
  io::SwapStore swap(engine, {{small.path()}, 0});
  HostMemory mem(0, PinMode::kPageable);
  // 1M elements x 12 bytes = 12 MiB of state on a 4 MiB file system.
  EXPECT_IO_ERROR((PartitionStore{{{"big", 1u << 20}}, all_on_nvme(1u << 18), mem, &swap}), "not enough disk space", small.path());
  EXPECT_EQ(mem.used(), 0u);
}

TEST(PartitionStore, HostMemoryIsCheckedBeforeDiskOrMemoryIsTaken) {
  ScratchDir dir;
  io::IoEngine engine(io::EngineOptions{});
  io::SwapStore swap(engine, {{dir.path()}, 0});
  HostMemory mem(1u << 20, PinMode::kPageable);
  // staging: 4 x 64K x 14 bytes = 3.5 MiB > 1 MiB budget
  EXPECT_IO_ERROR((PartitionStore{{{"big", 1u << 20}}, all_on_nvme(1u << 16), mem, &swap}), "exceeds the budget", "staging buffers",
                  "sub_group_size");
  EXPECT_EQ(mem.used(), 0u);
  EXPECT_EQ(swap.tensor_count(), 0u) << "no swap space reserved for a plan that does not fit";
}

TEST(PartitionStore, BadOptionsAreClearErrors) {
  HostMemory mem(0, PinMode::kPageable);
  StoreOptions so;
  so.nvme_ratio = 1.5;
  EXPECT_IO_ERROR((PartitionStore{kUnits, so, mem, nullptr}), "ratio must be between 0 and 1");
  so.nvme_ratio = 0.5;
  EXPECT_IO_ERROR((PartitionStore{kUnits, so, mem, nullptr}), "offload_optimizer.nvme_path");
  so.nvme_ratio = 0;
  so.params_on_nvme = true;
  EXPECT_IO_ERROR((PartitionStore{kUnits, so, mem, nullptr}), "offload_param.nvme_path");
  so.params_on_nvme = false;
  EXPECT_IO_ERROR((PartitionStore{{{"a", 5}, {"a", 6}}, so, mem, nullptr}), "'a' is used twice");
  EXPECT_IO_ERROR((PartitionStore{{{"a", 0}}, so, mem, nullptr}), "'a' has no elements");
  PartitionStore ok(kUnits, so, mem, nullptr);
  EXPECT_IO_ERROR(ok.set_state(0, std::vector<float>(5)), "5 master values given for a shard of 100003");
  EXPECT_IO_ERROR(ok.set_state(9, std::vector<float>(5)), "unit 9 does not exist");
  ScratchDir dir;
  io::IoEngine engine(io::EngineOptions{});
  io::SwapStore swap(engine, {{dir.path()}, 0});
  so.params_on_nvme = true;
  so.max_in_cpu = 0;
  so.param_buffers = 2;
  so.param_buffer_elems = 8192;
  // embed needs 13 buffers of 8192 elements.
  EXPECT_IO_ERROR((PartitionStore{kUnits, so, mem, nullptr, &swap}), "'embed'", "need 13 staging buffers",
                  "raise buffer_count to at least 13 or buffer_size to at least 50002");
  so.param_buffer_elems = 100;
  EXPECT_IO_ERROR((PartitionStore{kUnits, so, mem, nullptr, &swap}), "buffer_size is 100 elements");
}

TEST(PartitionStore, SetStateWithMomentsRoundTrips) {
  NvmeScratch nv;
  auto& [dir, engine, swap, mem] = nv;
  StoreOptions so;
  so.nvme_ratio = 0.5;
  so.slice_elems = 4096;
  PartitionStore store({{"u", 10000}}, so, mem, &swap);
  const auto p = init_values(10000, 1), m = init_values(10000, 2), v = init_values(10000, 3);
  store.set_state(0, p, m, v);
  std::vector<float> p2(10000), m2(10000), v2(10000);
  store.read_state(0, p2, m2, v2);
  EXPECT_EQ(p2, p);
  EXPECT_EQ(m2, m);
  EXPECT_EQ(v2, v);
  EXPECT_IO_ERROR(store.set_state(0, p, m, {}), "exp_avg has 10000 and exp_avg_sq 0 values");
}

// ---------------------------------------------------------------------------------------------
// From a DeepSpeed config.

config::DeepSpeedConfig parse(const std::string& text) {
  auto r = config::parse_config(config::Json::parse(text));
  EXPECT_TRUE(r.ok()) << text;
  return r.config;
}

TEST(OffloadSettings, MapsTheConfig) {
  const auto c = parse(R"({"train_batch_size": 8, "zero_optimization": {"stage": 3, "sub_group_size": 5000000,
      "offload_optimizer": {"device": "nvme", "nvme_path": "/a, /b", "ratio": 0.25, "buffer_count": 6},
      "offload_param": {"device": "nvme", "nvme_path": "/c", "buffer_count": 7, "buffer_size": 1000000,
                        "max_in_cpu": 12345, "pin_memory": false}},
      "aio": {"block_size": 262144, "queue_depth": 16, "intra_op_parallelism": 2}})");
  const OffloadSettings s = offload_settings(c);
  EXPECT_EQ(s.optimizer_paths, (std::vector<std::string>{"/a", "/b"}));
  EXPECT_EQ(s.param_paths, (std::vector<std::string>{"/c"}));
  EXPECT_DOUBLE_EQ(s.store.nvme_ratio, 0.25);
  EXPECT_EQ(s.store.slice_elems, 5000000u);
  EXPECT_EQ(s.store.optimizer_buffers, 6u);
  EXPECT_TRUE(s.store.params_on_nvme);
  EXPECT_EQ(s.store.param_buffers, 7u);
  EXPECT_EQ(s.store.param_buffer_elems, 1000000u);
  EXPECT_EQ(s.store.max_in_cpu, 12345u);
  EXPECT_FALSE(s.pin_memory);
  EXPECT_EQ(s.aio.block_size, 262144u);
  EXPECT_EQ(s.aio.queue_depth, 16u);
  EXPECT_EQ(s.aio.intra_op_parallelism, 2u);
  EXPECT_FALSE(s.notes.empty()) << "pin_memory differs between the sections";
}

TEST(OffloadSettings, CpuOffloadWithRatioAsksForAGpuShareOfTheState) {
  const auto c = parse(R"({"train_batch_size": 8, "zero_optimization": {"stage": 3,
      "offload_optimizer": {"device": "cpu", "ratio": 0.4}}})");
  const OffloadSettings s = offload_settings(c);
  EXPECT_DOUBLE_EQ(s.store.nvme_ratio, 0.0);  // nothing on NVMe
  EXPECT_NEAR(s.gpu_optimizer_fraction, 0.6, 1e-12);
  EXPECT_TRUE(s.notes.empty());
  // With device nvme the ratio is the NVMe fraction, and nothing goes to the GPU.
  const auto n = parse(R"({"train_batch_size": 8, "zero_optimization": {"stage": 3,
      "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp", "ratio": 0.4}}})");
  const OffloadSettings sn = offload_settings(n);
  EXPECT_DOUBLE_EQ(sn.store.nvme_ratio, 0.4);
  EXPECT_DOUBLE_EQ(sn.gpu_optimizer_fraction, 0.0);
}

TEST(OffloadSettings, EnvironmentSwitchesAreChecked) {
  ::setenv("ZINF_OFFLOAD_OVERLAP", "0", 1);
  ::setenv("ZINF_OFFLOAD_EXACT", "1", 1);
  StepperOptions o = stepper_options_from_env();
  EXPECT_FALSE(o.overlap);
  EXPECT_TRUE(o.exact);
  EXPECT_FALSE(o.phased);
  ::setenv("ZINF_OFFLOAD_IO", "phased", 1);
  EXPECT_TRUE(stepper_options_from_env().phased);
  ::setenv("ZINF_OFFLOAD_IO", "both", 1);
  EXPECT_IO_ERROR(stepper_options_from_env(), "ZINF_OFFLOAD_IO=both", "use phased or mixed");
  ::unsetenv("ZINF_OFFLOAD_IO");
  ::setenv("ZINF_OFFLOAD_OVERLAP", "off", 1);
  EXPECT_IO_ERROR(stepper_options_from_env(), "ZINF_OFFLOAD_OVERLAP=off", "use 0 or 1");
  ::unsetenv("ZINF_OFFLOAD_OVERLAP");
  ::unsetenv("ZINF_OFFLOAD_EXACT");
  EXPECT_TRUE(stepper_options_from_env().overlap);
}

TEST(Offload, BuildsFromAConfigAndSteps) {
  ScratchDir dir;
  const auto c = parse(fmt::format(R"({{"train_batch_size": 8, "zero_optimization": {{"stage": 3,
      "sub_group_size": 4096,
      "offload_optimizer": {{"device": "nvme", "nvme_path": "{0}", "buffer_count": 2}},
      "offload_param": {{"device": "nvme", "nvme_path": "{0}/", "buffer_count": 30, "buffer_size": 8192,
                         "max_in_cpu": 0, "pin_memory": false}}}}}})",
                                   dir.path()));
  OffloadSettings s = offload_settings(c);
  tbb::task_arena arena(2);
  Offload off(s, kUnits, 0, arena);
  EXPECT_NE(off.engine(), nullptr);
  EXPECT_EQ(off.store().optimizer_swap(), off.store().param_swap())
      << "one swap store for one directory, however it is spelled";
  EXPECT_EQ(off.memory().mode(), PinMode::kPageable);
  set_initial_state(off.store());
  std::vector<std::vector<std::uint16_t>> grads;
  for (std::size_t u = 0; u < kUnits.size(); ++u) grads.push_back(grads_for(u, kUnits[u].numel, 1));
  StepInputs in;
  in.adam = adam_for(1);
  in.gradient = [&](std::size_t u) -> const void* { return grads[u].data(); };
  const StepStats st = off.stepper().step(in);
  EXPECT_EQ(st.bytes_read, (100003u + 4096u + 777u) * 12);
  const StepRun ref = reference_run(1, off.stepper().options().exact);
  std::vector<std::uint16_t> bf16(777);
  off.store().fetch(2).copy_to(bf16);
  EXPECT_EQ(bf16, ref.bf16[2]);
}

}  // namespace
}  // namespace zinf::offload
