#pragma once
// The swap store: named tensors kept in swap files on one or several NVMe directories.
//
// Layout: every `nvme_path` gets `<path>/zinf/rank<r>/swap.zsw` (one file per path and rank) and a
// `lock` file. A tensor's extent is striped over all paths in equal 4 KiB-aligned parts (tensors
// under 1 MiB per path live whole on one path, round-robin), so every read and write uses every
// drive. Space is reserved with fallocate when the tensor is allocated, after a free-space check,
// so a full disk is reported then, never in the middle of a training step.
//
// Integrity: each part carries a 64-bit XXH3 checksum computed from the data written (while the
// write is in flight) and verified after every read. A corrupted or truncated swap file is
// reported with the tensor's name, the file and the offset, and its data is never returned as good.
// A failed write marks only its own tensor invalid; every other extent is untouched because
// extents never overlap.
//
// Lifetime: the destructor waits for I/O in flight and removes the swap files and directories.
// After a crash, the next store on the same path and rank finds the old files: if the `lock` is
// still held by a live process that is an error (two runs must not share a swap directory);
// otherwise the leftovers are removed, with a warning saying how much space was reclaimed. Swap
// contents are never reused across runs: the checkpoint, not the swap file, is the durable copy.

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "zinf/io/engine.hpp"
#include "zinf/io/file.hpp"

namespace zinf::io {

struct SwapStoreOptions {
  std::vector<std::string> paths;  // existing directories, e.g. offload_optimizer.nvme_path
  int rank = 0;
};

using TensorId = std::uint32_t;

struct TensorSpec {
  std::string name;
  std::uint64_t bytes = 0;
};

class SwapStore;

namespace detail {
struct SwapOp;
}

// An asynchronous swap read or write. wait() verifies checksums (reads) or commits them (writes).
class SwapHandle {
 public:
  SwapHandle() = default;
  bool valid() const noexcept { return op_ != nullptr; }
  bool done() const noexcept;
  // Throws zinf::Error naming the tensor on an I/O error or a checksum mismatch.
  void wait();

 private:
  friend class SwapStore;
  SwapHandle(SwapStore* store, std::shared_ptr<detail::SwapOp> op) : store_(store), op_(std::move(op)) {}
  SwapStore* store_ = nullptr;
  std::shared_ptr<detail::SwapOp> op_;
};

class SwapStore {
 public:
  // Creates (or takes over after a crash) the per-rank directories. Throws zinf::Error for a
  // missing path, a path that is not a directory, a read-only file system, missing permissions,
  // or a directory in use by another live process.
  SwapStore(IoEngine& engine, SwapStoreOptions options);
  ~SwapStore();
  SwapStore(const SwapStore&) = delete;
  SwapStore& operator=(const SwapStore&) = delete;

  // Reserves space for all tensors at once: either all are allocated or none (the error names
  // each path with bytes needed and bytes free). Names must be unique.
  std::vector<TensorId> allocate(std::span<const TensorSpec> tensors);
  TensorId allocate(const std::string& name, std::uint64_t bytes);

  // Starts writing `data` (exactly bytes(id) bytes, in a buffer of at least buffer_bytes(id)
  // bytes, 4 KiB-aligned) to the tensor's extent. The buffer must stay untouched until wait().
  SwapHandle write(TensorId id, std::span<const std::byte> buffer);
  // Starts reading the tensor into `buffer` (at least buffer_bytes(id) bytes, 4 KiB-aligned).
  SwapHandle read(TensorId id, std::span<std::byte> buffer);

  std::uint64_t bytes(TensorId id) const;
  // Buffer size a read or write needs: bytes(id) rounded up for O_DIRECT tails.
  std::uint64_t buffer_bytes(TensorId id) const;
  const std::string& name(TensorId id) const;
  std::size_t tensor_count() const;
  // Bytes reserved on disk over all paths.
  std::uint64_t reserved_bytes() const;
  // The per-rank swap directories, one per path.
  const std::vector<std::string>& directories() const noexcept { return dirs_; }
  // Whether the swap files use O_DIRECT (false on file systems that refuse it, such as ramfs).
  bool direct() const noexcept;
  // The engine the store submits to (e.g. to register staging buffers with it).
  IoEngine& engine() noexcept { return engine_; }

  // Where each part of a tensor lives (file, offset, bytes), for tests and diagnostics.
  struct PartLocation {
    std::string file;
    std::uint64_t offset;
    std::uint64_t bytes;
  };
  std::vector<PartLocation> locate(TensorId id) const;

 private:
  friend class SwapHandle;
  struct Part {
    std::uint32_t file = 0;     // index into the per-path files
    std::uint64_t offset = 0;   // file offset, 4 KiB-aligned
    std::uint64_t data_offset = 0;  // offset of this part within the tensor
    std::uint64_t bytes = 0;    // data bytes in this part
    std::uint64_t checksum = 0;
  };
  enum class State : std::uint8_t { kEmpty, kValid, kWriting, kReading, kInvalid };
  struct Extent {
    std::string name;
    std::uint64_t bytes = 0;
    std::vector<Part> parts;
    State state = State::kEmpty;
    std::string invalid_reason;
    std::shared_ptr<detail::SwapOp> inflight;
  };

  void finish(detail::SwapOp& op);
  void submit_parts(detail::SwapOp& op, const std::vector<Part>& parts, std::span<std::byte> buffer);
  void take_over_directory(std::size_t i);

  IoEngine& engine_;
  SwapStoreOptions options_;
  std::vector<std::string> dirs_;
  std::vector<std::string> file_paths_;
  std::vector<File> files_;
  std::vector<File> locks_;
  std::vector<bool> registered_;
  std::vector<std::uint64_t> file_end_;  // bytes reserved per file
  mutable std::mutex mu_;
  std::vector<Extent> extents_;
};

}  // namespace zinf::io
