#include "zinf/common/fs.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>

#include <fmt/format.h>

#include "zinf/common/error.hpp"

namespace zinf {

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  namespace fs = std::filesystem;
  const fs::path target(path_);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  dir_ = dir.string();
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    throw Error("cannot write '{}': directory '{}' does not exist; create it first", path_, dir_);
  }
  // Only a regular file is ever replaced: never a device node, a FIFO, a directory or a symlink
  // (which the rename would replace, not follow).
  const fs::file_status st = fs::symlink_status(target, ec);
  if (!ec && fs::exists(st) && !fs::is_regular_file(st)) {
    throw Error("will not write '{}': it exists and is {}, not a regular file; choose another output path", path_,
                fs::is_symlink(st)     ? "a symbolic link"
                : fs::is_directory(st) ? "a directory"
                                       : "a device, FIFO or socket");
  }
  tmp_ = (dir / fmt::format(".{}.tmp.XXXXXX", target.filename().string())).string();
  fd_ = ::mkstemp(tmp_.data());
  if (fd_ < 0) {
    throw Error("cannot write '{}': cannot create a temporary file in '{}': {}", path_, dir_, errno_text(errno));
  }
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!tmp_.empty()) ::unlink(tmp_.c_str());
}

void AtomicFile::write(const void* data, std::size_t bytes) {
  ZINF_ASSERT(fd_ >= 0, "AtomicFile::write after commit");
  const auto* p = static_cast<const char*>(data);
  std::size_t done = 0;
  while (done < bytes) {
    const ssize_t n = ::write(fd_, p + done, bytes - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error("cannot write '{}': {} (after {} bytes); the previous file, if any, is unchanged", path_,
                  errno_text(errno), written_ + done);
    }
    done += static_cast<std::size_t>(n);
  }
  written_ += bytes;
}

void AtomicFile::commit() {
  ZINF_ASSERT(fd_ >= 0, "AtomicFile::commit twice");
  if (::fchmod(fd_, 0644) != 0) throw Error("cannot write '{}': fchmod: {}", path_, errno_text(errno));
  if (::fsync(fd_) != 0) {
    throw Error("cannot write '{}': fsync: {}; the previous file, if any, is unchanged", path_, errno_text(errno));
  }
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) throw Error("cannot write '{}': close failed: {}", path_, errno_text(errno));
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    throw Error("cannot write '{}': rename: {}", path_, errno_text(errno));
  }
  tmp_.clear();
  sync_directory(dir_);
}

void sync_directory(const std::string& dir) {
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

void write_file_atomic(const std::string& path, std::string_view content) {
  AtomicFile file(path);
  file.write(content.data(), content.size());
  file.commit();
}

DirectoryLock::DirectoryLock(const std::string& dir, const std::string& what) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw Error("cannot create {} '{}': {}", what, dir, ec.message());
  const std::string path = (fs::path(dir) / ".zinf.lock").string();
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error("cannot lock {} '{}': {}: {}", what, dir, path, errno_text(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[32] = {};
    const ssize_t got = ::pread(fd_, buf, sizeof(buf) - 1, 0);
    ::close(fd_);
    fd_ = -1;
    if (err == EWOULDBLOCK) {
      throw Error("{} '{}' is in use by another zinf run (process {}): wait for it to end, or choose another directory",
                  what, dir, got > 0 ? std::string(buf, static_cast<std::size_t>(got)) : std::string("?"));
    }
    throw Error("cannot lock {} '{}': {}", what, dir, errno_text(err));
  }
  // The pid is only for a second run's message: the lock holds without it, so a failed write is
  // not an error.
  const std::string pid = std::to_string(::getpid());
  if (::ftruncate(fd_, 0) == 0) (void)!::pwrite(fd_, pid.data(), pid.size(), 0);
}

DirectoryLock::~DirectoryLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the lock
}

}  // namespace zinf
