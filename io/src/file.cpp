#include "zinf/io/file.hpp"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <utility>

#include <spdlog/spdlog.h>

#include "zinf/common/error.hpp"
#include "zinf/io/aligned_buffer.hpp"

namespace zinf::io {

// ---------------------------------------------------------------------------------------------
// AlignedBuffer

AlignedBuffer::AlignedBuffer(std::size_t bytes) {
  if (bytes == 0) return;
  const std::size_t size = round_up(bytes, kIoAlignment);
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    throw Error("cannot allocate a {} MiB I/O buffer: mmap: {}; free host memory or use smaller buffers",
                size >> 20, errno_text(errno));
  }
  data_ = static_cast<std::byte*>(p);
  size_ = size;
}

AlignedBuffer::~AlignedBuffer() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

AlignedBuffer::AlignedBuffer(AlignedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) ::munmap(data_, size_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

// ---------------------------------------------------------------------------------------------
// File

namespace {

std::string open_advice(int err) {
  switch (err) {
    case ENOENT: return "the file or its directory does not exist";
    case EACCES:
    case EPERM: return "permission denied: check the owner and mode of the file and its directories";
    case EROFS: return "the file system is mounted read-only: choose a writable directory";
    case EISDIR: return "it is a directory, not a file";
    case ENOSPC: return "the file system is full";
    case EDQUOT: return "the disk quota is exhausted";
    case EMFILE:
    case ENFILE: return "too many open files: raise the limit with `ulimit -n`";
    default: return errno_text(err);
  }
}

const char* mode_name(OpenMode mode) {
  switch (mode) {
    case OpenMode::kRead: return "reading";
    case OpenMode::kReadWrite: return "reading and writing";
    case OpenMode::kCreateReadWrite: return "writing";
  }
  return "?";
}

std::atomic<bool> g_warned_buffered{false};
std::atomic<std::uint64_t> g_next_file_id{1};
std::atomic<bool> g_warned_no_fallocate{false};

}  // namespace

File File::open(const std::string& path, OpenMode mode, bool direct) {
  int flags = O_CLOEXEC;
  switch (mode) {
    case OpenMode::kRead: flags |= O_RDONLY; break;
    case OpenMode::kReadWrite: flags |= O_RDWR; break;
    case OpenMode::kCreateReadWrite: flags |= O_RDWR | O_CREAT; break;
  }
  File f;
  f.path_ = path;
  f.id_ = g_next_file_id.fetch_add(1, std::memory_order_relaxed);
  int fd = -1;
  if (direct) {
    do {
      fd = ::open(path.c_str(), flags | O_DIRECT, 0644);
    } while (fd < 0 && errno == EINTR);
    if (fd >= 0) {
      f.fd_ = fd;
      f.direct_ = true;
      return f;
    }
    if (errno != EINVAL) {
      throw Error("cannot open '{}' for {}: {}", path, mode_name(mode), open_advice(errno));
    }
    // EINVAL with O_DIRECT: the file system does not support direct I/O (tmpfs, ...).
    if (!g_warned_buffered.exchange(true)) {
      spdlog::warn("O_DIRECT is not supported on '{}' ({}): using buffered I/O, so reads may be served from the "
                   "page cache and throughput figures are not those of the device",
                   path, filesystem_type(path));
    }
  }
  do {
    fd = ::open(path.c_str(), flags, 0644);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) throw Error("cannot open '{}' for {}: {}", path, mode_name(mode), open_advice(errno));
  f.fd_ = fd;
  f.direct_ = false;
  return f;
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

File::File(File&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      id_(std::exchange(other.id_, 0)),
      direct_(other.direct_),
      path_(std::move(other.path_)) {}

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    id_ = std::exchange(other.id_, 0);
    direct_ = other.direct_;
    path_ = std::move(other.path_);
  }
  return *this;
}

std::uint64_t File::size() const {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) throw Error("cannot stat '{}': {}", path_, errno_text(errno));
  return static_cast<std::uint64_t>(st.st_size);
}

void File::allocate(std::uint64_t offset, std::uint64_t bytes) {
  if (bytes == 0) return;
  int rc;
  do {
    rc = ::fallocate(fd_, 0, static_cast<off_t>(offset), static_cast<off_t>(bytes));
  } while (rc != 0 && errno == EINTR);
  if (rc == 0) return;
  const int err = errno;
  if (err == EOPNOTSUPP) {
    if (!g_warned_no_fallocate.exchange(true)) {
      spdlog::warn("the file system of '{}' ({}) cannot preallocate space: the swap file is extended without "
                   "reserving blocks, so a full disk would only be noticed on write",
                   path_, filesystem_type(path_));
    }
    if (offset + bytes > size() && ::ftruncate(fd_, static_cast<off_t>(offset + bytes)) != 0) {
      throw Error("cannot extend '{}' to {} bytes: {}", path_, offset + bytes, errno_text(errno));
    }
    return;
  }
  if (err == ENOSPC || err == EDQUOT) {
    throw Error("not enough space for '{}': reserving {:.2f} GiB at offset {} failed ({}); {:.2f} GiB are free "
                "there. Free space, choose another directory, or offload less to NVMe",
                path_, static_cast<double>(bytes) / (1ull << 30), offset, errno_text(err),
                static_cast<double>(free_bytes(path_)) / (1ull << 30));
  }
  if (err == EFBIG) {
    throw Error("cannot grow '{}' to {} bytes: the file size limit (ulimit -f) or the file system's maximum file "
                "size is exceeded",
                path_, offset + bytes);
  }
  throw Error("cannot reserve {} bytes at offset {} of '{}': fallocate: {}", bytes, offset, path_, errno_text(err));
}

void File::sync() const {
  if (::fsync(fd_) != 0) throw Error("fsync of '{}' failed: {}", path_, errno_text(errno));
}

void File::close() {
  if (fd_ < 0) return;
  const int fd = std::exchange(fd_, -1);
  if (::close(fd) != 0 && errno != EINTR) throw Error("closing '{}' failed: {}", path_, errno_text(errno));
}

std::uint64_t free_bytes(const std::string& path) {
  struct statvfs st {};
  if (::statvfs(path.c_str(), &st) != 0) throw Error("cannot query free space of '{}': {}", path, errno_text(errno));
  return static_cast<std::uint64_t>(st.f_bavail) * st.f_frsize;
}

std::string filesystem_type(const std::string& path) {
  struct statfs st {};
  if (::statfs(path.c_str(), &st) != 0) return "unknown";
  switch (static_cast<unsigned long>(st.f_type)) {
    case EXT4_SUPER_MAGIC: return "ext4";
    case 0x58465342UL: return "xfs";
    case BTRFS_SUPER_MAGIC: return "btrfs";
    case TMPFS_MAGIC: return "tmpfs";
    case RAMFS_MAGIC: return "ramfs";
    case OVERLAYFS_SUPER_MAGIC: return "overlayfs";
    case NFS_SUPER_MAGIC: return "nfs";
    case 0x65735546UL: return "fuse";
    case 0x2FC12FC1UL: return "zfs";
    case 0x6a656a63UL: return "fakeowner";
    default: return fmt::format("fs-0x{:x}", static_cast<unsigned long>(st.f_type));
  }
}

}  // namespace zinf::io
