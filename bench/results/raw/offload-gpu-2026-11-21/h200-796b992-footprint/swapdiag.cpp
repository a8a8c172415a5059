// Diagnostic (not part of the project): swap-store read pass vs raw engine reads on the same file.
#include <sys/mman.h>
#include <xxhash.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include "zinf/io/engine.hpp"
#include "zinf/io/file.hpp"
#include "zinf/io/swap_store.hpp"
using namespace zinf::io;
using Clock = std::chrono::steady_clock;
static double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
int main(int argc, char** argv) {
  std::string dir = argv[1];
  std::uint64_t slice = std::strtoull(argv[2], nullptr, 10) << 20;
  unsigned n = std::atoi(argv[3]), inflight = std::atoi(argv[4]);
  EngineOptions o;
  o.block_size = std::strtoull(argv[5], nullptr, 10) << 10;
  o.queue_depth = std::atoi(argv[6]);
  o.intra_op_parallelism = std::atoi(argv[7]);
  IoEngine engine(o);
  SwapStore store(engine, {{dir}, 0});
  std::vector<TensorSpec> specs;
  for (unsigned i = 0; i < n; ++i) specs.push_back({"s" + std::to_string(i), slice});
  auto ids = store.allocate(specs);
  std::size_t total = inflight * slice;
  auto* base = static_cast<std::byte*>(mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  std::memset(base, 1, total);
  mlock(base, total);
  std::span<std::byte> whole(base, total);
  auto reg = engine.register_buffers(std::span<const std::span<std::byte>>(&whole, 1));
  std::printf("registered %d %s\n", reg.ok, reg.reason.c_str());
  auto pass = [&](bool write) {
    std::vector<SwapHandle> h(inflight);
    auto t0 = Clock::now();
    for (unsigned i = 0; i < n; ++i) {
      auto& s = h[i % inflight];
      s.wait();
      std::span<std::byte> buf(base + (i % inflight) * slice, slice);
      s = write ? store.write(ids[i], buf) : store.read(ids[i], buf);
    }
    for (auto& s : h) s.wait();
    return double(n) * slice / since(t0) / 1e9;
  };
  std::printf("store write %.3f GB/s\n", pass(true));
  for (int r = 0; r < 2; ++r) std::printf("store read %.3f GB/s\n", pass(false));
  auto loc = store.locate(ids[0]);
  std::printf("parts %zu file %s off0 %llu\n", loc.size(), loc[0].file.c_str(), (unsigned long long)loc[0].offset);
  File f = File::open(loc[0].file, OpenMode::kRead, true);
  engine.register_file(f);
  auto raw = [&](std::uint64_t req, unsigned window, std::uint64_t footprint = 0) {
    if (footprint == 0) footprint = window * req;
    std::vector<IoHandle> h(window);
    std::uint64_t first = store.locate(ids[0])[0].offset, last = store.locate(ids[n - 1])[0].offset + slice;
    std::uint64_t bytes = last - first, nreq = (bytes + req - 1) / req;
    auto t0 = Clock::now();
    for (std::uint64_t i = 0; i < nreq; ++i) {
      auto& s = h[i % window];
      if (s.valid()) s.wait();
      std::uint64_t off = first + i * req, b = std::min(req, last - off);
      std::uint64_t slot = (i * req) % footprint;
      s = engine.read(f, off, std::span<std::byte>(base + slot, req), b);
    }
    for (auto& s : h) if (s.valid()) s.wait();
    return double(bytes) / since(t0) / 1e9;
  };
  for (int r = 0; r < 2; ++r) {
    std::printf("raw 2MiB x6 into 12 MiB: %.3f GB/s\n", raw(2ull << 20, 6));
    std::printf("raw 2MiB x6 rotating over %zu MiB: %.3f GB/s\n", total >> 20, raw(2ull << 20, 6, total));
    std::printf("raw slice-size requests x%u: %.3f GB/s\n", inflight, raw(slice, inflight));
  }
  auto t0 = Clock::now();
  volatile auto x = XXH3_64bits(base, slice);
  (void)x;
  std::printf("xxh3 %.2f GB/s\n", slice / since(t0) / 1e9);
  std::printf("store read %.3f GB/s\n", pass(false));
  engine.unregister_file(f);
}
