// The NCCL communicator on the GPUs this host has (one rank per GPU, thread ranks bootstrapped
// over in-process Gloo). Skips with the reason where NCCL or a GPU is missing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "io_test_util.hpp"
#include "zinf/common/error.hpp"
#include "zinf/kernels/device_info.hpp"
#include "zinf/runtime/comm.hpp"
#include "zinf/runtime/nccl_comm.hpp"

namespace zinf::runtime {
namespace {

// Ranks: every visible GPU, at most 4. 0 = skip (the reason in `why`).
int gpu_ranks(std::string& why) {
  if (!nccl_usable(&why)) return 0;
  const kernels::GpuQuery q = kernels::query_gpus();
  if (q.gpus.empty()) {
    why = q.problem;
    return 0;
  }
  return std::min<int>(4, static_cast<int>(q.gpus.size()));
}

void on_gpu_ranks(int w, const std::string& id, const NcclOptions& o, const std::function<void(Communicator&)>& body) {
  std::vector<std::thread> threads;
  std::vector<std::string> errors(static_cast<std::size_t>(w));
  for (int r = 0; r < w; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto boot = make_gloo_communicator_in_process(r, w, id);
        auto c = make_nccl_communicator(*boot, r, o);
        body(*c);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < w; ++r) EXPECT_EQ(errors[static_cast<std::size_t>(r)], "") << "rank " << r;
}

std::vector<float> host(const DeviceFloats& d) {
  std::vector<float> h(d.size());
  d.download(h.data(), h.size());
  return h;
}

TEST(Nccl, CollectivesOnEveryVisibleGpu) {
  std::string why;
  const int ranks = gpu_ranks(why);
  if (ranks == 0) GTEST_SKIP() << "no NCCL ranks here: " << why;
  std::cout << "NCCL " << nccl_version() << ", " << ranks << " GPU rank(s)\n";
  on_gpu_ranks(ranks, "nccl-collectives", {}, [](Communicator& c) {
    const int w = c.size(), r = c.rank();
    // all-reduce of small integers: exact, over 3M elements (several NCCL chunks).
    const std::size_t n = 3'000'000;
    std::vector<float> a(n);
    for (std::size_t i = 0; i < n; ++i) a[i] = static_cast<float>(r * 100 + static_cast<int>(i % 1000));
    DeviceFloats d(n);
    d.upload(a.data(), n);
    c.all_reduce_sum(d.span());
    const auto got = host(d);
    for (std::size_t i = 0; i < n; i += 997) {
      ASSERT_EQ(got[i], static_cast<float>(100 * w * (w - 1) / 2 + w * static_cast<int>(i % 1000))) << i;
    }
    // all-gather in rank order.
    std::vector<float> mine(1000, static_cast<float>(r));
    DeviceFloats dm(1000), all(1000 * static_cast<std::size_t>(w));
    dm.upload(mine.data(), 1000);
    c.all_gather(dm.span(), all.span());
    const auto ga = host(all);
    for (int q = 0; q < w; ++q) ASSERT_EQ(ga[static_cast<std::size_t>(q) * 1000 + 999], static_cast<float>(q));
    // reduce-scatter: this rank's shard of the sum.
    std::vector<float> full(8 * static_cast<std::size_t>(w));
    for (std::size_t i = 0; i < full.size(); ++i) full[i] = static_cast<float>(i + static_cast<std::size_t>(r));
    DeviceFloats df(full.size()), ds(8);
    df.upload(full.data(), full.size());
    c.reduce_scatter_sum(df.span(), ds.span());
    const auto sh = host(ds);
    for (std::size_t i = 0; i < 8; ++i) {
      const auto gi = static_cast<std::size_t>(r) * 8 + i;
      ASSERT_EQ(sh[i], static_cast<float>(w * static_cast<int>(gi) + w * (w - 1) / 2));
    }
    EXPECT_THROW(c.reduce_scatter_sum(std::span<const float>(df.data(), full.size() - 1), ds.span()), Error);
    // broadcast from the last rank.
    std::vector<float> b(11, static_cast<float>(r));
    DeviceFloats db(11);
    db.upload(b.data(), 11);
    c.broadcast(db.span(), w - 1);
    for (const float x : host(db)) ASSERT_EQ(x, static_cast<float>(w - 1));
    // A split channel: its own collectives, interleaved with the parent's in the same order on
    // every rank (NCCL's rule for two communicators on one GPU).
    auto child = c.split("gather");
    DeviceFloats in(4096), out(4096 * static_cast<std::size_t>(w));
    std::vector<float> v(4096, static_cast<float>(r + 1));
    in.upload(v.data(), v.size());
    for (int k = 0; k < 20; ++k) {
      child->all_gather(in.span(), out.span());
      c.all_reduce_sum(d.span());
    }
    const auto o = host(out);
    for (int q = 0; q < w; ++q) ASSERT_EQ(o[static_cast<std::size_t>(q) * 4096], static_cast<float>(q + 1));
    c.barrier();
  });
}

TEST(Nccl, DeviceCollectivesOfBf16AndFp32InPlace) {
  // The trainer's pipeline with several GPUs: a bf16 all-gather in place (this rank's shard at
  // its offset of the padded buffer, odd shard lengths) and an fp32 reduce-scatter of a padded
  // buffer into this rank's shard.
  std::string why;
  const int ranks = gpu_ranks(why);
  if (ranks == 0) GTEST_SKIP() << "no NCCL ranks here: " << why;
  std::vector<std::thread> threads;
  std::vector<std::string> errors(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto boot = make_gloo_communicator_in_process(r, ranks, "nccl-device");
        auto c = make_nccl_collectives(*boot, r);
        const int w = c->size();
        const std::size_t sh = 100'001;  // odd: bf16 shards at odd element offsets
        DeviceFloats buf((sh * static_cast<std::size_t>(w) + 1) / 2);  // bf16 storage, 2 per float slot
        std::vector<std::uint16_t> mine(sh);
        for (std::size_t i = 0; i < sh; ++i) mine[i] = static_cast<std::uint16_t>(0x3f80 + (r * 7 + i) % 97);
        std::vector<std::uint16_t> all(sh * static_cast<std::size_t>(w), 0);
        std::memcpy(all.data() + static_cast<std::size_t>(r) * sh, mine.data(), sh * 2);
        std::vector<float> slots(buf.size(), 0.0f);
        std::memcpy(slots.data(), all.data(), all.size() * 2);
        buf.upload(slots.data(), slots.size());
        auto* base = reinterpret_cast<std::uint16_t*>(buf.data());
        c->all_gather(base + static_cast<std::size_t>(r) * sh, base, sh, kernels::cpu::DType::kBF16);
        buf.download(slots.data(), slots.size());
        std::memcpy(all.data(), slots.data(), all.size() * 2);
        for (int q = 0; q < w; ++q) {
          for (std::size_t i = 0; i < sh; i += 1009) {
            if (all[static_cast<std::size_t>(q) * sh + i] != static_cast<std::uint16_t>(0x3f80 + (q * 7 + i) % 97)) {
              throw Error("all-gather: rank {} element {} is wrong", q, i);
            }
          }
        }
        // fp32 reduce-scatter: small integers, exact.
        std::vector<float> full(sh * static_cast<std::size_t>(w));
        for (std::size_t i = 0; i < full.size(); ++i) full[i] = static_cast<float>((i % 1000) + static_cast<std::size_t>(r));
        DeviceFloats df(full.size()), ds(sh);
        df.upload(full.data(), full.size());
        auto split = c->split("second");
        split->reduce_scatter_sum(df.data(), ds.data(), sh, kernels::cpu::DType::kF32);
        std::vector<float> got(sh);
        ds.download(got.data(), sh);
        for (std::size_t i = 0; i < sh; i += 997) {
          const std::size_t gi = static_cast<std::size_t>(r) * sh + i;
          if (got[i] != static_cast<float>(w * static_cast<int>(gi % 1000) + w * (w - 1) / 2)) {
            throw Error("reduce-scatter: element {} is {}", i, got[i]);
          }
        }
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < ranks; ++r) EXPECT_EQ(errors[static_cast<std::size_t>(r)], "") << "rank " << r;
}

TEST(Nccl, ARankThatStopsIsATimeoutNotAHang) {
  std::string why;
  const int w = gpu_ranks(why);
  if (w < 2) GTEST_SKIP() << "needs 2 GPUs: " << (w == 0 ? why : std::string("only 1 visible"));
  NcclOptions o;
  o.timeout = std::chrono::seconds(3);
  std::vector<std::string> errors(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto boot = make_gloo_communicator_in_process(r, 2, "nccl-timeout");
        auto c = make_nccl_communicator(*boot, r, o);
        if (r == 0) {
          DeviceFloats d(1024);
          const auto t0 = std::chrono::steady_clock::now();
          try {
            c->all_reduce_sum(d.span());
            errors[0] = "the all-reduce returned without its peer";
          } catch (const Error& e) {
            const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            if (std::string(e.what()).find("did not finish within 3 s") == std::string::npos || s > 20) {
              errors[0] = fmt::format("after {:.1f} s: {}", s, e.what());
            }
          }
        }
        boot->barrier();  // rank 1 waits here, never joining the all-reduce
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors[0], "");
  EXPECT_EQ(errors[1], "");
}

TEST(Nccl, WithoutNcclOrAGpuTheErrorSaysWhy) {
  std::string why;
  if (gpu_ranks(why) > 0) GTEST_SKIP() << "NCCL and a GPU are here; the error path needs their absence";
  auto boot = make_single_communicator();
  EXPECT_IO_ERROR(make_nccl_communicator(*boot, 0), why);
  EXPECT_FALSE(why.empty());
}

}  // namespace
}  // namespace zinf::runtime
