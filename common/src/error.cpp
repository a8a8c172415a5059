#include "zinf/common/error.hpp"

#include <spdlog/spdlog.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace zinf {

void Error::rebuild() {
  full_ = message_;
  for (const auto& ctx : context_) {
    full_ += "\n  ";
    full_ += ctx;
  }
}

std::string errno_text(int err) {
  char buf[256];
  // GNU strerror_r returns a pointer that may or may not be buf.
  const char* text = strerror_r(err, buf, sizeof(buf));
  return fmt::format("{} (errno {})", text, err);
}

namespace detail {

void assert_fail(const char* condition, const char* file, int line, const std::string& message) {
  const std::string text = fmt::format("internal error: assertion `{}` failed at {}:{}{}{}", condition, file, line,
                                       message.empty() ? "" : ": ", message);
  auto logger = spdlog::default_logger();
  logger->critical(text);
  logger->flush();
  // Before zinf::log::init the default logger writes to stdout; the reason must reach stderr.
  if (logger->name() != "zinf") std::fprintf(stderr, "%s\n", text.c_str());
  std::abort();
}

void throw_syscall_error(const char* call, const char* file, int line, int err) {
  throw Error("{} failed: {} at {}:{}", call, errno_text(err), file, line);
}

}  // namespace detail
}  // namespace zinf
