#include "zinf/common/fs.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>

#include <fmt/format.h>

#include "zinf/common/error.hpp"

namespace zinf {

namespace {

// Closes the descriptor and removes the temporary file unless released.
class TempFile {
 public:
  TempFile(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!path_.empty()) ::unlink(path_.c_str());
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  int fd() const { return fd_; }
  void close_checked() {
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) throw Error("cannot write '{}': close failed: {}", path_, errno_text(errno));
  }
  void release() { path_.clear(); }

 private:
  int fd_;
  std::string path_;
};

}  // namespace

void write_file_atomic(const std::string& path, std::string_view content) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    throw Error("cannot write '{}': directory '{}' does not exist; create it first", path, dir.string());
  }
  std::string tmp_template = (dir / fmt::format(".{}.tmp.XXXXXX", target.filename().string())).string();
  const int fd = ::mkstemp(tmp_template.data());
  if (fd < 0) throw Error("cannot write '{}': cannot create a temporary file in '{}': {}", path, dir.string(), errno_text(errno));
  TempFile tmp(fd, tmp_template);
  std::size_t done = 0;
  while (done < content.size()) {
    const ssize_t n = ::write(tmp.fd(), content.data() + done, content.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error("cannot write '{}': {} (after {} of {} bytes); the previous file, if any, is unchanged", path,
                  errno_text(errno), done, content.size());
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fchmod(tmp.fd(), 0644) != 0) throw Error("cannot write '{}': fchmod: {}", path, errno_text(errno));
  if (::fsync(tmp.fd()) != 0) {
    throw Error("cannot write '{}': fsync: {}; the previous file, if any, is unchanged", path, errno_text(errno));
  }
  tmp.close_checked();
  if (::rename(tmp_template.c_str(), path.c_str()) != 0) {
    throw Error("cannot write '{}': rename: {}", path, errno_text(errno));
  }
  tmp.release();
  // Make the rename itself durable.
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);  // best effort: some file systems refuse fsync on directories
    ::close(dfd);
  }
}

}  // namespace zinf
