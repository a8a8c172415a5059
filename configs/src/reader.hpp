#pragma once
// Typed, path-aware access to one JSON object of a config. Every getter records its key as known,
// reports a wrong type or range with the path and the value found, and leaves the default in place
// on error so validation goes on and reports everything at once. `finish()` reports the keys nobody
// asked for, with a did-you-mean.

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "zinf/configs/diagnostics.hpp"
#include "suggest.hpp"
#include "zinf/configs/document.hpp"

namespace zinf::config::detail {

struct ParseContext {
  Diagnostics& diagnostics;
  bool allow_auto = false;
  std::vector<std::string>* auto_keys = nullptr;
};

// How an unresolved "auto" is treated in a section.
enum class AutoPolicy { kError, kDefault };

std::string describe(const Json& value);  // `string "3"`, `number 2.5`, `an object`, ...

class Reader {
 public:
  Reader(const Json* object, std::string path, ParseContext& ctx, AutoPolicy auto_policy = AutoPolicy::kError);

  bool exists() const noexcept { return object_ != nullptr; }
  const std::string& path() const noexcept { return path_; }
  std::string child_path(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }
  bool has(const std::string& key);  // the key or one of its aliases is present (marks it known)
  const Json* raw(const std::string& key);  // resolves aliases; marks known; nullptr if absent

  // `old_name` is another spelling of `name`. Deprecated ones get a warning; giving both is an error.
  void alias(const std::string& name, const std::string& old_name, bool deprecated);

  // Getters: return true when the key was present and valid (the output was written).
  bool boolean(const std::string& key, bool& out);
  bool integer(const std::string& key, std::int64_t& out, std::int64_t min = std::numeric_limits<std::int64_t>::min(),
               std::int64_t max = std::numeric_limits<std::int64_t>::max());
  bool integer(const std::string& key, int& out, int min, int max);
  bool integer(const std::string& key, std::optional<std::int64_t>& out, std::int64_t min = 0);
  bool number(const std::string& key, double& out, double min = -std::numeric_limits<double>::infinity(),
              double max = std::numeric_limits<double>::infinity(), bool min_exclusive = false);
  // A two-element list of numbers in [min, max) (optimizer betas).
  bool number_pair(const std::string& key, double& first, double& second, double min, double max_exclusive);
  bool string(const std::string& key, std::string& out, bool allow_null = false);
  bool string_list(const std::string& key, std::vector<std::string>& out);
  // One of `choices` (exact, or case-insensitive when asked); errors list them with a did-you-mean.
  template <typename E>
  bool choice(const std::string& key, E& out, const std::vector<std::pair<std::string, E>>& choices,
              bool case_insensitive = false);

  // A nested object; absent -> a Reader with exists() == false. Wrong type -> error, absent Reader.
  Reader section(const std::string& key, AutoPolicy auto_policy);
  Reader section(const std::string& key) { return section(key, auto_policy_); }

  // A key DeepSpeed knows that zinf does not implement: when `active(value)` holds, report it
  // with `severity` and the reason; otherwise accept it silently.
  void unsupported(const std::string& key, Severity severity, const std::string& reason,
                   const std::function<bool(const Json&)>& active = {});
  // Keys accepted and deliberately ignored (DeepSpeed bookkeeping that has no meaning in zinf).
  void accept(std::initializer_list<const char*> keys);

  // Reports unknown keys (`unknown_severity`), with a did-you-mean from the known ones.
  void finish(Severity unknown_severity = Severity::kError, const std::string& hint = {});

  void error(const std::string& key, const std::string& message);
  void warning(const std::string& key, const std::string& message);
  void note(const std::string& key, const std::string& message);

 private:
  // Returns the value to read or nullptr (absent, "auto" handled, or an error reported).
  const Json* value_for(const std::string& key, const char* expected);
  void report_type(const std::string& key, const Json& value, const std::string& expected);

  const Json* object_;
  std::string path_;
  ParseContext* ctx_;
  AutoPolicy auto_policy_;
  std::vector<std::string> known_;
  std::map<std::string, std::vector<std::pair<std::string, bool>>> aliases_;  // name -> (old, deprecated)
};

bool json_true(const Json& value);  // `true`, or a non-zero number
bool enabled_section(const Json& value);  // an object with "enabled": true (or a bare true)

template <typename E>
bool Reader::choice(const std::string& key, E& out, const std::vector<std::pair<std::string, E>>& choices,
                    bool case_insensitive) {
  const Json* v = value_for(key, "a name");
  if (v == nullptr) return false;
  std::vector<std::string> names;
  for (const auto& c : choices) names.push_back(c.first);
  if (!v->is_string()) {
    report_type(key, *v, "one of " + join_quoted(names));
    return false;
  }
  const auto text = v->get<std::string>();
  for (const auto& [name, value] : choices) {
    if (name == text || (case_insensitive && iequals(name, text))) {
      out = value;
      return true;
    }
  }
  error(key, "\"" + text + "\" is not one of " + join_quoted(names) + did_you_mean(text, names));
  return false;
}

}  // namespace zinf::config::detail
