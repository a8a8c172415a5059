// The storage benchmark's mechanics on a small file: every point moves the bytes it reports, the
// reads follow a full fill, latency statistics come from the samples.
#include <gtest/gtest.h>

#include <filesystem>

#include "io_test_util.hpp"
#include "zinf/io/bench.hpp"

namespace zinf::io {
namespace {

TEST(IoBench, LatencyStatsArePercentilesOfTheSamples) {
  std::vector<float> v;
  for (int i = 100; i >= 1; --i) v.push_back(static_cast<float>(i));
  const LatencyStats s = latency_stats(v);
  EXPECT_EQ(s.samples, 100u);
  EXPECT_DOUBLE_EQ(s.p50, 51.0);
  EXPECT_DOUBLE_EQ(s.p90, 91.0);
  EXPECT_DOUBLE_EQ(s.p99, 100.0);
  EXPECT_DOUBLE_EQ(s.max, 100.0);
  EXPECT_EQ(latency_stats({}).samples, 0u);
}

TEST(IoBench, EnginePointsAndBaselineMoveTheWholeFile) {
  testing::ScratchDir dir;
  std::string file;
  {
    IoBench bench(dir.path(), 40u << 20, BenchLimits{});
    EXPECT_EQ(bench.size(), 32u << 20);  // rounded down to 16 MiB
    file = bench.file_path();
    EXPECT_TRUE(std::filesystem::exists(file));
    EngineOptions o;
    o.block_size = 256u << 10;
    o.queue_depth = 4;
    o.intra_op_parallelism = 2;
    for (IoOp op : {IoOp::kRead, IoOp::kWrite}) {
      for (bool random : {false, true}) {
        const BenchPoint p = bench.run_engine(o, op, random);
        EXPECT_EQ(p.bytes, 32u << 20);
        EXPECT_GT(p.gbps, 0.0);
        EXPECT_EQ(p.latency.samples, 128u);  // 32 MiB in 256 KiB pieces
        EXPECT_LE(p.latency.p50, p.latency.p99);
        EXPECT_EQ(p.effective_queue_depth, 4u);
        const BenchPoint b = bench.run_baseline(o.block_size, 2, op, random);
        EXPECT_EQ(b.bytes, 32u << 20);
        EXPECT_EQ(b.latency.samples, 128u);
        EXPECT_EQ(b.impl, "pread");
      }
    }
  }
  EXPECT_FALSE(std::filesystem::exists(file));
  EXPECT_FALSE(std::filesystem::exists(std::filesystem::path(file).parent_path()));
}

TEST(IoBench, RequestsRotateThroughTheBufferFootprint) {
  testing::ScratchDir dir;
  EngineOptions o;
  o.block_size = 256u << 10;
  o.queue_depth = 4;
  o.intra_op_parallelism = 2;  // 2 MiB in flight: 512 KiB requests, 6 of them in the window
  for (const auto& [asked, got] : std::vector<std::pair<std::uint64_t, std::uint64_t>>{
           {0, 3u << 20}, {1u << 20, 3u << 20}, {10u << 20, 10u << 20}, {(10u << 20) + 4096, 10u << 20}}) {
    BenchLimits limits;
    limits.buffer_footprint = asked;
    IoBench bench(dir.path(), 16u << 20, limits);
    for (IoOp op : {IoOp::kWrite, IoOp::kRead}) {
      const BenchPoint p = bench.run_engine(o, op, /*random=*/false);
      EXPECT_EQ(p.buffer_footprint, got) << "asked for " << asked;  // never less than the window
      EXPECT_EQ(p.bytes, 16u << 20);
    }
  }
}

TEST(IoBench, HostMemoryCapLowersTheEffectiveDepth) {
  testing::ScratchDir dir;
  IoBench bench(dir.path(), 16u << 20, BenchLimits{0, 4u << 20});
  EngineOptions o;
  o.block_size = 1u << 20;
  o.queue_depth = 16;
  o.intra_op_parallelism = 2;
  const BenchPoint p = bench.run_engine(o, IoOp::kRead, /*random=*/true);
  EXPECT_EQ(p.effective_queue_depth, 2u);  // 4 MiB of buffers = 4 pieces over 2 rings
  EXPECT_EQ(p.bytes, 16u << 20);
}

TEST(IoBench, BadDirectoriesAndSizes) {
  testing::ScratchDir dir;
  EXPECT_IO_ERROR((IoBench{dir.path() + "/nope", 16u << 20, {}}), "does not exist");
  EXPECT_IO_ERROR((IoBench{dir.path(), 1u << 20, {}}), "too small");
  EXPECT_IO_ERROR((IoBench{dir.path(), 1ull << 60, {}}), "not enough free space", "--size");
}

}  // namespace
}  // namespace zinf::io
