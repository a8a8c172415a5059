#pragma once
// A file opened for the io_uring engine: an owned descriptor, whether O_DIRECT is in effect, and
// the path for error messages. O_DIRECT is asked for by default; where the file system refuses it
// (tmpfs, some FUSE and network file systems) the file is opened buffered and one warning is
// logged per process.

#include <cstdint>
#include <string>

namespace zinf::io {

enum class OpenMode {
  kRead,             // existing file, read only
  kReadWrite,        // existing file
  kCreateReadWrite,  // created if missing (0644), never truncated
};

class File {
 public:
  File() = default;
  // Throws zinf::Error naming the path and the OS reason, with advice (missing directory,
  // permissions, read-only file system, ...).
  static File open(const std::string& path, OpenMode mode, bool direct = true);
  ~File();
  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  int fd() const noexcept { return fd_; }
  bool is_open() const noexcept { return fd_ >= 0; }
  // True when I/O bypasses the page cache; offsets, lengths and buffers must then be 4 KiB-aligned.
  bool direct() const noexcept { return direct_; }
  const std::string& path() const noexcept { return path_; }
  // Unique per opened file in this process (descriptor numbers are reused after close).
  std::uint64_t id() const noexcept { return id_; }

  std::uint64_t size() const;
  // Reserves [offset, offset+bytes) on disk (fallocate), extending the file. Throws zinf::Error on
  // ENOSPC/EDQUOT/EFBIG naming the path and the sizes. Where the file system cannot preallocate,
  // extends the file with ftruncate and logs one warning (space is then claimed on first write).
  void allocate(std::uint64_t offset, std::uint64_t bytes);
  void sync() const;
  // Closes now, reporting a close error (deferred write-back errors surface here).
  void close();

 private:
  int fd_ = -1;
  std::uint64_t id_ = 0;
  bool direct_ = false;
  std::string path_;
};

// Free bytes for an unprivileged user on the file system holding `path` (statvfs f_bavail).
std::uint64_t free_bytes(const std::string& path);
// The file system type of `path` as a short name ("ext4", "xfs", "tmpfs", ...), or "unknown".
std::string filesystem_type(const std::string& path);

}  // namespace zinf::io
