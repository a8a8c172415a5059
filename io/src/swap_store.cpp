#include "zinf/io/swap_store.hpp"

#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <map>
#include <set>

#include <spdlog/spdlog.h>

#include "zinf/common/error.hpp"
#include "zinf/io/aligned_buffer.hpp"

namespace zinf::io {

namespace fs = std::filesystem;

namespace {

constexpr std::uint64_t kMinStripePart = 1ull << 20;  // smaller tensors are not striped
constexpr const char* kSwapFileName = "swap.zsw";
constexpr const char* kLockFileName = "lock";

double gib(std::uint64_t b) { return static_cast<double>(b) / (1ull << 30); }

std::string mkdir_advice(int err) {
  switch (err) {
    case EACCES:
    case EPERM: return "permission denied: give this user write access to it or choose another nvme_path";
    case EROFS: return "the file system is read-only: choose a writable nvme_path";
    case ENOSPC: return "the file system is full";
    case ENOTDIR: return "a component of the path is not a directory";
    default: return errno_text(err);
  }
}

void make_dir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0755) == 0 || errno == EEXIST) {
    struct stat st {};
    if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
      throw Error("cannot use '{}' for swap: it exists but is not a directory", dir);
    }
    return;
  }
  throw Error("cannot create the swap directory '{}': {}", dir, mkdir_advice(errno));
}

std::uint64_t checksum(const std::byte* data, std::uint64_t bytes) { return XXH3_64bits(data, bytes); }

}  // namespace

namespace detail {

struct SwapOp {
  TensorId id = 0;
  IoOp op = IoOp::kRead;
  const std::byte* data = nullptr;
  std::vector<IoHandle> parts;
  std::vector<std::uint64_t> checksums;  // writes: of the data written
  bool finished = false;                 // under SwapStore::mu_
  std::string error;                     // first error, once finished
};

}  // namespace detail

bool SwapHandle::done() const noexcept {
  if (op_ == nullptr) return true;
  return std::all_of(op_->parts.begin(), op_->parts.end(), [](const IoHandle& h) { return h.done(); });
}

void SwapHandle::wait() {
  if (op_ == nullptr) return;
  store_->finish(*op_);
  if (!op_->error.empty()) throw Error(op_->error);
}

SwapStore::SwapStore(IoEngine& engine, SwapStoreOptions options) : engine_(engine), options_(std::move(options)) {
  if (options_.paths.empty()) throw Error("no swap path given: set offload_optimizer.nvme_path / offload_param.nvme_path");
  if (options_.rank < 0) throw Error("invalid rank {} for the swap store", options_.rank);
  std::set<std::string> seen;
  for (const std::string& p : options_.paths) {
    std::error_code ec;
    const fs::path canonical = fs::weakly_canonical(fs::path(p), ec);
    if (!seen.insert(ec ? p : canonical.string()).second) {
      throw Error("nvme_path '{}' is listed twice: give each swap directory once", p);
    }
    struct stat st {};
    if (::stat(p.c_str(), &st) != 0) {
      // The path must exist: creating it would turn a typo into swap files on the root disk.
      throw Error("nvme_path '{}' {}: create it on the NVMe drive (mkdir -p) or fix the path",
                  p, errno == ENOENT ? "does not exist" : fmt::format("cannot be read ({})", errno_text(errno)));
    }
    if (!S_ISDIR(st.st_mode)) throw Error("nvme_path '{}' is not a directory", p);
  }
  try {
    for (std::size_t i = 0; i < options_.paths.size(); ++i) take_over_directory(i);
  } catch (...) {
    for (std::size_t i = 0; i < files_.size(); ++i) {
      if (registered_[i]) engine_.unregister_file(files_[i]);
      ::unlink(files_[i].path().c_str());
    }
    throw;
  }
  spdlog::info("swap store: {} director{} ({}), {}", dirs_.size(), dirs_.size() == 1 ? "y" : "ies",
               fmt::join(dirs_, ", "), direct() ? "O_DIRECT" : "buffered I/O");
}

void SwapStore::take_over_directory(std::size_t i) {
  const std::string& base = options_.paths[i];
  const std::string zinf_dir = (fs::path(base) / "zinf").string();
  const std::string dir = (fs::path(zinf_dir) / fmt::format("rank{}", options_.rank)).string();
  make_dir(zinf_dir);
  make_dir(dir);

  // The lock says who owns the directory: flock is released by the kernel when a process dies,
  // so a held lock means a live owner.
  const std::string lock_path = (fs::path(dir) / kLockFileName).string();
  File lock = File::open(lock_path, OpenMode::kCreateReadWrite, /*direct=*/false);
  if (::flock(lock.fd(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      char buf[32] = {};
      const ssize_t n = ::pread(lock.fd(), buf, sizeof buf - 1, 0);
      const std::string pid = n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string("unknown");
      throw Error("swap directory '{}' is in use by another zinf process (pid {}): two runs or ranks cannot share "
                  "it; give this run another nvme_path or stop the other run",
                  dir, pid.substr(0, pid.find('\n')));
    }
    throw Error("cannot lock '{}': {}", lock_path, errno_text(errno));
  }
  const std::string pid = fmt::format("{}\n", ::getpid());
  if (::ftruncate(lock.fd(), 0) != 0 || ::pwrite(lock.fd(), pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    throw Error("cannot write the lock file '{}': {}", lock_path, errno_text(errno));
  }

  // Leftovers of a run that did not exit cleanly (its lock is free): remove them.
  const std::string swap_path = (fs::path(dir) / kSwapFileName).string();
  std::uint64_t reclaimed = 0;
  std::size_t removed = 0;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name == kLockFileName || !name.ends_with(".zsw")) continue;
    struct stat st {};
    if (::stat(entry.path().c_str(), &st) == 0) reclaimed += static_cast<std::uint64_t>(st.st_blocks) * 512;
    if (::unlink(entry.path().c_str()) != 0) {
      throw Error("cannot remove the leftover swap file '{}': {}", entry.path().string(), errno_text(errno));
    }
    ++removed;
  }
  if (ec) throw Error("cannot list the swap directory '{}': {}", dir, ec.message());
  if (removed > 0) {
    spdlog::warn("removed {} leftover swap file(s) ({:.2f} GiB) in '{}' from a run that did not exit cleanly", removed,
                 gib(reclaimed), dir);
  }

  File f = File::open(swap_path, OpenMode::kCreateReadWrite, /*direct=*/true);
  registered_.push_back(engine_.register_file(f));
  dirs_.push_back(dir);
  file_paths_.push_back(swap_path);
  files_.push_back(std::move(f));
  locks_.push_back(std::move(lock));
  file_end_.push_back(0);
}

SwapStore::~SwapStore() {
  // Wait for I/O still in flight: the engine may be writing from or reading into user buffers,
  // and the files must not be unregistered under it.
  std::vector<std::shared_ptr<detail::SwapOp>> pending;
  {
    std::lock_guard lock(mu_);
    for (auto& e : extents_) {
      if (e.inflight) pending.push_back(e.inflight);
    }
  }
  for (auto& op : pending) {
    for (auto& h : op->parts) {
      try {
        h.wait();
      } catch (const Error&) {  // the error belongs to the handle's owner; nothing to clean here
      }
    }
  }
  for (std::size_t i = 0; i < files_.size(); ++i) {
    if (registered_[i]) engine_.unregister_file(files_[i]);
    if (::unlink(file_paths_[i].c_str()) != 0 && errno != ENOENT) {
      spdlog::warn("cannot remove the swap file '{}': {}; delete it by hand", file_paths_[i], errno_text(errno));
    }
    try {
      files_[i].close();
    } catch (const Error& e) {
      spdlog::warn("{}", e.what());
    }
    ::unlink((fs::path(dirs_[i]) / kLockFileName).c_str());
    locks_[i] = File();  // releases the flock
    ::rmdir(dirs_[i].c_str());
    ::rmdir(fs::path(dirs_[i]).parent_path().c_str());  // fails harmlessly while other ranks use it
  }
}

bool SwapStore::direct() const noexcept {
  return std::all_of(files_.begin(), files_.end(), [](const File& f) { return f.direct(); });
}

std::vector<TensorId> SwapStore::allocate(std::span<const TensorSpec> tensors) {
  std::lock_guard lock(mu_);
  const std::size_t n_files = files_.size();
  std::set<std::string> names;
  for (const auto& e : extents_) names.insert(e.name);

  // Plan every extent first.
  std::vector<Extent> planned;
  std::vector<std::uint64_t> end = file_end_;
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    const TensorSpec& spec = tensors[t];
    if (spec.name.empty()) throw Error("swap tensor {} has an empty name", extents_.size() + t);
    if (!names.insert(spec.name).second) throw Error("swap tensor '{}' is allocated twice", spec.name);
    Extent e;
    e.name = spec.name;
    e.bytes = spec.bytes;
    const bool stripe = n_files > 1 && spec.bytes >= kMinStripePart * n_files;
    if (!stripe) {
      const auto file = static_cast<std::uint32_t>((extents_.size() + t) % n_files);
      e.parts.push_back({file, end[file], 0, spec.bytes, 0});
      end[file] += round_up(std::max<std::uint64_t>(spec.bytes, 1), kIoAlignment);
    } else {
      const std::uint64_t part = round_up((spec.bytes + n_files - 1) / n_files, kIoAlignment);
      for (std::uint32_t f = 0; f < n_files; ++f) {
        const std::uint64_t start = part * f;
        if (start >= spec.bytes) break;
        const std::uint64_t bytes = std::min(part, spec.bytes - start);
        e.parts.push_back({f, end[f], start, bytes, 0});
        end[f] += round_up(bytes, kIoAlignment);
      }
    }
    planned.push_back(std::move(e));
  }

  // Free space per file system (paths on one device share it).
  std::map<dev_t, std::pair<std::uint64_t, std::vector<std::size_t>>> need;
  for (std::size_t f = 0; f < n_files; ++f) {
    struct stat st {};
    if (::stat(dirs_[f].c_str(), &st) != 0) throw Error("cannot stat '{}': {}", dirs_[f], errno_text(errno));
    auto& [bytes, idx] = need[st.st_dev];
    bytes += end[f] - file_end_[f];
    idx.push_back(f);
  }
  for (const auto& [dev, entry] : need) {
    const auto& [bytes, idx] = entry;
    if (bytes == 0) continue;
    const std::uint64_t free = free_bytes(dirs_[idx.front()]);
    if (bytes > free) {
      std::vector<std::string> where;
      for (std::size_t f : idx) where.push_back(dirs_[f]);
      throw Error("not enough disk space for the swap store: {} tensor(s) need {:.2f} GiB more in '{}' but only "
                  "{:.2f} GiB are free there. Free space, add another nvme_path, or offload less to NVMe "
                  "(e.g. offload_optimizer.ratio < 1, or device \"cpu\")",
                  tensors.size(), gib(bytes), fmt::join(where, "', '"), gib(free));
    }
  }

  // Reserve. A failure leaves the files' logical ends where they were, so nothing is half-allocated.
  for (std::size_t f = 0; f < n_files; ++f) {
    if (end[f] > file_end_[f]) {
      try {
        files_[f].allocate(file_end_[f], end[f] - file_end_[f]);
      } catch (Error& e) {
        throw std::move(e).with_context(fmt::format("while reserving swap space for {} tensor(s)", tensors.size()));
      }
    }
  }
  file_end_ = end;
  std::vector<TensorId> ids;
  for (auto& e : planned) {
    ids.push_back(static_cast<TensorId>(extents_.size()));
    extents_.push_back(std::move(e));
  }
  return ids;
}

TensorId SwapStore::allocate(const std::string& name, std::uint64_t bytes) {
  const TensorSpec spec{name, bytes};
  return allocate(std::span<const TensorSpec>(&spec, 1)).front();
}

SwapHandle SwapStore::write(TensorId id, std::span<const std::byte> buffer) {
  auto op = std::make_shared<detail::SwapOp>();
  op->id = id;
  op->op = IoOp::kWrite;
  op->data = buffer.data();
  std::vector<Part> parts;
  {
    std::lock_guard lock(mu_);
    if (id >= extents_.size()) throw Error("swap write: unknown tensor id {}", id);
    Extent& e = extents_[id];
    if (buffer.size() < e.bytes) {
      throw Error("swap write of '{}': the buffer holds {} bytes but the tensor has {}", e.name, buffer.size(), e.bytes);
    }
    if (e.inflight) throw Error("swap write of '{}': an earlier read or write of it has not been waited for", e.name);
    e.state = State::kWriting;  // the old contents are no longer trustworthy from here on
    e.inflight = op;
    parts = e.parts;
  }
  // The engine only reads from a write buffer; the cast lets reads and writes share submit_parts.
  submit_parts(*op, parts, std::span<std::byte>(const_cast<std::byte*>(buffer.data()), buffer.size()));
  // Checksums are computed while the data is on its way to the disk.
  for (const Part& p : parts) op->checksums.push_back(checksum(buffer.data() + p.data_offset, p.bytes));
  return SwapHandle(this, std::move(op));
}

SwapHandle SwapStore::read(TensorId id, std::span<std::byte> buffer) {
  auto op = std::make_shared<detail::SwapOp>();
  op->id = id;
  op->op = IoOp::kRead;
  op->data = buffer.data();
  std::vector<Part> parts;
  {
    std::lock_guard lock(mu_);
    if (id >= extents_.size()) throw Error("swap read: unknown tensor id {}", id);
    Extent& e = extents_[id];
    if (e.inflight) throw Error("swap read of '{}': an earlier read or write of it has not been waited for", e.name);
    if (e.state == State::kEmpty) throw Error("swap read of '{}': the tensor was never written to swap", e.name);
    if (e.state == State::kInvalid) {
      throw Error("swap read of '{}': its swap copy is invalid because its last write failed ({})", e.name,
                  e.invalid_reason);
    }
    if (buffer.size() < e.bytes) {
      throw Error("swap read of '{}': the buffer holds {} bytes but the tensor has {}", e.name, buffer.size(), e.bytes);
    }
    e.state = State::kReading;
    e.inflight = op;
    parts = e.parts;
  }
  submit_parts(*op, parts, buffer);
  return SwapHandle(this, std::move(op));
}

void SwapStore::submit_parts(detail::SwapOp& op, const std::vector<Part>& parts, std::span<std::byte> buffer) {
  try {
    for (const Part& p : parts) {
      const std::span<std::byte> at = buffer.subspan(p.data_offset);
      op.parts.push_back(op.op == IoOp::kRead ? engine_.read(files_[p.file], p.offset, at, p.bytes)
                                              : engine_.write(files_[p.file], p.offset, at, p.bytes));
    }
  } catch (Error& err) {
    // Parts already submitted must finish before the buffer can be given back to the caller.
    for (auto& h : op.parts) {
      try {
        h.wait();
      } catch (const Error&) {  // the submission error below is the one reported
      }
    }
    std::lock_guard lock(mu_);
    Extent& e = extents_[op.id];
    e.inflight.reset();
    if (op.op == IoOp::kWrite) {
      e.state = State::kInvalid;  // part of the new data may be on disk
      e.invalid_reason = err.message();
    } else {
      e.state = State::kValid;  // a read changes nothing on disk
    }
    throw std::move(err).with_context(
        fmt::format("while {} swap tensor '{}'", op.op == IoOp::kRead ? "reading" : "writing", e.name));
  }
}

void SwapStore::finish(detail::SwapOp& op) {
  {
    std::lock_guard lock(mu_);
    if (op.finished) return;
  }
  std::vector<Part> parts;
  std::string name;
  {
    std::lock_guard lock(mu_);
    parts = extents_[op.id].parts;
    name = extents_[op.id].name;
  }
  std::string error;
  std::vector<std::uint64_t> read_sums(parts.size(), 0);
  for (std::size_t i = 0; i < op.parts.size(); ++i) {
    try {
      op.parts[i].wait();
    } catch (const Error& e) {
      if (error.empty()) {
        error = fmt::format("{} of swap tensor '{}' failed: {}", op.op == IoOp::kRead ? "read" : "write", name,
                            e.message());
      }
      continue;
    }
    if (op.op == IoOp::kRead) {
      // Verified part by part while later parts may still be in flight.
      const Part& p = parts[i];
      const std::uint64_t sum = checksum(op.data + p.data_offset, p.bytes);
      if (sum != p.checksum && error.empty()) {
        error = fmt::format("checksum mismatch in swap tensor '{}': {} bytes at offset {} of '{}' (part {} of {}) do "
                            "not match what was written; the data on disk is corrupted and was not used. Check "
                            "the drive (dmesg, smartctl) and the file system",
                            name, p.bytes, p.offset, file_paths_[p.file], i + 1, parts.size());
      }
    }
  }
  std::lock_guard lock(mu_);
  if (op.finished) return;
  Extent& e = extents_[op.id];
  if (op.op == IoOp::kWrite) {
    if (error.empty()) {
      for (std::size_t i = 0; i < e.parts.size(); ++i) e.parts[i].checksum = op.checksums[i];
      e.state = State::kValid;
    } else {
      e.state = State::kInvalid;
      e.invalid_reason = error;
    }
  } else {
    // A failed or corrupt read does not change what is on disk; a later read reports it again.
    e.state = State::kValid;
  }
  e.inflight.reset();
  op.error = error;
  op.finished = true;
}

std::uint64_t SwapStore::bytes(TensorId id) const {
  std::lock_guard lock(mu_);
  ZINF_ASSERT(id < extents_.size(), "unknown swap tensor id {}", id);
  return extents_[id].bytes;
}

std::uint64_t SwapStore::buffer_bytes(TensorId id) const {
  std::lock_guard lock(mu_);
  ZINF_ASSERT(id < extents_.size(), "unknown swap tensor id {}", id);
  const Extent& e = extents_[id];
  std::uint64_t need = 0;
  for (const Part& p : e.parts) need = std::max(need, p.data_offset + round_up(p.bytes, kIoAlignment));
  return std::max<std::uint64_t>(need, e.bytes);
}

const std::string& SwapStore::name(TensorId id) const {
  std::lock_guard lock(mu_);
  ZINF_ASSERT(id < extents_.size(), "unknown swap tensor id {}", id);
  return extents_[id].name;
}

std::size_t SwapStore::tensor_count() const {
  std::lock_guard lock(mu_);
  return extents_.size();
}

std::uint64_t SwapStore::reserved_bytes() const {
  std::lock_guard lock(mu_);
  std::uint64_t total = 0;
  for (std::uint64_t e : file_end_) total += e;
  return total;
}

std::vector<SwapStore::PartLocation> SwapStore::locate(TensorId id) const {
  std::lock_guard lock(mu_);
  ZINF_ASSERT(id < extents_.size(), "unknown swap tensor id {}", id);
  std::vector<PartLocation> out;
  for (const Part& p : extents_[id].parts) out.push_back({file_paths_[p.file], p.offset, p.bytes});
  return out;
}

}  // namespace zinf::io
