#pragma once
// Helpers shared by the config tests.

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "zinf/configs/diagnostics.hpp"
#include "zinf/configs/document.hpp"
#include "zinf/configs/parse.hpp"

namespace zinf::config::testing {

// tests/data: ZINF_TEST_DATA_DIR from the environment (when the binaries run elsewhere, as on the
// GPU machine), else the source tree this binary was built from.
inline std::string data_dir() {
  const char* env = std::getenv("ZINF_TEST_DATA_DIR");
  return (env != nullptr && *env != '\0') ? std::string(env) : std::string(ZINF_TEST_DATA_DIR);
}

inline Json J(const char* text) { return parse_json(text, "test"); }

inline ParseResult parse(const char* text, std::int64_t world = 1) {
  ParseOptions o;
  o.world_size = world;
  return parse_config(J(text), o);
}

// True when a diagnostic of `severity` at `path` contains `fragment`.
inline ::testing::AssertionResult HasDiag(const Diagnostics& d, Severity severity, const std::string& path,
                                          const std::string& fragment) {
  for (const auto& item : d.all()) {
    if (item.severity == severity && item.path == path && item.message.find(fragment) != std::string::npos) {
      return ::testing::AssertionSuccess();
    }
  }
  return ::testing::AssertionFailure() << "no " << severity_name(severity) << " at '" << path << "' containing '"
                                       << fragment << "'; got:\n"
                                       << d.format();
}

#define EXPECT_ERROR(result, path, fragment) \
  EXPECT_TRUE(::zinf::config::testing::HasDiag((result).diagnostics, ::zinf::config::Severity::kError, path, fragment))
#define EXPECT_WARNING(result, path, fragment) \
  EXPECT_TRUE(::zinf::config::testing::HasDiag((result).diagnostics, ::zinf::config::Severity::kWarning, path, fragment))
#define EXPECT_NOTE(result, path, fragment) \
  EXPECT_TRUE(::zinf::config::testing::HasDiag((result).diagnostics, ::zinf::config::Severity::kNote, path, fragment))
#define EXPECT_CLEAN(result) EXPECT_EQ((result).diagnostics.all().size(), 0u) << (result).diagnostics.format()

// Expects `statement` to throw zinf::Error whose text contains `fragment`.
#define EXPECT_ZINF_ERROR(statement, fragment)                                                   \
  do {                                                                                          \
    try {                                                                                       \
      statement;                                                                                \
      ADD_FAILURE() << "expected zinf::Error containing '" << (fragment) << "'";                \
    } catch (const ::zinf::Error& e) {                                                          \
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();           \
    }                                                                                           \
  } while (0)

}  // namespace zinf::config::testing
