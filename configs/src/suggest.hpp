#pragma once
// "Did you mean" for misspelt keys, names and presets.

#include <string>
#include <string_view>
#include <vector>

namespace zinf::config::detail {

// Edit distance (Damerau: a swap of two neighbours counts 1), case-insensitive.
std::size_t edit_distance(std::string_view a, std::string_view b);

// The closest candidate within a distance that scales with the word's length, or "".
std::string closest(std::string_view word, const std::vector<std::string>& candidates);

// "; did you mean \"x\"?" or "".
std::string did_you_mean(std::string_view word, const std::vector<std::string>& candidates);

// "a, b, c"
std::string join(const std::vector<std::string>& items, std::string_view sep = ", ");

// "\"a\", \"b\" or \"c\""
std::string join_quoted(const std::vector<std::string>& items);

bool iequals(std::string_view a, std::string_view b);

}  // namespace zinf::config::detail
