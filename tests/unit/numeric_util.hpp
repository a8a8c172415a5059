#pragma once
// Element-wise comparison for numerical tests (STYLE.md rule 8c): |got - ref| <= atol + rtol*|ref|,
// reporting the worst element and the first misses.

#include <gtest/gtest.h>
#include <fmt/format.h>

#include <cmath>
#include <cstddef>
#include <span>
#include <string>

namespace zinf::testing {

inline ::testing::AssertionResult all_close(std::span<const float> got, std::span<const float> ref, double atol,
                                            double rtol, const std::string& what) {
  if (got.size() != ref.size()) {
    return ::testing::AssertionFailure() << what << ": sizes differ (" << got.size() << " vs " << ref.size() << ")";
  }
  double worst = 0;
  std::size_t worst_i = 0, misses = 0;
  std::string first;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - ref[i]);
    const double tol = atol + rtol * std::abs(static_cast<double>(ref[i]));
    const double ratio = err / tol;
    if (!(ratio <= worst) && !std::isnan(worst)) worst = ratio, worst_i = i;  // NaN sticks as the worst
    if (!(err <= tol) && ++misses <= 3) first += fmt::format(" [{}] {} vs {}", i, got[i], ref[i]);
  }
  if (misses == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << misses << " of " << got.size()
                                       << " elements outside tolerance; worst [" << worst_i << "] " << got[worst_i]
                                       << " vs " << ref[worst_i] << " (" << worst << "x the tolerance); first:"
                                       << first;
}

// The largest |x| of a tensor (a scale for absolute tolerances).
inline double max_abs(std::span<const float> x) {
  double m = 0;
  for (const float v : x) m = std::max(m, static_cast<double>(std::abs(v)));
  return m;
}

}  // namespace zinf::testing
