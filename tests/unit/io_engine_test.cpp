// The io_uring engine: round trips of random sizes at random offsets in every submission mode,
// many requests in flight, registered buffers and files, buffered fallback, and the errors a
// user can meet (misaligned O_DIRECT, short files, bad descriptors, memlock limits).
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstring>
#include <random>

#include "io_test_util.hpp"
#include "zinf/io/aligned_buffer.hpp"
#include "zinf/io/engine.hpp"
#include "zinf/io/file.hpp"

namespace zinf::io {
namespace {

using testing::random_bytes;
using testing::ScratchDir;

struct Region {
  std::uint64_t offset;
  std::uint64_t bytes;
};

// Non-overlapping regions at 4 KiB-aligned offsets with random gaps; sizes include 1 byte, exact
// blocks, block +- 1 and non-multiples of 4 KiB at the tail.
std::vector<Region> random_regions(std::size_t n, std::uint64_t max_bytes, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Region> out;
  std::uint64_t at = 0;
  const std::uint64_t fixed[] = {1, 4095, 4096, 4097, 65535, 65536, 65537, 1ull << 20};
  for (std::size_t i = 0; i < n; ++i) {
    std::uint64_t bytes = i < std::size(fixed) ? fixed[i] : 1 + rng() % max_bytes;
    at += (rng() % 4) * kIoAlignment;
    out.push_back({at, bytes});
    at += round_up(bytes, kIoAlignment);
  }
  return out;
}

struct Mode {
  std::uint64_t block;
  unsigned depth;
  unsigned rings;
  bool single_submit;
  bool overlap;
};

class EngineRoundTrip : public ::testing::TestWithParam<Mode> {};

TEST_P(EngineRoundTrip, RandomSizesAtRandomOffsets) {
  const Mode m = GetParam();
  ScratchDir dir;
  File f = File::open(dir.path() + "/data", OpenMode::kCreateReadWrite);
  EngineOptions o;
  o.block_size = m.block;
  o.queue_depth = m.depth;
  o.intra_op_parallelism = m.rings;
  o.single_submit = m.single_submit;
  o.overlap_events = m.overlap;
  IoEngine engine(o);

  const auto regions = random_regions(24, 3u << 20, m.block + m.depth);
  std::vector<AlignedBuffer> out;
  std::vector<std::vector<std::byte>> expected;
  std::vector<IoHandle> handles;
  for (std::size_t i = 0; i < regions.size(); ++i) {
    expected.push_back(random_bytes(regions[i].bytes, i));
    out.emplace_back(regions[i].bytes);
    std::memcpy(out.back().data(), expected.back().data(), regions[i].bytes);
    handles.push_back(engine.write(f, regions[i].offset, out.back().span(), regions[i].bytes));
  }
  for (auto& h : handles) ASSERT_NO_THROW(h.wait());
  handles.clear();
  std::vector<AlignedBuffer> in;
  for (const Region& r : regions) {
    in.emplace_back(r.bytes);
    handles.push_back(engine.read(f, r.offset, in.back().span(), r.bytes));
  }
  for (std::size_t i = 0; i < regions.size(); ++i) {
    ASSERT_NO_THROW(handles[i].wait());
    EXPECT_TRUE(handles[i].done());
    ASSERT_EQ(std::memcmp(in[i].data(), expected[i].data(), regions[i].bytes), 0)
        << "region " << i << " (offset " << regions[i].offset << ", " << regions[i].bytes << " bytes)";
  }
  const EngineCounters c = engine.counters();
  EXPECT_EQ(c.requests, 2 * regions.size());
  std::uint64_t total = 0;
  for (const Region& r : regions) total += r.bytes;
  EXPECT_GE(c.bytes, 2 * total);
}

INSTANTIATE_TEST_SUITE_P(Modes, EngineRoundTrip,
                         ::testing::Values(Mode{4096, 1, 1, false, true}, Mode{65536, 4, 3, false, true},
                                           Mode{1 << 20, 8, 1, false, true}, Mode{65536, 4, 2, true, true},
                                           Mode{65536, 4, 2, false, false}, Mode{131072, 64, 4, true, false}),
                         [](const ::testing::TestParamInfo<Mode>& param_info) {
                           const Mode& m = param_info.param;
                           return fmt::format("bs{}k_qd{}_p{}_{}_{}", m.block / 1024, m.depth, m.rings,
                                              m.single_submit ? "single" : "batch",
                                              m.overlap ? "overlap" : "nooverlap");
                         });

TEST(IoEngine, QueueDepthBoundsPiecesInFlight) {
  ScratchDir dir;
  File f = File::open(dir.path() + "/data", OpenMode::kCreateReadWrite);
  AlignedBuffer buf(8u << 20);
  EngineOptions o;
  o.block_size = 65536;
  o.queue_depth = 3;
  o.intra_op_parallelism = 2;
  IoEngine engine(o);
  std::vector<IoHandle> hs;
  for (std::uint64_t i = 0; i < 4; ++i) {
    hs.push_back(engine.write(f, i * (2u << 20), buf.span().subspan(i * (2u << 20), 2u << 20)));
  }
  for (auto& h : hs) h.wait();
  const EngineCounters c = engine.counters();
  EXPECT_EQ(c.pieces, 128u);
  EXPECT_EQ(c.max_ring_inflight, 3u);  // 128 pieces queued, never more than 3 per ring
}

TEST(IoEngine, SingleSubmitSubmitsEachPieceAloneAndBatchingDoesNot) {
  ScratchDir dir;
  File f = File::open(dir.path() + "/data", OpenMode::kCreateReadWrite);
  AlignedBuffer buf(8u << 20);
  for (bool single : {false, true}) {
    EngineOptions o;
    o.block_size = 65536;
    o.queue_depth = 16;
    o.single_submit = single;
    IoEngine engine(o);
    engine.write(f, 0, buf.span()).wait();  // 128 pieces
    const EngineCounters c = engine.counters();
    ASSERT_EQ(c.pieces, 128u);
    if (single) {
      EXPECT_GE(c.submit_calls, 128u);
    } else {
      // The first batch alone carries 16 pieces in one call; later calls carry at least one.
      EXPECT_LE(c.submit_calls, 128u - 15u + 2u);
    }
  }
}

TEST(IoEngine, ManyConcurrentRequestsFromSeveralThreads) {
  ScratchDir dir;
  File f = File::open(dir.path() + "/data", OpenMode::kCreateReadWrite);
  EngineOptions o;
  o.block_size = 16384;
  o.queue_depth = 16;
  o.intra_op_parallelism = 4;
  IoEngine engine(o);
  constexpr int kThreads = 4;
  constexpr int kPerThread = 64;
  constexpr std::uint64_t kBytes = 40000;  // not a multiple of 4 KiB
  const std::uint64_t stride = round_up(kBytes, kIoAlignment);
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<AlignedBuffer> bufs;
      std::vector<IoHandle> hs;
      for (int i = 0; i < kPerThread; ++i) {
        bufs.emplace_back(kBytes);
        std::memset(bufs.back().data(), t * kPerThread + i + 1, kBytes);
        hs.push_back(engine.write(f, (t * kPerThread + i) * stride, bufs.back().span(), kBytes));
      }
      for (auto& h : hs) h.wait();
      hs.clear();
      for (int i = 0; i < kPerThread; ++i) {
        std::memset(bufs[i].data(), 0, kBytes);
        hs.push_back(engine.read(f, (t * kPerThread + i) * stride, bufs[i].span(), kBytes));
      }
      for (int i = 0; i < kPerThread; ++i) {
        hs[i].wait();
        const auto want = static_cast<std::byte>(t * kPerThread + i + 1);
        for (std::uint64_t b = 0; b < kBytes; ++b) {
          if (bufs[i].data()[b] != want) {
            ++mismatches;
            break;
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST(IoEngine, RegisteredBuffersAndFilesAreUsed) {
  ScratchDir dir;
  File f = File::open(dir.path() + "/data", OpenMode::kCreateReadWrite);
  EngineOptions o;
  o.block_size = 65536;
  o.queue_depth = 8;
  o.intra_op_parallelism = 2;
  IoEngine engine(o);
  AlignedBuffer buf(1 << 20);
  const std::span<std::byte> whole = buf.span();
  const Registration reg = engine.register_buffers(std::span<const std::span<std::byte>>(&whole, 1));
  ASSERT_TRUE(reg.ok) << reg.reason;
  EXPECT_TRUE(engine.buffers_registered());
  const bool file_registered = engine.register_file(f);
  const auto data = random_bytes(1 << 20, 7);
  std::memcpy(buf.data(), data.data(), data.size());
  engine.write(f, 0, buf.span()).wait();
  std::memset(buf.data(), 0, buf.size());
  engine.read(f, 0, buf.span()).wait();
  EXPECT_EQ(std::memcmp(buf.data(), data.data(), data.size()), 0);
  const EngineCounters c = engine.counters();
  EXPECT_EQ(c.fixed_buffer_pieces, 32u);  // 2 x 1 MiB in 64 KiB pieces
  if (file_registered) {
    EXPECT_EQ(c.fixed_file_pieces, 32u);
  } else {
    std::printf("[   NOTE   ] this kernel has no sparse registered-file tables; plain descriptors were used\n");
  }
  // A buffer outside the registration goes through plain reads.
  AlignedBuffer other(65536);
  engine.read(f, 0, other.span()).wait();
  EXPECT_EQ(engine.counters().fixed_buffer_pieces, 32u);
  EXPECT_EQ(std::memcmp(other.data(), data.data(), 65536), 0);
  engine.unregister_file(f);
  engine.unregister_buffers();
  EXPECT_FALSE(engine.buffers_registered());
}

TEST(IoEngine, AReusedDescriptorNumberIsNotMistakenForARegisteredFile) {
  ScratchDir dir;
  IoEngine engine(EngineOptions{});
  AlignedBuffer buf(4096);
  std::memset(buf.data(), 'a', 4096);
  File first = File::open(dir.path() + "/first", OpenMode::kCreateReadWrite);
  if (!engine.register_file(first)) GTEST_SKIP() << "this kernel has no sparse registered-file tables";
  engine.write(first, 0, buf.span()).wait();
  const int fd = first.fd();
  first.close();  // closed without unregistering
  File second = File::open(dir.path() + "/second", OpenMode::kCreateReadWrite);
  ASSERT_EQ(second.fd(), fd);  // the kernel hands out the lowest free number
  std::memset(buf.data(), 'b', 4096);
  engine.write(second, 0, buf.span()).wait();  // must go to "second", not the stale slot
  AlignedBuffer back(4096);
  engine.read(second, 0, back.span()).wait();
  EXPECT_EQ(back.data()[0], std::byte{'b'});
  File again = File::open(dir.path() + "/first", OpenMode::kRead);
  engine.read(again, 0, back.span()).wait();
  EXPECT_EQ(back.data()[0], std::byte{'a'}) << "the write to 'second' landed in 'first'";
  EXPECT_TRUE(engine.register_file(second));  // takes over the stale slot
  engine.read(second, 0, back.span()).wait();
  EXPECT_EQ(back.data()[0], std::byte{'b'});
}

TEST(IoEngine, BufferedFallbackWhereODirectIsRefused) {
  // ramfs refuses O_DIRECT (tmpfs accepts it since Linux 6.6).
  testing::SmallFs ramfs(0, false, "ramfs");
  if (!ramfs.ok()) GTEST_SKIP() << ramfs.reason();
  File f = File::open(ramfs.path() + "/data", OpenMode::kCreateReadWrite);
  ASSERT_FALSE(f.direct());
  IoEngine engine(EngineOptions{});
  // Without O_DIRECT, unaligned offsets and plain vectors are fine.
  auto data = random_bytes(10001, 3);
  engine.write(f, 17, std::span<const std::byte>(data)).wait();
  std::vector<std::byte> back(10001);
  engine.read(f, 17, std::span<std::byte>(back)).wait();
  EXPECT_EQ(back, data);
}

TEST(IoEngine, ReadsStopAtEndOfFileOnlyPastTheRequestedBytes) {
  ScratchDir dir;
  File f = File::open(dir.path() + "/data", OpenMode::kCreateReadWrite);
  IoEngine engine(EngineOptions{});
  AlignedBuffer buf(20000);
  std::memset(buf.data(), 0x5a, buf.size());
  engine.write(f, 0, buf.span(), 20000).wait();
  ASSERT_EQ(::ftruncate(f.fd(), 10000), 0);
  // Exactly up to the (unaligned) end of file: fine, even though O_DIRECT rounds the length up.
  AlignedBuffer in(10000);
  EXPECT_NO_THROW(engine.read(f, 0, in.span(), 10000).wait());
  EXPECT_EQ(in.data()[9999], std::byte{0x5a});
  // Beyond it: a truncated file, reported with file and offset.
  AlignedBuffer more(20000);
  EXPECT_IO_ERROR(engine.read(f, 0, more.span(), 20000).wait(), "unexpected end of file", "/data", "truncated");
}

TEST(IoEngine, ErrorsNameOperationFileOffsetLengthAndReason) {
  ScratchDir dir;
  {
    File w = File::open(dir.path() + "/data", OpenMode::kCreateReadWrite);
    w.allocate(0, 1 << 20);
  }
  File ro = File::open(dir.path() + "/data", OpenMode::kRead);
  IoEngine engine(EngineOptions{});
  AlignedBuffer buf(8192);
  EXPECT_IO_ERROR(engine.write(ro, 4096, buf.span(), 8192).wait(), "write of 8192 bytes at offset 4096", "/data",
                  "Bad file descriptor");
  if (ro.direct()) {
    EXPECT_IO_ERROR(engine.read(ro, 100, buf.span(), 4096), "4 KiB-aligned", "offset 100");
    EXPECT_IO_ERROR(engine.read(ro, 0, std::span<std::byte>(buf.data() + 1, 4096), 4095), "4 KiB-aligned");
    EXPECT_IO_ERROR(engine.read(ro, 0, buf.span().first(4096), 4097), "buffer holds 4096 bytes", "needs 8192");
  }
  File closed;
  EXPECT_IO_ERROR(engine.read(closed, 0, buf.span(), 4096), "not open");
  // A buffer the kernel cannot access (EFAULT) fails that request only.
  void* bad = ::mmap(nullptr, 8192, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(bad, MAP_FAILED);
  EXPECT_IO_ERROR(engine.read(ro, 0, std::span<std::byte>(static_cast<std::byte*>(bad), 8192), 8192).wait(),
                  "read of 8192 bytes at offset 0", "Bad address");
  ::munmap(bad, 8192);
  EXPECT_NO_THROW(engine.read(ro, 0, buf.span(), 8192).wait());
}

TEST(IoEngine, OptionsAreValidated) {
  EngineOptions o;
  o.block_size = 1000;
  EXPECT_IO_ERROR(validate(o), "aio.block_size=1000", "multiple of 4096");
  o = EngineOptions{};
  o.queue_depth = 0;
  EXPECT_IO_ERROR(validate(o), "aio.queue_depth=0");
  o = EngineOptions{};
  o.intra_op_parallelism = 1000;
  EXPECT_IO_ERROR(IoEngine{o}, "aio.intra_op_parallelism=1000");
}

TEST(IoEngine, LatenciesAreRecordedPerPiece) {
  ScratchDir dir;
  File f = File::open(dir.path() + "/data", OpenMode::kCreateReadWrite);
  EngineOptions o;
  o.block_size = 65536;
  o.record_latency = true;
  IoEngine engine(o);
  AlignedBuffer buf(1 << 20);
  engine.write(f, 0, buf.span()).wait();
  const auto lat = engine.take_latencies();
  EXPECT_EQ(lat.size(), 16u);
  for (float v : lat) EXPECT_GE(v, 0.0f);
  EXPECT_TRUE(engine.take_latencies().empty());
}

TEST(IoEngine, MemlockLimitIsReportedWithTheFix) {
  // Root has CAP_IPC_LOCK and is never limited, so the registration runs as `nobody`.
  const int rc = testing::run_unprivileged([] {
    struct rlimit rl {64 * 1024, 64 * 1024};
    if (::setrlimit(RLIMIT_MEMLOCK, &rl) != 0) return 2;
    IoEngine engine(EngineOptions{});
    AlignedBuffer buf(64 << 20);
    const std::span<std::byte> whole = buf.span();
    const Registration reg = engine.register_buffers(std::span<const std::span<std::byte>>(&whole, 1));
    if (reg.ok) return 3;
    std::printf("reason: %s\n", reg.reason.c_str());
    if (reg.reason.find("memlock limit is 64 KiB") == std::string::npos) return 4;
    if (reg.reason.find("ulimit -l unlimited") == std::string::npos) return 5;
    // I/O still works, unregistered.
    ScratchDir dir("/tmp");
    ::chmod(dir.path().c_str(), 0777);
    File f = File::open(dir.path() + "/data", OpenMode::kCreateReadWrite);
    engine.write(f, 0, buf.span().first(1 << 20)).wait();
    return engine.counters().fixed_buffer_pieces == 0 ? 0 : 6;
  });
  EXPECT_EQ(rc, 0) << "child exit code (2 setrlimit, 3 registration succeeded, 4/5 reason text, 6 fixed pieces, "
                      "97 cannot drop privileges, 99 exception)";
}

}  // namespace
}  // namespace zinf::io
