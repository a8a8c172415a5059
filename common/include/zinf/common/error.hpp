#pragma once
// The two tiers of errors (STYLE.md, rule 4):
//  - zinf::Error: bad input from a user, a file or the OS. The message says what was wrong, where,
//    and what to do. Callers add context as the error travels up (`with_context`).
//  - ZINF_ASSERT: a broken invariant of zinf itself. Logs the condition and aborts.

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace zinf {

class Error : public std::runtime_error {
 public:
  explicit Error(std::string message) : std::runtime_error(message), message_(std::move(message)) {}

  template <typename... Args>
  explicit Error(fmt::format_string<Args...> format, Args&&... args)
      : Error(fmt::format(format, std::forward<Args>(args)...)) {}

  // Adds an outer context line ("while loading config foo.json"); the innermost message stays first.
  Error& with_context(std::string context) & {
    context_.push_back(std::move(context));
    rebuild();
    return *this;
  }
  Error&& with_context(std::string context) && { return std::move(with_context(std::move(context))); }

  const std::string& message() const noexcept { return message_; }
  const std::vector<std::string>& context() const noexcept { return context_; }
  const char* what() const noexcept override { return full_.empty() ? message_.c_str() : full_.c_str(); }

 private:
  void rebuild();

  std::string message_;
  std::vector<std::string> context_;
  std::string full_;
};

// Process exit codes used by every zinf tool.
inline constexpr int kExitOk = 0;
inline constexpr int kExitRuntimeError = 1;
inline constexpr int kExitUsageError = 2;

// Text for an errno value, thread-safe.
std::string errno_text(int err);

namespace detail {
[[noreturn]] void assert_fail(const char* condition, const char* file, int line, const std::string& message);
[[noreturn]] void throw_syscall_error(const char* call, const char* file, int line, int err);
}  // namespace detail

}  // namespace zinf

// Broken invariant: log and abort. The optional message is a fmt format string with arguments.
#define ZINF_ASSERT(cond, ...)                                                                       \
  do {                                                                                               \
    if (!(cond)) [[unlikely]] {                                                                      \
      ::zinf::detail::assert_fail(#cond, __FILE__, __LINE__, ::zinf::detail::assert_message(__VA_ARGS__)); \
    }                                                                                                \
  } while (0)

namespace zinf::detail {
inline std::string assert_message() { return {}; }
template <typename... Args>
std::string assert_message(fmt::format_string<Args...> format, Args&&... args) {
  return fmt::format(format, std::forward<Args>(args)...);
}
}  // namespace zinf::detail

// For liburing-style calls that return -errno on failure (and >= 0 on success). The error quotes
// the call; callers add file/offset context with Error::with_context.
#define ZINF_URING_CHECK(call)                                                   \
  ([&]() {                                                                       \
    const auto zinf_rc_ = (call);                                                \
    if (zinf_rc_ < 0) [[unlikely]] {                                             \
      ::zinf::detail::throw_syscall_error(#call, __FILE__, __LINE__, static_cast<int>(-zinf_rc_)); \
    }                                                                            \
    return zinf_rc_;                                                             \
  }())

// For POSIX calls that return -1 and set errno.
#define ZINF_SYSCALL_CHECK(call)                                                 \
  ([&]() {                                                                       \
    const auto zinf_rc_ = (call);                                                \
    if (zinf_rc_ == -1) [[unlikely]] {                                           \
      ::zinf::detail::throw_syscall_error(#call, __FILE__, __LINE__, errno);     \
    }                                                                            \
    return zinf_rc_;                                                             \
  }())
