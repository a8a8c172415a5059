// The stage-3 parameter coordinator on synthetic schedules: every use sees its units' current
// parameters; the live and prefetch budgets hold; gathers follow the schedule whatever the timing;
// reuse distance and persistence keep what they should; a failed gather is an error, not a hang.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <mutex>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "io_test_util.hpp"
#include "zinf/common/error.hpp"
#include "zinf/runtime/backend.hpp"
#include "zinf/runtime/coordinator.hpp"

namespace zinf::runtime {
namespace {

ModelLayout layout_of(const std::vector<std::int64_t>& sizes) {
  ModelLayout l;
  for (std::size_t i = 0; i < sizes.size(); ++i) l.units.push_back(UnitLayout{fmt::format("u{}", i), sizes[i], {}});
  return l;
}

std::vector<std::size_t> self(std::size_t u) { return {u}; }

// Gathers that fill a unit with (unit + 1000 * version) and log their order.
struct Recorder {
  std::mutex mu;
  std::vector<std::size_t> order;
  int version = 0;
  std::mt19937 rng{7};
  bool jitter = false;
  ParamCoordinator::Gather gather(const ModelLayout& l) {
    return [this, &l](std::size_t u, void* dst, std::size_t) {
      int delay = 0;
      {
        std::lock_guard lock(mu);
        order.push_back(u);
        if (jitter) delay = static_cast<int>(rng() % 400);
      }
      if (delay) std::this_thread::sleep_for(std::chrono::microseconds(delay));
      auto* f = static_cast<float*>(dst);
      std::fill(f, f + l.units[u].numel, static_cast<float>(u + 1000 * version));
    };
  }
};

// Runs one training pass, checking each use's data and the budgets as it goes; returns the stats.
CoordinatorStats run_pass(ParamCoordinator& c, const ModelLayout& l, const Recorder& rec, std::int64_t micro,
                          const CoordinatorOptions& o, std::int64_t* live_seen = nullptr) {
  const auto uses = ParamCoordinator::training_schedule(l.units.size(), micro, self, self);
  c.begin(uses);
  for (std::size_t i = 0; i < uses.size(); ++i) {
    const UnitBuffers& v = c.acquire(i);
    std::int64_t use_elems = 0;
    for (const std::size_t u : uses[i]) {
      use_elems += l.units[u].numel;
      const auto* f = static_cast<const float*>(v.units[u]);
      EXPECT_NE(f, nullptr) << "use " << i << " unit " << u;
      if (f == nullptr) continue;
      const auto want = static_cast<float>(u + 1000 * rec.version);
      EXPECT_EQ(f[0], want) << "use " << i << " unit " << u;
      EXPECT_EQ(f[l.units[u].numel - 1], want) << "use " << i << " unit " << u;
    }
    const std::int64_t live = c.live_elements();
    EXPECT_LE(live, o.max_live + use_elems) << "use " << i;
    std::int64_t largest = 0;
    for (const auto& u : l.units) largest = std::max(largest, u.numel);
    EXPECT_LE(live + c.cached_elements(), o.max_live + largest + use_elems) << "use " << i;
    if (live_seen) *live_seen = std::max(*live_seen, live);
    c.release(i);
  }
  c.end();
  return c.take_stats();
}

TEST(Coordinator, BudgetsHoldOverRandomSizesAndBudgets) {
  std::mt19937 rng(11);
  auto backend = make_cpu_backend();
  for (int trial = 0; trial < 60; ++trial) {
    std::vector<std::int64_t> sizes;
    const int n = 2 + static_cast<int>(rng() % 9);
    for (int i = 0; i < n; ++i) sizes.push_back(64 + static_cast<std::int64_t>(rng() % 5000));
    const ModelLayout l = layout_of(sizes);
    const std::int64_t largest = *std::max_element(sizes.begin(), sizes.end());
    CoordinatorOptions o;
    o.max_live = static_cast<std::int64_t>(rng() % 20000);
    o.prefetch_bucket = trial % 5 == 0 ? 0 : static_cast<std::int64_t>(rng() % 12000);
    o.max_reuse_distance = static_cast<std::int64_t>(rng() % 30000);
    o.persistence_threshold = trial % 3 == 0 ? 500 : 0;
    Recorder rec;
    rec.jitter = trial % 2 == 0;
    ParamCoordinator c(*backend, l, DType::kF32, o, rec.gather(l));
    std::int64_t live_seen = 0;
    const CoordinatorStats s = run_pass(c, l, rec, 2, o, &live_seen);
    SCOPED_TRACE(::testing::Message() << "trial " << trial << " max_live " << o.max_live << " bucket "
                                      << o.prefetch_bucket << " reuse " << o.max_reuse_distance);
    EXPECT_LE(s.live_high_water, o.max_live + largest);
    EXPECT_GE(s.live_high_water, live_seen);
    // DeepSpeed's rule: a unit starts while fewer than `bucket` elements are ahead.
    if (o.prefetch_bucket > 0) {
      EXPECT_LT(s.ahead_high_water, o.prefetch_bucket + largest);
    }
    // Every non-persistent read is a hit or a miss.
    std::uint64_t reads = 0;
    for (const auto sz : sizes) reads += sz <= o.persistence_threshold ? 0 : 1;
    EXPECT_EQ(s.hits + s.misses, reads * 2 * 2);
    if (o.prefetch_bucket == 0) {
      EXPECT_EQ(s.ahead_high_water, 0);
    }
    EXPECT_EQ(c.live_elements(), 0);  // the pass released everything not persistent
  }
}

TEST(Coordinator, PaddedGathersGetBuffersOfTheirSizeAndCountInTheBudgets) {
  // Several GPUs gather a unit in place as W equal shards: the buffer holds the padded length,
  // which the gather writes to its end, and the budgets count the padded elements.
  auto backend = make_cpu_backend();
  const ModelLayout l = layout_of({1001, 64, 777, 1001});
  CoordinatorOptions o;
  o.max_live = 1100;
  o.prefetch_bucket = 800;
  o.persistence_threshold = 0;
  o.gather_elements = {1004, 64, 780, 1004};  // 4 shards each
  std::mutex mu;
  std::vector<float> last(l.units.size());
  std::uint64_t padded_sum = 0;
  ParamCoordinator c(*backend, l, DType::kF32, o, [&](std::size_t u, void* dst, std::size_t) {
    auto* f = static_cast<float*>(dst);
    const auto n = static_cast<std::size_t>(o.gather_elements[u]);
    std::fill(f, f + n, static_cast<float>(u + 1));  // to the padded end: within the buffer
    std::lock_guard lock(mu);
    last[u] = f[n - 1];
    padded_sum += n;
  });
  const auto uses = ParamCoordinator::training_schedule(l.units.size(), 2, self, self);
  c.begin(uses);
  for (std::size_t i = 0; i < uses.size(); ++i) {
    const UnitBuffers& v = c.acquire(i);
    for (const std::size_t u : uses[i]) EXPECT_EQ(static_cast<const float*>(v.units[u])[l.units[u].numel - 1], u + 1.0f);
    EXPECT_LE(c.live_elements(), o.max_live + 1004) << "use " << i;
    c.release(i);
  }
  c.end();
  const CoordinatorStats s = c.take_stats();
  EXPECT_EQ(s.gathered_elements, padded_sum);  // counted padded
  EXPECT_GT(s.gathers, 4u);
  EXPECT_LE(s.live_high_water, o.max_live + 1004);
  for (std::size_t u = 0; u < last.size(); ++u) EXPECT_EQ(last[u], u + 1.0f);
}

TEST(Coordinator, PostedTasksRunInOrderWithTheGathersAndHearOfAFailure) {
  // Several GPUs: the trainer's reduce-scatters are posted between the gathers the compute thread
  // requested; the gather thread runs both in that order (every rank the same), and a task after
  // a failed gather is told the gather's error.
  auto backend = make_cpu_backend();
  const ModelLayout l = layout_of({500, 500, 500, 500});
  CoordinatorOptions o;
  o.max_live = 10000;
  o.prefetch_bucket = 0;  // gathers only on demand: the order below is exact
  o.persistence_threshold = 0;
  std::mutex mu;
  std::vector<std::string> order;
  bool fail = false;
  ParamCoordinator c(*backend, l, DType::kF32, o, [&](std::size_t u, void* dst, std::size_t) {
    std::lock_guard lock(mu);
    order.push_back(fmt::format("g{}", u));
    if (fail && u == 2) throw Error("disk gone");
    std::fill(static_cast<float*>(dst), static_cast<float*>(dst) + 500, 1.0f);
  });
  std::vector<std::string> heard;
  const auto task = [&](const std::string& name) {
    return [&, name](const std::exception_ptr& failed) {
      std::lock_guard lock(mu);
      order.push_back(name);
      if (failed) {
        try {
          std::rethrow_exception(failed);
        } catch (const std::exception& e) {
          heard.push_back(name + ": " + e.what());
        }
      }
    };
  };
  const auto uses = ParamCoordinator::forward_schedule(4, self);
  c.begin(uses);
  for (std::size_t i = 0; i < uses.size(); ++i) {
    c.acquire(i);
    c.release(i);
    c.post(task(fmt::format("t{}", i)));
  }
  c.end();
  // end() waits for the gathers; the last task may still be running: wait for it.
  for (int k = 0; k < 2000; ++k) {
    {
      std::lock_guard lock(mu);
      if (order.size() == 8) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  {
    std::lock_guard lock(mu);
    EXPECT_EQ(order, (std::vector<std::string>{"g0", "t0", "g1", "t1", "g2", "t2", "g3", "t3"}));
    EXPECT_TRUE(heard.empty());
    order.clear();
  }
  // A failed gather: the task posted after it hears why; the pass reports the error.
  {
    std::lock_guard lock(mu);
    fail = true;
  }
  c.invalidate();
  c.begin(uses);
  c.acquire(0);
  c.release(0);
  c.acquire(1);
  c.release(1);
  EXPECT_IO_ERROR(c.acquire(2), "disk gone");
  c.post(task("after"));
  for (int k = 0; k < 2000; ++k) {
    {
      std::lock_guard lock(mu);
      if (!heard.empty()) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::lock_guard lock(mu);
  ASSERT_EQ(heard.size(), 1u);
  EXPECT_NE(heard[0].find("after: "), std::string::npos) << heard[0];
  EXPECT_NE(heard[0].find("disk gone"), std::string::npos) << heard[0];
}

TEST(Coordinator, GathersFollowTheScheduleWhateverTheTiming) {
  // Every rank must request the same gathers in the same order: the order may depend only on the
  // schedule and the sizes, never on how long gathers take.
  auto backend = make_cpu_backend();
  const ModelLayout l = layout_of({3000, 1000, 1000, 1000, 1000, 2000});
  CoordinatorOptions o;
  o.max_live = 4000;
  o.prefetch_bucket = 2500;
  o.max_reuse_distance = 1500;
  o.persistence_threshold = 0;
  std::vector<std::vector<std::size_t>> orders;
  for (const bool jitter : {false, true, true}) {
    Recorder rec;
    rec.jitter = jitter;
    ParamCoordinator c(*backend, l, DType::kF32, o, rec.gather(l));
    for (int pass = 0; pass < 2; ++pass) run_pass(c, l, rec, 3, o);
    orders.push_back(rec.order);
  }
  EXPECT_EQ(orders[0], orders[1]);
  EXPECT_EQ(orders[0], orders[2]);
}

TEST(Coordinator, ReuseDistanceAndPersistenceKeepWhatTheyShould) {
  auto backend = make_cpu_backend();
  const ModelLayout l = layout_of({1000, 1000, 1000, 10});
  Recorder rec;
  {
    // Everything fits and every reuse is near: each unit is gathered once per pass.
    CoordinatorOptions o;
    o.persistence_threshold = 0;
    ParamCoordinator c(*backend, l, DType::kF32, o, rec.gather(l));
    const CoordinatorStats s = run_pass(c, l, rec, 2, o);
    EXPECT_EQ(s.gathers, 4u);
    EXPECT_EQ(s.misses, 0u);  // prefetched at begin()
    EXPECT_EQ(s.live_high_water, 3010);
  }
  {
    // Reuse distance 0 and no prefetch: only back-to-back reads (the last forward unit, then its
    // backward) keep a unit; everything else is gathered on demand at each read.
    CoordinatorOptions o;
    o.max_reuse_distance = 0;
    o.prefetch_bucket = 0;
    o.persistence_threshold = 0;
    ParamCoordinator c(*backend, l, DType::kF32, o, rec.gather(l));
    const CoordinatorStats s = run_pass(c, l, rec, 1, o);
    // Reads: 0 1 2 3 | 3 2 1 0: unit 3's second read is kept.
    EXPECT_EQ(s.gathers, 7u);
    EXPECT_EQ(s.misses, 7u);
    EXPECT_EQ(s.hits, 1u);
    EXPECT_EQ(s.ahead_high_water, 0);
  }
  {
    // The small unit is persistent: gathered once across passes until the weights change.
    CoordinatorOptions o;
    o.max_reuse_distance = 0;
    o.prefetch_bucket = 0;
    o.persistence_threshold = 10;
    ParamCoordinator c(*backend, l, DType::kF32, o, rec.gather(l));
    rec.order.clear();
    run_pass(c, l, rec, 1, o);
    run_pass(c, l, rec, 1, o);
    EXPECT_EQ(std::count(rec.order.begin(), rec.order.end(), 3u), 1);
    EXPECT_TRUE(c.persistent(3));
    EXPECT_FALSE(c.persistent(0));
    // New weights: the next pass sees them everywhere, the persistent unit included.
    c.invalidate();
    rec.version = 1;
    run_pass(c, l, rec, 1, o);
    EXPECT_EQ(std::count(rec.order.begin(), rec.order.end(), 3u), 2);
  }
  {
    // The model-wide cap stops persistence once the persistent units add up past it.
    CoordinatorOptions o;
    o.persistence_threshold = 2000;
    o.model_persistence_threshold = 2500;
    ParamCoordinator c(*backend, l, DType::kF32, o, rec.gather(l));
    EXPECT_TRUE(c.persistent(0) && c.persistent(1) && c.persistent(3));
    EXPECT_FALSE(c.persistent(2));
  }
}

TEST(Coordinator, AnAdoptedUnitIsTheCallersNeverGatheredNorCounted) {
  // The GPU's share of the optimizer holds units 0 and 3 itself (adopt): every use sees the
  // caller's buffer, written by the caller between passes; they are never gathered, freed or
  // invalidated, and the budgets count only the other units.
  auto backend = make_cpu_backend();
  const ModelLayout l = layout_of({1000, 1000, 1000, 10});
  Recorder rec;
  CoordinatorOptions o;
  o.max_live = 1000;
  o.persistence_threshold = 10;  // unit 3 would be persistent: adopting takes it over
  ParamCoordinator c(*backend, l, DType::kF32, o, rec.gather(l));
  std::vector<float> mine0(1000, 0.0f), mine3(10, 3.0f);
  c.adopt(0, mine0.data());
  c.adopt(3, mine3.data());
  EXPECT_TRUE(c.adopted(0) && c.adopted(3));
  EXPECT_FALSE(c.persistent(3));
  for (int version = 0; version < 3; ++version) {
    rec.version = version;
    std::fill(mine0.begin(), mine0.end(), static_cast<float>(1000 * version));
    std::fill(mine3.begin(), mine3.end(), static_cast<float>(3 + 1000 * version));
    const auto uses = ParamCoordinator::training_schedule(4, 1, self, self);
    c.begin(uses);
    for (std::size_t i = 0; i < uses.size(); ++i) {
      const UnitBuffers& v = c.acquire(i);
      const std::size_t u = uses[i][0];
      if (u == 0) {
        EXPECT_EQ(v.units[0], mine0.data());
      }
      if (u == 3) {
        EXPECT_EQ(v.units[3], mine3.data());
      }
      EXPECT_EQ(static_cast<const float*>(v.units[u])[0], static_cast<float>(u + 1000 * version)) << "use " << i;
      EXPECT_LE(c.live_elements(), 2000) << "only units 1 and 2 count";
      c.release(i);
    }
    c.end();
    const CoordinatorStats s = c.take_stats();
    EXPECT_EQ(s.adopted_elements, 1010);
    EXPECT_EQ(s.persistent_elements, 0);
    EXPECT_EQ(s.hits + s.misses, 4u) << "units 1 and 2, twice each";
    c.invalidate();
  }
  EXPECT_EQ(std::count(rec.order.begin(), rec.order.end(), 0u), 0);
  EXPECT_EQ(std::count(rec.order.begin(), rec.order.end(), 3u), 0);
  EXPECT_EQ(c.live_elements(), 0);
}

TEST(Coordinator, AFailedGatherIsAnErrorAtTheUseThatNeedsIt) {
  auto backend = make_cpu_backend();
  const ModelLayout l = layout_of({100, 100, 100});
  CoordinatorOptions o;
  o.persistence_threshold = 0;
  ParamCoordinator c(*backend, l, DType::kF32, o, [](std::size_t u, void*, std::size_t) {
    if (u == 1) throw Error("NVMe read of unit {} failed: checksum mismatch", u);
  });
  c.begin(ParamCoordinator::training_schedule(3, 1, self, self));
  EXPECT_IO_ERROR(
      {
        for (std::size_t i = 0; i < 6; ++i) {
          c.acquire(i);
          c.release(i);
        }
      },
      "checksum mismatch");
  EXPECT_IO_ERROR(c.end(), "checksum mismatch");
  CoordinatorOptions negative;
  negative.max_live = -1;
  negative.prefetch_bucket = negative.max_reuse_distance = negative.persistence_threshold = 0;
  EXPECT_IO_ERROR(ParamCoordinator(*backend, l, DType::kF32, negative, nullptr), "must not be negative");
}

}  // namespace
}  // namespace zinf::runtime
