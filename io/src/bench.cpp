#include "zinf/io/bench.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <filesystem>
#include <mutex>
#include <random>
#include <thread>
#include <tuple>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "zinf/common/error.hpp"

namespace zinf::io {

namespace {

using Clock = std::chrono::steady_clock;

constexpr std::uint64_t kSizeGranule = 16ull << 20;  // the test file is a multiple of the largest swept block
constexpr std::uint64_t kSeqRequest = 64ull << 20;   // sequential requests: a typical tensor partition

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

}  // namespace

LatencyStats latency_stats(std::vector<float> micros) {
  LatencyStats s;
  s.samples = micros.size();
  if (micros.empty()) return s;
  std::sort(micros.begin(), micros.end());
  auto at = [&](double q) {
    const auto i = std::min(micros.size() - 1, static_cast<std::size_t>(q * static_cast<double>(micros.size())));
    return static_cast<double>(micros[i]);
  };
  s.p50 = at(0.50);
  s.p90 = at(0.90);
  s.p99 = at(0.99);
  s.max = static_cast<double>(micros.back());
  return s;
}

IoBench::IoBench(const std::string& dir, std::uint64_t size, BenchLimits limits) : limits_(limits) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    throw Error("cannot benchmark '{}': {}", dir,
                errno == ENOENT ? std::string("the directory does not exist") : errno_text(errno));
  }
  if (!S_ISDIR(st.st_mode)) throw Error("cannot benchmark '{}': it is not a directory", dir);
  size_ = size / kSizeGranule * kSizeGranule;
  if (size_ == 0) throw Error("benchmark size {} is too small: use at least 16M", size);
  const std::uint64_t free = free_bytes(dir);
  if (free < size_ + (64ull << 20)) {
    throw Error("not enough free space in '{}' for a {:.2f} GiB test file ({:.2f} GiB free): pass a smaller --size",
                dir, static_cast<double>(size_) / (1ull << 30), static_cast<double>(free) / (1ull << 30));
  }
  dir_ = (std::filesystem::path(dir) / fmt::format("zinf-bench-{}", ::getpid())).string();
  if (::mkdir(dir_.c_str(), 0755) != 0 && errno != EEXIST) {
    throw Error("cannot create '{}': {}", dir_,
                errno == EACCES || errno == EPERM ? std::string("permission denied") : errno_text(errno));
  }
  path_ = (std::filesystem::path(dir_) / "data.zsw").string();
  try {
    file_ = File::open(path_, OpenMode::kCreateReadWrite, /*direct=*/true);
    file_.allocate(0, size_);
    // Fill the file once so that reads touch written blocks.
    EngineOptions fill;
    fill.block_size = 1ull << 20;
    fill.queue_depth = 32;
    fill.intra_op_parallelism = 2;
    const auto t0 = Clock::now();
    BenchLimits saved = limits_;
    limits_.max_seconds = 0;
    run_engine(fill, IoOp::kWrite, /*random=*/false);
    limits_ = saved;
    fill_seconds_ = seconds_since(t0);
  } catch (...) {
    file_ = File();
    ::unlink(path_.c_str());
    ::rmdir(dir_.c_str());
    throw;
  }
}

IoBench::~IoBench() {
  file_ = File();
  ::unlink(path_.c_str());
  ::rmdir(dir_.c_str());
}

std::byte* IoBench::buffer(std::uint64_t bytes) {
  if (buffer_.size() < bytes) {
    buffer_ = AlignedBuffer(bytes);
    // A non-repeating pattern: no layer below can shortcut zero or repeated pages.
    std::mt19937_64 rng(42);
    auto* words = reinterpret_cast<std::uint64_t*>(buffer_.data());
    for (std::size_t i = 0; i < buffer_.size() / sizeof(std::uint64_t); ++i) words[i] = rng();
  }
  return buffer_.data();
}

BenchPoint IoBench::run_engine(const EngineOptions& settings, IoOp op, bool random) {
  EngineOptions opts = settings;
  opts.record_latency = true;
  validate(opts);
  const std::uint64_t bs = opts.block_size;
  const std::uint64_t target_inflight = bs * opts.queue_depth * opts.intra_op_parallelism;
  std::uint64_t request = 0;
  std::uint64_t window = 0;
  if (random) {
    request = bs;
    window = std::max<std::uint64_t>(1, std::min<std::uint64_t>(opts.queue_depth * opts.intra_op_parallelism,
                                                                 limits_.max_inflight_bytes / bs));
  } else {
    // Requests of a quarter of the target depth (at most 64 MiB, at least one block), and two
    // requests of slack: the rings stay full while the oldest request drains its last pieces.
    request = std::clamp(target_inflight / 4 / bs * bs, bs, std::max(bs, kSeqRequest / bs * bs));
    window = (target_inflight + request - 1) / request + 2;
    window = std::max<std::uint64_t>(1, std::min(window, limits_.max_inflight_bytes / request));
  }
  BenchPoint point;
  point.impl = "zinf";
  point.op = op;
  point.random = random;
  point.settings = settings;
  point.effective_queue_depth = static_cast<unsigned>(
      std::min<std::uint64_t>(opts.queue_depth, std::max<std::uint64_t>(1, window * request / bs / opts.intra_op_parallelism)));

  // Requests rotate through the footprint, one request-sized region each; the regions of the
  // `window` requests in flight never overlap because the footprint holds at least `window`.
  const std::uint64_t regions = std::max(window, limits_.buffer_footprint / request);
  point.buffer_footprint = regions * request;
  std::byte* base = buffer(regions * request);
  IoEngine engine(opts);
  const std::span<std::byte> whole(base, regions * request);
  const Registration reg = engine.register_buffers(std::span<const std::span<std::byte>>(&whole, 1));
  point.registered_buffers = reg.ok;
  if (!reg.ok) {
    static std::once_flag once;
    std::call_once(once, [&] { spdlog::warn("{}", reg.reason); });
  }
  (void)engine.register_file(file_);

  const std::uint64_t n_requests = random ? size_ / bs : (size_ + request - 1) / request;
  std::mt19937_64 rng(1234);
  std::uniform_int_distribution<std::uint64_t> pick(0, size_ / bs - 1);
  std::vector<IoHandle> slots(window);
  std::uint64_t done_bytes = 0;
  const auto t0 = Clock::now();
  std::uint64_t i = 0;
  bool out_of_time = false;
  for (; i < n_requests && !out_of_time; ++i) {
    IoHandle& slot = slots[i % window];
    if (slot.valid()) {
      slot.wait();
      done_bytes += slot.bytes();
      if (limits_.max_seconds > 0 && seconds_since(t0) > limits_.max_seconds) out_of_time = true;
    }
    const std::uint64_t offset = random ? pick(rng) * bs : i * request;
    const std::uint64_t bytes = std::min(request, size_ - offset);
    const std::span<std::byte> buf(base + (i % regions) * request, request);
    slot = op == IoOp::kRead ? engine.read(file_, offset, buf, bytes) : engine.write(file_, offset, buf, bytes);
  }
  for (auto& slot : slots) {
    if (slot.valid()) {
      slot.wait();
      done_bytes += slot.bytes();
    }
  }
  point.seconds = seconds_since(t0);
  point.bytes = done_bytes;
  point.gbps = static_cast<double>(done_bytes) / point.seconds / 1e9;
  point.latency = latency_stats(engine.take_latencies());
  const EngineCounters c = engine.counters();
  point.resubmitted = c.resubmitted_short + c.resubmitted_again;
  engine.unregister_file(file_);
  return point;
}

BenchPoint IoBench::run_baseline(std::uint64_t block_size, unsigned threads, IoOp op, bool random) {
  EngineOptions opts;
  opts.block_size = block_size;
  opts.intra_op_parallelism = threads;
  opts.queue_depth = 1;
  validate(opts);
  BenchPoint point;
  point.impl = "pread";
  point.op = op;
  point.random = random;
  point.settings = opts;
  point.effective_queue_depth = 1;
  std::byte* base = buffer(block_size * threads);
  const std::uint64_t n_blocks = size_ / block_size;
  std::atomic<std::uint64_t> next{0};
  std::atomic<std::uint64_t> done_bytes{0};
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::exception_ptr failure;
  std::vector<float> latencies;
  const int fd = file_.fd();
  const auto t0 = Clock::now();
  auto body = [&](unsigned t) {
    std::vector<float> mine;
    std::mt19937_64 rng(1000 + t);
    std::uniform_int_distribution<std::uint64_t> pick(0, n_blocks - 1);
    std::byte* buf = base + t * block_size;
    try {
      while (!stop.load(std::memory_order_relaxed)) {
        const std::uint64_t k = next.fetch_add(1);
        if (k >= n_blocks) break;
        const std::uint64_t offset = (random ? pick(rng) : k) * block_size;
        const auto s = Clock::now();
        std::uint64_t moved = 0;
        while (moved < block_size) {
          const ssize_t n = op == IoOp::kRead
                                ? ::pread(fd, buf + moved, block_size - moved, static_cast<off_t>(offset + moved))
                                : ::pwrite(fd, buf + moved, block_size - moved, static_cast<off_t>(offset + moved));
          if (n < 0 && errno == EINTR) continue;
          if (n <= 0) {
            throw Error("baseline {} of {} bytes at offset {} of '{}' failed: {}", op == IoOp::kRead ? "pread" : "pwrite",
                        block_size - moved, offset + moved, path_, n == 0 ? std::string("no progress") : errno_text(errno));
          }
          moved += static_cast<std::uint64_t>(n);
        }
        mine.push_back(std::chrono::duration<float, std::micro>(Clock::now() - s).count());
        done_bytes.fetch_add(block_size, std::memory_order_relaxed);
        if (limits_.max_seconds > 0 && seconds_since(t0) > limits_.max_seconds) stop = true;
      }
    } catch (...) {
      std::lock_guard lock(mu);
      if (!failure) failure = std::current_exception();
      stop = true;
    }
    std::lock_guard lock(mu);
    latencies.insert(latencies.end(), mine.begin(), mine.end());
  };
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) pool.emplace_back(body, t);
  for (auto& th : pool) th.join();
  if (failure) std::rethrow_exception(failure);
  point.seconds = seconds_since(t0);
  point.bytes = done_bytes.load();
  point.gbps = static_cast<double>(point.bytes) / point.seconds / 1e9;
  point.latency = latency_stats(std::move(latencies));
  return point;
}

std::string size_label(std::uint64_t b) {
  if (b >= (1ull << 30) && b % (1ull << 30) == 0) return fmt::format("{}G", b >> 30);
  if (b >= (1ull << 20) && b % (1ull << 20) == 0) return fmt::format("{}M", b >> 20);
  if (b >= (1ull << 10) && b % (1ull << 10) == 0) return fmt::format("{}K", b >> 10);
  return std::to_string(b);
}

const BenchPoint* top(const std::vector<BenchPoint>& v, IoOp op) {
  const BenchPoint* best = nullptr;
  for (const auto& p : v) {
    if (p.op == op && (best == nullptr || p.gbps > best->gbps)) best = &p;
  }
  return best;
}

SweepResult IoBench::sweep(const SweepGrid& o, const std::function<void(const std::string&)>& progress) {
  if (o.blocks.empty() || o.depths.empty() || o.parallelism.empty()) {
    throw Error("io sweep: the grid is empty (give at least one block size, queue depth and parallelism)");
  }
  SweepResult r;
  const std::size_t total = o.blocks.size() * o.depths.size() * o.parallelism.size() +
                            o.blocks.size() * o.parallelism.size();
  std::size_t n = 0;
  // Baseline and engine settings alternate, so a drive whose speed drifts during the sweep (cloud
  // burst credits, thermal throttling) favours neither side.
  for (std::uint64_t bs : o.blocks) {
    for (unsigned par : o.parallelism) {
      progress(fmt::format("\r  sweep {}/{}: pread block {} threads {}      ", ++n, total, size_label(bs), par));
      r.baseline.push_back(run_baseline(bs, par, IoOp::kWrite, false));
      r.baseline.push_back(run_baseline(bs, par, IoOp::kRead, false));
      for (unsigned qd : o.depths) {
        EngineOptions e;
        e.block_size = bs;
        e.queue_depth = qd;
        e.intra_op_parallelism = par;
        progress(fmt::format("\r  sweep {}/{}: zinf block {} qd {} par {}      ", ++n, total,
                                            size_label(bs), qd, par));
        r.engine.push_back(run_engine(e, IoOp::kWrite, false));
        r.engine.push_back(run_engine(e, IoOp::kRead, false));
      }
    }
  }
  progress(fmt::format("\r{:60}\r", ""));
  r.top_read = top(r.engine, IoOp::kRead);
  r.top_write = top(r.engine, IoOp::kWrite);
  r.base_read = top(r.baseline, IoOp::kRead);
  r.base_write = top(r.baseline, IoOp::kWrite);
  // One setting for both directions: the best sum of read and write, each relative to its best;
  // among settings within 2% of that, the one with the fewest threads, then the shallowest queue.
  struct Cand {
    EngineOptions o;
    double read = 0, write = 0, score = 0;
  };
  std::vector<Cand> cands;
  for (std::size_t i = 0; i + 1 < r.engine.size(); i += 2) {
    const BenchPoint& w = r.engine[i];
    const BenchPoint& rd = r.engine[i + 1];
    cands.push_back({w.settings, rd.gbps, w.gbps, rd.gbps / r.top_read->gbps + w.gbps / r.top_write->gbps});
  }
  double best_score = 0;
  for (const auto& c : cands) best_score = std::max(best_score, c.score);
  const Cand* pick = nullptr;
  for (const auto& c : cands) {
    if (c.score < 0.98 * best_score) continue;
    const auto cost = [](const EngineOptions& e) {
      return std::make_tuple(e.intra_op_parallelism, e.queue_depth, e.block_size);
    };
    if (pick == nullptr || cost(c.o) < cost(pick->o)) pick = &c;
  }
  if (pick == nullptr) throw Error("io sweep: the grid is empty (give at least one block size, queue depth and parallelism)");
  r.best = pick->o;
  r.best.record_latency = false;
  r.best_read = pick->read;
  r.best_write = pick->write;
  return r;
}

}  // namespace zinf::io
