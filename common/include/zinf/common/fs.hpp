#pragma once
// Files written so that a crash at any moment leaves either the old or the new content, never a
// torn mix: write to a temporary file in the same directory, fsync it, rename it over the target,
// fsync the directory.

#include <cstddef>
#include <string>
#include <string_view>

namespace zinf {

// Throws zinf::Error naming the path and the OS reason (missing directory, disk full, ...).
void write_file_atomic(const std::string& path, std::string_view content);

// The streaming form, for files too large to build in memory: write() appends, commit() makes the
// file appear under its name. Destroyed without commit(), the temporary file is removed and the
// previous file, if any, is untouched. Errors are zinf::Error naming the target path.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, std::size_t bytes);
  void commit();
  const std::string& path() const noexcept { return path_; }
  std::size_t written() const noexcept { return written_; }

 private:
  std::string path_;
  std::string tmp_;
  std::string dir_;
  int fd_ = -1;
  std::size_t written_ = 0;
};

// An advisory lock on a directory (flock on DIR/.zinf.lock, which holds the holder's pid), held
// while the object lives and released by the kernel when the process ends, however it ends. Two
// runs into one --output-dir would mix their checkpoints and metrics.
class DirectoryLock {
 public:
  // Creates the directory if needed. Throws zinf::Error naming the holder's pid when another
  // process holds the lock (`what`: what the directory is, for the message).
  DirectoryLock(const std::string& dir, const std::string& what);
  ~DirectoryLock();
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

 private:
  int fd_ = -1;
};

// fsync of a directory, best effort (some file systems refuse it): makes renames in it durable.
void sync_directory(const std::string& dir);

}  // namespace zinf
