#include "zinf/io/engine.hpp"

#include <liburing.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <unordered_map>

#include <spdlog/spdlog.h>

#include "zinf/common/error.hpp"
#include "zinf/io/aligned_buffer.hpp"
#include "zinf/io/file.hpp"

namespace zinf::io {

namespace {

using Clock = std::chrono::steady_clock;

constexpr std::uint64_t kWakeTag = 1;          // user_data of the eventfd poll (pieces are pointers)
constexpr unsigned kFileSlots = 256;           // sparse registered-file table per ring
constexpr std::uint64_t kMaxRegisteredIovec = 1ull << 30;  // the kernel's limit per registered buffer
constexpr std::uint64_t kMaxBlockSize = 256ull << 20;
constexpr unsigned kMaxQueueDepth = 4096;
constexpr unsigned kMaxParallelism = 64;

std::string human_bytes(std::uint64_t b) {
  if (b >= (1ull << 30) && b % (1ull << 30) == 0) return fmt::format("{} GiB", b >> 30);
  if (b >= (1ull << 20) && b % (1ull << 20) == 0) return fmt::format("{} MiB", b >> 20);
  if (b >= (1ull << 10) && b % (1ull << 10) == 0) return fmt::format("{} KiB", b >> 10);
  return fmt::format("{} bytes", b);
}

std::string memlock_limit_text() {
  struct rlimit rl {};
  if (::getrlimit(RLIMIT_MEMLOCK, &rl) != 0) return "unknown";
  if (rl.rlim_cur == RLIM_INFINITY) return "unlimited";
  return human_bytes(rl.rlim_cur);
}

const char* op_name(IoOp op) { return op == IoOp::kRead ? "read" : "write"; }

std::string io_error_hint(int err, bool direct) {
  switch (err) {
    case EINVAL:
      return direct ? " (O_DIRECT needs 4 KiB-aligned offsets, lengths and buffers)" : "";
    case ENOSPC: return " (the file system is full)";
    case EDQUOT: return " (the disk quota is exhausted)";
    case EIO: return " (the device reported an I/O error: check `dmesg` and the drive's health)";
    case EBADF: return " (the file was closed while I/O was in flight)";
    default: return "";
  }
}

}  // namespace

namespace detail {

struct Request;

// One piece of a request: at most block_size bytes, in flight on one ring at a time.
struct Piece {
  Request* req = nullptr;
  std::uint64_t offset = 0;   // file offset of the next byte to transfer
  std::byte* data = nullptr;  // next byte of the buffer
  std::uint32_t remaining = 0;  // bytes still to transfer (including O_DIRECT tail padding)
  std::uint32_t needed = 0;     // of those, bytes that must transfer (reads may stop at end of file)
  std::int32_t buf_index = -1;  // registered buffer holding [data, data + remaining), or -1
  Clock::time_point started{};
};

struct Request {
  IoOp op = IoOp::kRead;
  int fd = -1;
  int fixed_file = -1;
  bool direct = false;
  std::string path;
  std::uint64_t offset = 0;
  std::uint64_t bytes = 0;
  std::vector<Piece> pieces;
  std::atomic<std::uint32_t> pending{0};
  std::atomic<bool> finished{false};
  std::mutex error_mu;
  std::string error;  // first failure
  std::shared_ptr<Request> keep_alive;  // the engine's reference while pieces are in flight
};

}  // namespace detail

using detail::Piece;
using detail::Request;

bool IoHandle::done() const noexcept { return req_ == nullptr || req_->finished.load(std::memory_order_acquire); }

void IoHandle::wait() const {
  if (req_ == nullptr) return;
  req_->finished.wait(false, std::memory_order_acquire);
  std::lock_guard lock(req_->error_mu);
  if (!req_->error.empty()) throw Error(req_->error);
}

std::uint64_t IoHandle::bytes() const noexcept { return req_ == nullptr ? 0 : req_->bytes; }

void validate(const EngineOptions& o) {
  if (o.block_size == 0 || o.block_size % kIoAlignment != 0 || o.block_size > kMaxBlockSize) {
    throw Error("aio.block_size={} is invalid: it must be a multiple of 4096 bytes between 4 KiB and 256 MiB "
                "(DeepSpeed's default is 1048576)",
                o.block_size);
  }
  if (o.queue_depth == 0 || o.queue_depth > kMaxQueueDepth) {
    throw Error("aio.queue_depth={} is invalid: it must be between 1 and {}", o.queue_depth, kMaxQueueDepth);
  }
  if (o.intra_op_parallelism == 0 || o.intra_op_parallelism > kMaxParallelism) {
    throw Error("aio.intra_op_parallelism={} is invalid: it must be between 1 and {}", o.intra_op_parallelism,
                kMaxParallelism);
  }
}

// ---------------------------------------------------------------------------------------------

struct Worker {
  unsigned index = 0;
  io_uring ring{};
  bool ring_ok = false;
  bool files_ok = false;  // sparse file table registered
  int wake_fd = -1;
  std::uint64_t wake_value = 0;  // eventfd read target; must outlive the in-flight read
  unsigned inflight = 0;         // pieces submitted and not completed
  std::vector<Piece*> retry;     // pieces to resubmit (short transfer, -EAGAIN)
  std::vector<float> latencies;
  std::thread thread;
};

struct IoEngine::Impl {
  explicit Impl(const EngineOptions& o) : options(o) {}

  EngineOptions options;
  std::vector<std::unique_ptr<Worker>> workers;

  // Shared work queue, control tasks and idle flags, all under `mu`.
  std::mutex mu;
  std::deque<Piece*> queue;
  std::vector<std::deque<std::function<void(Worker&)>>> tasks;
  std::vector<bool> idle;
  bool stopping = false;

  // Registered buffers (sorted by start) and files.
  std::shared_mutex reg_mu;
  struct Region {
    const std::byte* begin;
    const std::byte* end;
    int index;
  };
  std::vector<Region> regions;
  bool files_supported = false;
  struct FileSlot {
    std::uint64_t file_id;  // File::id(): a closed file's descriptor number may come back
    int slot;
  };
  std::unordered_map<int, FileSlot> file_slots;  // fd -> slot
  std::vector<bool> slot_used;

  std::atomic<std::uint64_t> n_requests{0}, n_pieces{0}, n_bytes{0}, n_short{0}, n_again{0}, n_fixed_buf{0},
      n_fixed_file{0}, n_submit_calls{0};
  std::atomic<unsigned> max_ring_inflight{0};

  void wake(Worker& w) {
    const std::uint64_t one = 1;
    // A full eventfd counter (EAGAIN) still wakes the poll; nothing else can fail here.
    [[maybe_unused]] const ssize_t n = ::write(w.wake_fd, &one, sizeof one);
  }

  // Runs `fn` on every worker thread and waits; rethrows the first exception.
  void run_on_workers(const std::function<void(Worker&)>& fn) {
    std::vector<std::future<void>> done;
    {
      std::lock_guard lock(mu);
      for (auto& w : workers) {
        auto promise = std::make_shared<std::promise<void>>();
        done.push_back(promise->get_future());
        tasks[w->index].push_back([fn, promise](Worker& worker) {
          try {
            fn(worker);
            promise->set_value();
          } catch (...) {
            promise->set_exception(std::current_exception());
          }
        });
        idle[w->index] = false;
      }
    }
    for (auto& w : workers) wake(*w);
    for (auto& f : done) f.get();
  }

  void finish_piece(Worker& w, Piece& p, const std::string* error) {
    Request& r = *p.req;
    if (error != nullptr) {
      std::lock_guard lock(r.error_mu);
      if (r.error.empty()) r.error = *error;
    }
    if (options.record_latency) {
      w.latencies.push_back(std::chrono::duration<float, std::micro>(Clock::now() - p.started).count());
    }
    if (r.pending.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::shared_ptr<Request> keep = std::move(r.keep_alive);
      r.finished.store(true, std::memory_order_release);
      r.finished.notify_all();
    }
  }

  void arm_wake(Worker& w) {
    io_uring_sqe* sqe = io_uring_get_sqe(&w.ring);
    ZINF_ASSERT(sqe != nullptr, "io_uring submission queue full while arming the wake-up poll");
    io_uring_prep_poll_add(sqe, w.wake_fd, POLLIN);
    io_uring_sqe_set_data64(sqe, kWakeTag);
  }

  void prep(Worker& w, Piece& p) {
    io_uring_sqe* sqe = io_uring_get_sqe(&w.ring);
    ZINF_ASSERT(sqe != nullptr, "io_uring submission queue full: more than queue_depth pieces prepared");
    const Request& r = *p.req;
    const int fd = r.fixed_file >= 0 ? r.fixed_file : r.fd;
    if (r.op == IoOp::kRead) {
      if (p.buf_index >= 0) {
        io_uring_prep_read_fixed(sqe, fd, p.data, p.remaining, p.offset, p.buf_index);
      } else {
        io_uring_prep_read(sqe, fd, p.data, p.remaining, p.offset);
      }
    } else {
      if (p.buf_index >= 0) {
        io_uring_prep_write_fixed(sqe, fd, p.data, p.remaining, p.offset, p.buf_index);
      } else {
        io_uring_prep_write(sqe, fd, p.data, p.remaining, p.offset);
      }
    }
    if (r.fixed_file >= 0) sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data(sqe, &p);
    if (p.started == Clock::time_point{}) p.started = Clock::now();
    ++w.inflight;
    unsigned seen = max_ring_inflight.load(std::memory_order_relaxed);
    while (w.inflight > seen && !max_ring_inflight.compare_exchange_weak(seen, w.inflight)) {
    }
  }

  void submit_prepared(Worker& w) {
    while (io_uring_sq_ready(&w.ring) > 0) {
      const int rc = io_uring_submit(&w.ring);
      if (rc >= 0) {
        n_submit_calls.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      if (rc == -EINTR || rc == -EAGAIN || rc == -EBUSY) {
        // EBUSY: completions must be reaped first; EAGAIN: the kernel is short of memory for now.
        if (rc == -EBUSY) reap(w, /*wait=*/false);
        std::this_thread::yield();
        continue;
      }
      ZINF_ASSERT(false, "io_uring_submit failed on ring {}: {}", w.index, errno_text(-rc));
    }
  }

  void handle_completion(Worker& w, io_uring_cqe* cqe) {
    const std::uint64_t tag = io_uring_cqe_get_data64(cqe);
    const int res = cqe->res;
    if (tag == kWakeTag) {
      std::uint64_t value = 0;
      while (::read(w.wake_fd, &value, sizeof value) > 0) {
      }
      arm_wake(w);
      return;
    }
    Piece& p = *reinterpret_cast<Piece*>(tag);
    const Request& r = *p.req;
    --w.inflight;
    if (res == -EAGAIN || res == -EINTR) {
      n_again.fetch_add(1, std::memory_order_relaxed);
      w.retry.push_back(&p);
      return;
    }
    if (res < 0) {
      const std::string msg =
          fmt::format("{} of {} bytes at offset {} of '{}' failed: {}{}", op_name(r.op), p.remaining, p.offset,
                      r.path, errno_text(-res), io_error_hint(-res, r.direct));
      finish_piece(w, p, &msg);
      return;
    }
    if (res == 0) {
      if (r.op == IoOp::kRead && p.needed == 0) {
        finish_piece(w, p, nullptr);
        return;
      }
      const std::string msg =
          r.op == IoOp::kRead
              ? fmt::format("unexpected end of file reading '{}' at offset {}: {} more bytes were expected (the file "
                            "is shorter than the data written to it: truncated or replaced)",
                            r.path, p.offset, p.needed)
              : fmt::format("write of {} bytes at offset {} of '{}' made no progress (the device accepted 0 bytes)",
                            p.remaining, p.offset, r.path);
      finish_piece(w, p, &msg);
      return;
    }
    const auto n = static_cast<std::uint32_t>(res);
    n_bytes.fetch_add(std::min(n, p.needed), std::memory_order_relaxed);
    p.remaining -= std::min(n, p.remaining);
    p.needed -= std::min(n, p.needed);
    if (p.remaining == 0 || (r.op == IoOp::kRead && p.needed == 0)) {
      finish_piece(w, p, nullptr);
      return;
    }
    // Short transfer: continue with the rest of the piece (outside the registered buffer's
    // bounds nothing changes, so a fixed buffer stays valid).
    n_short.fetch_add(1, std::memory_order_relaxed);
    p.offset += n;
    p.data += n;
    w.retry.push_back(&p);
  }

  // Handles every available completion; with `wait`, blocks for at least one first.
  void reap(Worker& w, bool wait) {
    io_uring_cqe* cqe = nullptr;
    if (wait) {
      int rc;
      do {
        rc = io_uring_wait_cqe(&w.ring, &cqe);
      } while (rc == -EINTR || rc == -EAGAIN);
      ZINF_ASSERT(rc == 0, "io_uring_wait_cqe failed on ring {}: {}", w.index, errno_text(-rc));
    }
    unsigned head = 0;
    unsigned seen = 0;
    io_uring_for_each_cqe(&w.ring, head, cqe) {
      handle_completion(w, cqe);
      ++seen;
    }
    io_uring_cq_advance(&w.ring, seen);
  }

  void worker_main(Worker& w) {
    const unsigned qd = options.queue_depth;
    std::vector<Piece*> batch;
    batch.reserve(qd);
    std::vector<std::function<void(Worker&)>> my_tasks;
    for (;;) {
      // Control tasks (registration, latency harvest) run on the ring's own thread.
      batch.clear();
      my_tasks.clear();
      bool exit_now = false;
      const bool may_fill = options.overlap_events || w.inflight == 0;
      {
        std::lock_guard lock(mu);
        auto& mine = tasks[w.index];
        while (!mine.empty()) {
          my_tasks.push_back(std::move(mine.front()));
          mine.pop_front();
        }
        if (may_fill) {
          unsigned room = qd - w.inflight;
          while (room > 0 && !w.retry.empty()) {
            batch.push_back(w.retry.back());
            w.retry.pop_back();
            --room;
          }
          while (room > 0 && !queue.empty()) {
            batch.push_back(queue.front());
            queue.pop_front();
            --room;
          }
        }
        if (batch.empty() && my_tasks.empty() && w.inflight == 0 && w.retry.empty()) {
          if (stopping && queue.empty()) {
            exit_now = true;
          } else {
            idle[w.index] = true;
          }
        }
      }
      for (auto& t : my_tasks) t(w);
      if (exit_now) break;
      if (!my_tasks.empty() && batch.empty()) continue;  // look at the queue again before sleeping
      for (Piece* p : batch) {
        prep(w, *p);
        if (options.single_submit) submit_prepared(w);
      }
      submit_prepared(w);  // also submits a re-armed wake-up poll
      if (options.overlap_events || w.inflight == 0) {
        reap(w, /*wait=*/true);
      } else {
        // Not overlapped: the whole batch completes before the next one is submitted.
        while (w.inflight > 0) {
          reap(w, /*wait=*/true);
          submit_prepared(w);
        }
      }
    }
  }
};

namespace {

// Creates the ring on the worker's own thread (so it can be single-issuer).
void setup_ring(Worker& w, unsigned queue_depth, bool& files_ok) {
  io_uring_params params{};
  params.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN;
  int rc = io_uring_queue_init_params(queue_depth + 1, &w.ring, &params);
  if (rc == -EINVAL) {  // kernel older than 6.0: no single-issuer / cooperative task running
    params = io_uring_params{};
    rc = io_uring_queue_init_params(queue_depth + 1, &w.ring, &params);
  }
  if (rc < 0) {
    const int err = -rc;
    std::string why;
    if (err == EPERM || err == EACCES) {
      why = "io_uring is disabled here (sysctl kernel.io_uring_disabled, or a container's seccomp profile; "
            "with Docker run with --security-opt seccomp=unconfined or a profile that allows io_uring_setup)";
    } else if (err == ENOSYS) {
      why = "this kernel has no io_uring (Linux 5.10 or newer is needed)";
    } else if (err == ENOMEM) {
      why = fmt::format("the kernel refused the ring's memory (on Linux before 5.12 it counts against the memlock "
                        "limit, now {}: raise it with `ulimit -l unlimited`)",
                        memlock_limit_text());
    } else {
      why = errno_text(err);
    }
    throw Error("cannot create an io_uring ring with {} entries: {}", queue_depth + 1, why);
  }
  w.ring_ok = true;
  files_ok = io_uring_register_files_sparse(&w.ring, kFileSlots) == 0;
}

}  // namespace

IoEngine::IoEngine(const EngineOptions& options) : impl_(std::make_unique<Impl>(options)) {
  validate(options);
  Impl& im = *impl_;
  const unsigned n = options.intra_op_parallelism;
  im.tasks.resize(n);
  im.idle.assign(n, false);
  im.slot_used.assign(kFileSlots, false);
  std::vector<std::future<bool>> ready;
  auto stop_started = [&im]() {
    {
      std::lock_guard lock(im.mu);
      im.stopping = true;
    }
    for (auto& w : im.workers) {
      if (w->thread.joinable()) {
        im.wake(*w);
        w->thread.join();
      }
      if (w->ring_ok) io_uring_queue_exit(&w->ring);
      if (w->wake_fd >= 0) ::close(w->wake_fd);
    }
  };
  try {
    for (unsigned i = 0; i < n; ++i) {
      auto w = std::make_unique<Worker>();
      w->index = i;
      w->wake_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
      if (w->wake_fd < 0) throw Error("cannot create an eventfd for the I/O engine: {}", errno_text(errno));
      auto promise = std::make_shared<std::promise<bool>>();
      ready.push_back(promise->get_future());
      Worker* wp = w.get();
      const unsigned qd = options.queue_depth;
      w->thread = std::thread([&im, wp, promise, qd]() {
        bool files_ok = false;
        try {
          setup_ring(*wp, qd, files_ok);
          im.arm_wake(*wp);
          im.submit_prepared(*wp);
        } catch (...) {
          promise->set_exception(std::current_exception());
          return;
        }
        promise->set_value(files_ok);
        im.worker_main(*wp);
      });
      im.workers.push_back(std::move(w));
    }
    bool files_ok = true;
    for (auto& f : ready) files_ok = f.get() && files_ok;
    im.files_supported = files_ok;
  } catch (...) {
    for (auto& f : ready) {
      if (f.valid()) {
        try {
          f.get();
        } catch (...) {  // the first error is the one rethrown below
        }
      }
    }
    stop_started();
    throw;
  }
  spdlog::debug("io engine: {} ring(s), queue depth {}, block {}, registered files {}", n, options.queue_depth,
                human_bytes(options.block_size), im.files_supported ? "yes" : "no");
}

IoEngine::~IoEngine() {
  Impl& im = *impl_;
  {
    std::lock_guard lock(im.mu);
    im.stopping = true;
  }
  for (auto& w : im.workers) im.wake(*w);
  for (auto& w : im.workers) w->thread.join();
  for (auto& w : im.workers) {
    io_uring_queue_exit(&w->ring);
    ::close(w->wake_fd);
  }
}

const EngineOptions& IoEngine::options() const noexcept { return impl_->options; }

IoHandle IoEngine::read(const File& file, std::uint64_t offset, std::span<std::byte> buffer, std::uint64_t bytes) {
  return submit(IoOp::kRead, file, offset, buffer.data(), buffer.size(), bytes);
}

IoHandle IoEngine::write(const File& file, std::uint64_t offset, std::span<const std::byte> buffer,
                         std::uint64_t bytes) {
  // The engine never writes into a write buffer; the cast only lets reads and writes share Piece.
  return submit(IoOp::kWrite, file, offset, const_cast<std::byte*>(buffer.data()), buffer.size(), bytes);
}

IoHandle IoEngine::submit(IoOp op, const File& file, std::uint64_t offset, std::byte* data, std::uint64_t capacity,
                          std::uint64_t bytes) {
  Impl& im = *impl_;
  if (!file.is_open()) throw Error("{} of {} bytes at offset {}: the file is not open", op_name(op), bytes, offset);
  const bool direct = file.direct();
  const std::uint64_t transfer = direct ? round_up(bytes, kIoAlignment) : bytes;
  if (direct && (!is_aligned(offset) || !is_aligned(data))) {
    throw Error("{} of {} bytes at offset {} of '{}': O_DIRECT needs a 4 KiB-aligned offset and buffer address "
                "(use zinf::io::AlignedBuffer)",
                op_name(op), bytes, offset, file.path());
  }
  if (capacity < transfer) {
    throw Error("{} of {} bytes at offset {} of '{}': the buffer holds {} bytes but the transfer needs {}{}",
                op_name(op), bytes, offset, file.path(), capacity, transfer,
                direct ? " (O_DIRECT rounds the length up to 4 KiB)" : "");
  }
  auto req = std::make_shared<Request>();
  req->op = op;
  req->fd = file.fd();
  req->direct = direct;
  req->path = file.path();
  req->offset = offset;
  req->bytes = bytes;
  if (bytes == 0) {
    req->finished.store(true, std::memory_order_release);
    return IoHandle(std::move(req));
  }
  const std::uint64_t bs = im.options.block_size;
  const std::uint64_t n_pieces = (transfer + bs - 1) / bs;
  req->pieces.resize(n_pieces);
  {
    std::shared_lock lock(im.reg_mu);
    if (auto it = im.file_slots.find(file.fd()); it != im.file_slots.end() && it->second.file_id == file.id()) {
      req->fixed_file = it->second.slot;
    }
    for (std::uint64_t i = 0; i < n_pieces; ++i) {
      Piece& p = req->pieces[i];
      const std::uint64_t start = i * bs;
      p.req = req.get();
      p.offset = offset + start;
      p.data = data + start;
      p.remaining = static_cast<std::uint32_t>(std::min(bs, transfer - start));
      p.needed = op == IoOp::kRead ? static_cast<std::uint32_t>(std::min(bs, bytes > start ? bytes - start : 0))
                                   : p.remaining;
      if (!im.regions.empty()) {
        const std::byte* b = p.data;
        auto it = std::upper_bound(im.regions.begin(), im.regions.end(), b,
                                   [](const std::byte* v, const Impl::Region& r) { return v < r.begin; });
        if (it != im.regions.begin()) {
          --it;
          if (b >= it->begin && b + p.remaining <= it->end) p.buf_index = it->index;
        }
      }
    }
  }
  std::uint64_t fixed_buf = 0;
  for (const Piece& p : req->pieces) fixed_buf += p.buf_index >= 0 ? 1 : 0;
  im.n_requests.fetch_add(1, std::memory_order_relaxed);
  im.n_pieces.fetch_add(n_pieces, std::memory_order_relaxed);
  im.n_fixed_buf.fetch_add(fixed_buf, std::memory_order_relaxed);
  if (req->fixed_file >= 0) im.n_fixed_file.fetch_add(n_pieces, std::memory_order_relaxed);
  req->pending.store(static_cast<std::uint32_t>(n_pieces), std::memory_order_relaxed);
  req->keep_alive = req;

  std::vector<Worker*> to_wake;
  {
    std::lock_guard lock(im.mu);
    for (Piece& p : req->pieces) im.queue.push_back(&p);
    for (auto& w : im.workers) {
      if (im.idle[w->index]) {
        im.idle[w->index] = false;
        to_wake.push_back(w.get());
        if (to_wake.size() >= n_pieces) break;
      }
    }
  }
  for (Worker* w : to_wake) im.wake(*w);
  return IoHandle(std::move(req));
}

Registration IoEngine::register_buffers(std::span<const std::span<std::byte>> buffers) {
  Impl& im = *impl_;
  unregister_buffers();
  std::vector<iovec> iovecs;
  std::vector<Impl::Region> regions;
  std::uint64_t total = 0;
  for (const auto& b : buffers) {
    for (std::uint64_t off = 0; off < b.size(); off += kMaxRegisteredIovec) {
      const std::uint64_t len = std::min<std::uint64_t>(kMaxRegisteredIovec, b.size() - off);
      iovecs.push_back(iovec{b.data() + off, len});
      regions.push_back({b.data() + off, b.data() + off + len, static_cast<int>(regions.size())});
      total += len;
    }
  }
  if (iovecs.empty()) return {true, {}};
  int first_error = 0;
  std::vector<bool> registered(im.workers.size(), false);
  im.run_on_workers([&](Worker& w) {
    const int rc = io_uring_register_buffers(&w.ring, iovecs.data(), static_cast<unsigned>(iovecs.size()));
    if (rc == 0) {
      registered[w.index] = true;
    } else {
      std::lock_guard lock(im.mu);
      if (first_error == 0) first_error = -rc;
    }
  });
  if (first_error != 0) {
    im.run_on_workers([&](Worker& w) {
      if (registered[w.index]) io_uring_unregister_buffers(&w.ring);
    });
    Registration r;
    if (first_error == ENOMEM) {
      r.reason = fmt::format("registering {} of I/O buffers with io_uring needs that much locked memory per ring, "
                             "but the memlock limit is {}: raise it (`ulimit -l unlimited`, LimitMEMLOCK=infinity "
                             "for a systemd service, `--ulimit memlock=-1` for Docker); I/O goes on with "
                             "unregistered buffers, which costs some CPU per request",
                             human_bytes(total), memlock_limit_text());
    } else {
      r.reason = fmt::format("the kernel refused to register {} of I/O buffers ({}); I/O goes on with "
                             "unregistered buffers",
                             human_bytes(total), errno_text(first_error));
    }
    return r;
  }
  std::sort(regions.begin(), regions.end(), [](const auto& a, const auto& b) { return a.begin < b.begin; });
  std::unique_lock lock(im.reg_mu);
  im.regions = std::move(regions);
  return {true, {}};
}

void IoEngine::unregister_buffers() {
  Impl& im = *impl_;
  {
    std::unique_lock lock(im.reg_mu);
    if (im.regions.empty()) return;
    im.regions.clear();
  }
  im.run_on_workers([](Worker& w) { io_uring_unregister_buffers(&w.ring); });
}

bool IoEngine::buffers_registered() const noexcept {
  std::shared_lock lock(impl_->reg_mu);
  return !impl_->regions.empty();
}

bool IoEngine::register_file(const File& file) {
  Impl& im = *impl_;
  if (!im.files_supported || !file.is_open()) return false;
  const int fd = file.fd();
  int stale_slot = -1;
  int slot = -1;
  {
    std::unique_lock lock(im.reg_mu);
    if (auto it = im.file_slots.find(fd); it != im.file_slots.end()) {
      if (it->second.file_id == file.id()) return true;
      // That descriptor was closed without unregistering and now names another file: its slot
      // is reused for this one.
      stale_slot = it->second.slot;
      im.file_slots.erase(it);
    }
    if (stale_slot >= 0) {
      slot = stale_slot;
    } else {
      for (unsigned s = 0; s < kFileSlots; ++s) {
        if (!im.slot_used[s]) {
          slot = static_cast<int>(s);
          im.slot_used[s] = true;
          break;
        }
      }
    }
  }
  if (slot < 0) return false;
  std::atomic<bool> ok{true};
  im.run_on_workers([&](Worker& w) {
    int f = fd;
    if (io_uring_register_files_update(&w.ring, static_cast<unsigned>(slot), &f, 1) != 1) ok = false;
  });
  if (!ok) {
    im.run_on_workers([&](Worker& w) {
      int f = -1;
      io_uring_register_files_update(&w.ring, static_cast<unsigned>(slot), &f, 1);
    });
    std::unique_lock lock(im.reg_mu);
    im.slot_used[static_cast<unsigned>(slot)] = false;
    return false;
  }
  std::unique_lock lock(im.reg_mu);
  im.file_slots[fd] = {file.id(), slot};
  return true;
}

void IoEngine::unregister_file(const File& file) {
  Impl& im = *impl_;
  int slot = -1;
  {
    std::unique_lock lock(im.reg_mu);
    auto it = im.file_slots.find(file.fd());
    if (it == im.file_slots.end() || it->second.file_id != file.id()) return;
    slot = it->second.slot;
    im.file_slots.erase(it);
  }
  im.run_on_workers([&](Worker& w) {
    int f = -1;
    io_uring_register_files_update(&w.ring, static_cast<unsigned>(slot), &f, 1);
  });
  std::unique_lock lock(im.reg_mu);
  im.slot_used[static_cast<unsigned>(slot)] = false;
}

EngineCounters IoEngine::counters() const {
  const Impl& im = *impl_;
  EngineCounters c;
  c.requests = im.n_requests.load();
  c.pieces = im.n_pieces.load();
  c.bytes = im.n_bytes.load();
  c.resubmitted_short = im.n_short.load();
  c.resubmitted_again = im.n_again.load();
  c.fixed_buffer_pieces = im.n_fixed_buf.load();
  c.fixed_file_pieces = im.n_fixed_file.load();
  c.submit_calls = im.n_submit_calls.load();
  c.max_ring_inflight = im.max_ring_inflight.load();
  return c;
}

std::vector<float> IoEngine::take_latencies() {
  Impl& im = *impl_;
  std::mutex out_mu;
  std::vector<float> out;
  im.run_on_workers([&](Worker& w) {
    std::lock_guard lock(out_mu);
    out.insert(out.end(), w.latencies.begin(), w.latencies.end());
    w.latencies.clear();
  });
  return out;
}

}  // namespace zinf::io
