#pragma once
// The io_uring engine: asynchronous reads and writes of (file, offset, bytes, buffer).
//
// A request is cut into `block_size` pieces. `intra_op_parallelism` worker threads each own one
// ring and take pieces from one shared queue, so a slow ring never holds up the others (DeepSpeed's
// libaio engine instead splits every request evenly over its threads). A ring never has more than
// `queue_depth` pieces in flight. As in DeepSpeed's `aio` section:
//   single_submit   true: one io_uring_enter per piece; false: pieces are submitted in batches.
//   overlap_events  true: a finished piece is replaced at once, keeping the queue full; false: a
//                   ring submits a batch and waits for all of it before submitting the next.
// Short transfers and -EAGAIN are resubmitted for the remainder. Buffers registered with
// register_buffers() are used through fixed reads/writes, files registered with register_file()
// through the ring's file table, when the kernel allows; otherwise the plain operations are used.
//
// With an O_DIRECT file, offsets and buffer addresses must be 4 KiB-aligned; a length that is not
// a multiple of 4 KiB is rounded up, so the buffer must extend to the rounded end (AlignedBuffer
// always does). A read that meets the end of the file past the requested bytes is complete.

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace zinf::io {

class File;

struct EngineOptions {
  std::uint64_t block_size = 1'048'576;  // bytes per piece; a multiple of 4 KiB
  unsigned queue_depth = 8;              // pieces in flight per ring
  unsigned intra_op_parallelism = 1;     // rings (one worker thread each)
  bool single_submit = false;
  bool overlap_events = true;
  bool record_latency = false;  // keep per-piece latencies for take_latencies() (benchmarks)
};

// Throws zinf::Error naming the bad field and the accepted range.
void validate(const EngineOptions& options);

enum class IoOp : std::uint8_t { kRead, kWrite };

namespace detail {
struct Request;
}

// A submitted request. Copyable; the request stays alive while any handle or the engine holds it.
class IoHandle {
 public:
  IoHandle() = default;
  bool valid() const noexcept { return req_ != nullptr; }
  // Poll: true once every piece has finished (successfully or not).
  bool done() const noexcept;
  // Blocks until done; throws zinf::Error naming the operation, file, offset, length and the OS
  // error if any piece failed.
  void wait() const;
  // Bytes requested (not rounded).
  std::uint64_t bytes() const noexcept;

 private:
  friend class IoEngine;
  explicit IoHandle(std::shared_ptr<detail::Request> req) : req_(std::move(req)) {}
  std::shared_ptr<detail::Request> req_;
};

struct Registration {
  bool ok = false;
  std::string reason;  // why not, with the fix (memlock limit, kernel too old, ...)
};

struct EngineCounters {
  std::uint64_t requests = 0;
  std::uint64_t pieces = 0;
  std::uint64_t bytes = 0;
  std::uint64_t resubmitted_short = 0;   // short transfers continued
  std::uint64_t resubmitted_again = 0;   // -EAGAIN / -EINTR retried
  std::uint64_t fixed_buffer_pieces = 0;
  std::uint64_t fixed_file_pieces = 0;
  std::uint64_t submit_calls = 0;     // io_uring_submit calls (single_submit: one per piece)
  unsigned max_ring_inflight = 0;     // most pieces ever in flight on one ring (<= queue_depth)
};

class IoEngine {
 public:
  // Starts the worker threads and their rings. Throws zinf::Error when io_uring is unavailable
  // (old kernel, disabled by sysctl or a container's seccomp profile), with what to do.
  explicit IoEngine(const EngineOptions& options);
  // Waits for every submitted request, then stops the workers.
  ~IoEngine();
  IoEngine(const IoEngine&) = delete;
  IoEngine& operator=(const IoEngine&) = delete;

  const EngineOptions& options() const noexcept;

  // `buffer` must stay valid and untouched until the handle is done. Throws zinf::Error on a
  // misaligned O_DIRECT request or a buffer shorter than the transfer.
  IoHandle read(const File& file, std::uint64_t offset, std::span<std::byte> buffer, std::uint64_t bytes);
  IoHandle write(const File& file, std::uint64_t offset, std::span<const std::byte> buffer, std::uint64_t bytes);
  IoHandle read(const File& file, std::uint64_t offset, std::span<std::byte> buffer) {
    return read(file, offset, buffer, buffer.size());
  }
  IoHandle write(const File& file, std::uint64_t offset, std::span<const std::byte> buffer) {
    return write(file, offset, buffer, buffer.size());
  }

  // Registers buffers with every ring (replacing earlier ones). Never throws for a refusal by the
  // kernel: the reason (e.g. the memlock limit and how to raise it) comes back and I/O continues
  // with plain reads/writes. Buffers must outlive the registration; no request may use them while
  // they are unregistered.
  Registration register_buffers(std::span<const std::span<std::byte>> buffers);
  void unregister_buffers();
  bool buffers_registered() const noexcept;

  // Puts the file in every ring's file table. False when the kernel has no sparse file tables or
  // the table is full (I/O then uses the plain descriptor). Unregister before closing the file,
  // with no request on it in flight.
  bool register_file(const File& file);
  void unregister_file(const File& file);

  EngineCounters counters() const;
  // Per-piece latencies in microseconds (submit to completion) since the last call; empty unless
  // options.record_latency.
  std::vector<float> take_latencies();

  struct Impl;

 private:
  IoHandle submit(IoOp op, const File& file, std::uint64_t offset, std::byte* data, std::uint64_t capacity,
                  std::uint64_t bytes);
  std::unique_ptr<Impl> impl_;
};

}  // namespace zinf::io
