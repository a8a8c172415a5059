#pragma once
// Helpers for the io tests: scratch directories on a real disk, small mounted file systems, and
// running a piece of a test as an unprivileged user (root bypasses permissions and memlock).

#include <gtest/gtest.h>
#include <grp.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "zinf/common/error.hpp"

namespace zinf::io::testing {

// A fresh directory under ZINF_TEST_SCRATCH (default: the system temp directory), removed at the
// end. Set ZINF_TEST_SCRATCH to a directory on an NVMe drive to test O_DIRECT there.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& parent = {}) {
    std::string base = parent;
    if (base.empty()) {
      const char* env = std::getenv("ZINF_TEST_SCRATCH");
      base = (env != nullptr && *env != '\0') ? env : std::filesystem::temp_directory_path().string();
    }
    std::string tmpl = base + "/zinf-io-test-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) throw Error("mkdtemp in '{}': {}", base, errno_text(errno));
    path_ = tmpl;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::string& path() const { return path_; }
  std::string sub(const std::string& name) const {
    const std::string p = path_ + "/" + name;
    std::filesystem::create_directories(p);
    return p;
  }

 private:
  std::string path_;
};

// A tmpfs of a fixed size (or a ramfs, which refuses O_DIRECT) mounted on a scratch directory.
// Needs root (CAP_SYS_ADMIN); where the mount is refused, `reason()` says why and the test skips.
class SmallFs {
 public:
  explicit SmallFs(std::uint64_t bytes, bool read_only = false, const char* type = "tmpfs") {
    const std::string opts = std::string(type) == "tmpfs" ? fmt::format("size={}", bytes) : std::string();
    if (::mount(type, dir_.path().c_str(), type, read_only ? MS_RDONLY : 0, opts.c_str()) != 0) {
      reason_ = fmt::format("cannot mount a {} ({}): this test needs root with CAP_SYS_ADMIN", type,
                            std::strerror(errno));
      return;
    }
    mounted_ = true;
  }
  ~SmallFs() {
    if (mounted_) ::umount2(dir_.path().c_str(), MNT_DETACH);
  }
  bool ok() const { return mounted_; }
  const std::string& reason() const { return reason_; }
  const std::string& path() const { return dir_.path(); }

 private:
  ScratchDir dir_;
  bool mounted_ = false;
  std::string reason_;
};

// Runs `body` in a child process and returns the child's exit code (`body` returns it; stdout and
// stderr are inherited). With `unprivileged`, the child first becomes user `nobody` when root.
inline int run_in_child(const std::function<int()>& body, bool unprivileged = false) {
  const pid_t pid = ::fork();
  if (pid < 0) throw Error("fork: {}", errno_text(errno));
  if (pid == 0) {
    if (unprivileged && ::geteuid() == 0) {
      if (::setgroups(0, nullptr) != 0 || ::setgid(65534) != 0 || ::setuid(65534) != 0) _exit(97);
    }
    int rc = 98;
    try {
      rc = body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "unexpected exception: %s\n", e.what());
      rc = 99;
    }
    std::fflush(stdout);
    std::fflush(stderr);
    _exit(rc);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

inline int run_unprivileged(const std::function<int()>& body) { return run_in_child(body, true); }

inline std::vector<std::byte> random_bytes(std::size_t n, std::uint64_t seed) {
  std::vector<std::byte> v(n);
  std::mt19937_64 rng(seed);
  for (auto& b : v) b = static_cast<std::byte>(rng() & 0xff);
  return v;
}

// Expects `statement` to throw zinf::Error whose text contains every fragment.
#define EXPECT_IO_ERROR(statement, ...)                                                          \
  do {                                                                                          \
    try {                                                                                       \
      statement;                                                                                \
      ADD_FAILURE() << "expected a zinf::Error";                                                \
    } catch (const ::zinf::Error& e) {                                                          \
      for (const std::string& fragment : std::initializer_list<std::string>{__VA_ARGS__}) {     \
        EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos)                      \
            << "missing '" << fragment << "' in: " << e.what();                                 \
      }                                                                                         \
    }                                                                                           \
  } while (0)

}  // namespace zinf::io::testing
