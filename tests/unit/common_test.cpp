// The error model, logging set-up and atomic file writes.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"
#include "zinf/common/log.hpp"

namespace zinf {
namespace {

std::string read_all(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(Error, FormatsAndCarriesContext) {
  Error e("cannot open '{}': {}", "x.json", "no such file");
  EXPECT_EQ(e.message(), "cannot open 'x.json': no such file");
  e.with_context("while loading the config");
  EXPECT_STREQ(e.what(), "cannot open 'x.json': no such file\n  while loading the config");
  EXPECT_EQ(e.context().size(), 1u);
}

TEST(Error, SyscallChecksQuoteTheCall) {
  try {
    ZINF_SYSCALL_CHECK(::open("/nonexistent/zinf", 0));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("::open(\"/nonexistent/zinf\", 0) failed: No such file or directory"),
              std::string::npos)
        << e.what();
  }
  try {
    ZINF_URING_CHECK(-EAGAIN);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Resource temporarily unavailable"), std::string::npos) << e.what();
  }
  EXPECT_EQ(ZINF_URING_CHECK(7), 7);
}

TEST(ErrorDeathTest, AssertAbortsWithTheCondition) {
  EXPECT_DEATH(ZINF_ASSERT(1 + 1 == 3, "math is {}", "broken"), "1 \\+ 1 == 3.*math is broken");
}

TEST(Log, LevelsAndRank) {
  EXPECT_EQ(log::parse_level("warning"), spdlog::level::warn);
  EXPECT_EQ(log::parse_level("debug"), spdlog::level::debug);
  EXPECT_EQ(log::parse_level("off"), spdlog::level::off);
  EXPECT_THROW(log::parse_level("loud"), Error);
  ::setenv("RANK", "3", 1);
  EXPECT_EQ(log::rank_from_environment(), 3);
  ::setenv("RANK", "x", 1);
  ::setenv("SLURM_PROCID", "5", 1);
  EXPECT_EQ(log::rank_from_environment(), 5);
  ::unsetenv("RANK");
  ::unsetenv("SLURM_PROCID");
  EXPECT_EQ(log::rank_from_environment(), 0);
}

TEST(Log, EveryLineCarriesTheRank) {
  const auto file = std::filesystem::temp_directory_path() / "zinf_log_test.log";
  std::filesystem::remove(file);
  log::init({.rank = 7, .level = "info", .file = file.string()});
  spdlog::info("hello {}", 42);
  spdlog::default_logger()->flush();
  const std::string text = read_all(file);
  EXPECT_NE(text.find("[rank 7] [info] hello 42"), std::string::npos) << text;
  // spdlog creates missing directories; a parent that is a file cannot be created.
  const auto not_dir = std::filesystem::temp_directory_path() / "zinf_log_not_a_dir";
  std::ofstream(not_dir) << "x";
  EXPECT_THROW(log::init({.rank = 0, .level = "info", .file = (not_dir / "zinf.log").string()}), Error);
  std::filesystem::remove(not_dir);
  log::init({.rank = 0, .level = "warn", .file = {}});
  std::filesystem::remove(file);
}

TEST(WriteFileAtomic, WritesAndReplaces) {
  const auto dir = std::filesystem::temp_directory_path() / "zinf_atomic_test";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const auto path = dir / "out.json";
  write_file_atomic(path.string(), "first");
  EXPECT_EQ(read_all(path), "first");
  write_file_atomic(path.string(), "second, longer");
  EXPECT_EQ(read_all(path), "second, longer");
  // No temporary files are left behind.
  int files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir)) ++files;
  EXPECT_EQ(files, 1);
  std::filesystem::remove_all(dir);
}

TEST(WriteFileAtomic, FailureLeavesThePreviousFile) {
  EXPECT_THROW(write_file_atomic((std::filesystem::temp_directory_path() / "zinf_no_such_dir/out.json").string(), "x"),
               Error);
  if (::geteuid() == 0) GTEST_SKIP() << "running as root: directory permissions do not stop writes";
  const auto dir = std::filesystem::temp_directory_path() / "zinf_atomic_ro";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const auto path = dir / "keep.json";
  write_file_atomic(path.string(), "precious");
  ::chmod(dir.c_str(), 0555);
  EXPECT_THROW(write_file_atomic(path.string(), "new"), Error);
  ::chmod(dir.c_str(), 0755);
  EXPECT_EQ(read_all(path), "precious");
  std::filesystem::remove_all(dir);
}

// In a child process: write under a 16-byte file-size limit (as a full disk would stop it); exit 0
// when write_file_atomic threw an error that names the file and promises the old one is intact.
[[noreturn]] void write_past_file_size_limit(const std::string& path) {
  ::signal(SIGXFSZ, SIG_IGN);
  const rlimit limit{16, 16};
  ::setrlimit(RLIMIT_FSIZE, &limit);
  try {
    write_file_atomic(path, std::string(4096, 'x'));
  } catch (const Error& e) {
    const std::string what = e.what();
    const bool ok = what.find("keep.json") != std::string::npos &&
                    what.find("previous file, if any, is unchanged") != std::string::npos;
    std::_Exit(ok ? 0 : 2);
  }
  std::_Exit(1);
}

// A write that fails part-way throws, names the path, and leaves the previous file whole. Works as
// root too (the file-size limit binds root; directory permissions do not).
TEST(WriteFileAtomicDeathTest, FailedWriteKeepsThePreviousFile) {
  const auto dir = std::filesystem::temp_directory_path() / "zinf_atomic_efbig";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const auto path = dir / "keep.json";
  write_file_atomic(path.string(), "precious");
  EXPECT_EXIT(write_past_file_size_limit(path.string()), ::testing::ExitedWithCode(0), "");
  EXPECT_EQ(read_all(path), "precious");
  int files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir)) ++files;
  EXPECT_EQ(files, 1) << "the temporary file was left behind";
  std::filesystem::remove_all(dir);
}

TEST(WriteFileAtomic, ParentThatIsAFileIsAnError) {
  const auto file_as_dir = std::filesystem::temp_directory_path() / "zinf_not_a_dir";
  std::ofstream(file_as_dir) << "x";
  try {
    write_file_atomic((file_as_dir / "out.json").string(), "x");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("does not exist"), std::string::npos) << e.what();
  }
  std::filesystem::remove(file_as_dir);
}

// Only a regular file is replaced: a FIFO, a symbolic link or a directory at the path is refused
// and left as it was.
TEST(WriteFileAtomic, RefusesToReplaceAnythingButARegularFile) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / fmt::format("zinf_safe_out_{}", ::getpid());
  fs::create_directories(dir);
  const auto expect_refused = [](const fs::path& p, const char* kind) {
    try {
      write_file_atomic(p.string(), "x");
      ADD_FAILURE() << p << " was replaced";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(kind), std::string::npos) << e.what();
    }
  };
  ASSERT_EQ(::mkfifo((dir / "fifo").c_str(), 0644), 0);
  expect_refused(dir / "fifo", "a device, FIFO or socket");
  EXPECT_TRUE(fs::is_fifo(dir / "fifo"));
  std::ofstream(dir / "target") << "keep";
  fs::create_symlink(dir / "target", dir / "link");
  expect_refused(dir / "link", "a symbolic link");
  EXPECT_TRUE(fs::is_symlink(dir / "link"));
  fs::create_directory(dir / "sub");
  expect_refused(dir / "sub", "a directory");
  // A regular file is replaced as before.
  write_file_atomic((dir / "target").string(), "new");
  std::ifstream in(dir / "target");
  std::string got;
  in >> got;
  EXPECT_EQ(got, "new");
  fs::remove_all(dir);
}

// The run-directory lock: a second holder is refused, naming the first's pid; released on destruction.
TEST(DirectoryLock, ASecondHolderIsRefusedUntilTheFirstLetsGo) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / fmt::format("zinf_lock_{}", ::getpid());
  {
    DirectoryLock first(dir.string(), "the output directory");
    try {
      DirectoryLock second(dir.string(), "the output directory");
      ADD_FAILURE() << "the lock was taken twice";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(fmt::format("in use by another zinf run (process {})", ::getpid())),
                std::string::npos)
          << e.what();
    }
  }
  DirectoryLock again(dir.string(), "the output directory");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace zinf
