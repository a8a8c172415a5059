#include "reader.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace zinf::config::detail {

std::string describe(const Json& value) {
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  switch (value.type()) {
    case Json::value_t::string: return "string " + text;
    case Json::value_t::boolean: return "boolean " + text;
    case Json::value_t::null: return "null";
    case Json::value_t::object: return "an object";
    case Json::value_t::array: return "a list " + text;
    case Json::value_t::number_float:
      if (std::isnan(value.get<double>())) return "NaN";
      if (std::isinf(value.get<double>())) return value.get<double>() > 0 ? "infinity" : "-infinity";
      return "number " + text;
    default: return "number " + text;
  }
}

bool json_true(const Json& value) {
  if (value.is_boolean()) return value.get<bool>();
  if (value.is_number()) return value.get<double>() != 0.0;
  return false;
}

bool enabled_section(const Json& value) {
  if (value.is_object()) {
    const auto it = value.find("enabled");
    return it != value.end() && json_true(*it);
  }
  return json_true(value);
}

Reader::Reader(const Json* object, std::string path, ParseContext& ctx, AutoPolicy auto_policy)
    : object_(object), path_(std::move(path)), ctx_(&ctx), auto_policy_(auto_policy) {}

void Reader::error(const std::string& key, const std::string& message) {
  ctx_->diagnostics.error(key.empty() ? path_ : child_path(key), message);
}
void Reader::warning(const std::string& key, const std::string& message) {
  ctx_->diagnostics.warning(key.empty() ? path_ : child_path(key), message);
}
void Reader::note(const std::string& key, const std::string& message) {
  ctx_->diagnostics.note(key.empty() ? path_ : child_path(key), message);
}

void Reader::alias(const std::string& name, const std::string& old_name, bool deprecated) {
  aliases_[name].emplace_back(old_name, deprecated);
}

const Json* Reader::raw(const std::string& key) {
  known_.push_back(key);
  if (object_ == nullptr) return nullptr;
  const Json* found = nullptr;
  if (auto it = object_->find(key); it != object_->end()) found = &*it;
  if (auto al = aliases_.find(key); al != aliases_.end()) {
    for (const auto& [old_name, deprecated] : al->second) {
      known_.push_back(old_name);
      const auto it = object_->find(old_name);
      if (it == object_->end()) continue;
      if (found != nullptr) {
        error(old_name, fmt::format("\"{}\" and \"{}\" are two names for the same setting; give only \"{}\"",
                                    old_name, key, key));
        continue;
      }
      if (deprecated) warning(old_name, fmt::format("deprecated name; use \"{}\" instead", key));
      found = &*it;
    }
  }
  return found;
}

bool Reader::has(const std::string& key) { return raw(key) != nullptr; }

void Reader::report_type(const std::string& key, const Json& value, const std::string& expected) {
  std::string hint;
  if (value.is_string() && expected.find("number") != std::string::npos) hint = " (write numbers without quotes)";
  if (value.is_string() && expected.find("integer") != std::string::npos) hint = " (write numbers without quotes)";
  if (value.is_string() && expected.find("true or false") != std::string::npos) hint = " (write true/false without quotes)";
  error(key, fmt::format("expected {}, found {}{}", expected, describe(value), hint));
}

const Json* Reader::value_for(const std::string& key, const char* expected) {
  const Json* v = raw(key);
  if (v == nullptr) return nullptr;
  if (v->is_string() && v->get<std::string>() == "auto") {
    if (ctx_->allow_auto) {
      if (ctx_->auto_keys) ctx_->auto_keys->push_back(child_path(key));
    } else if (auto_policy_ == AutoPolicy::kDefault) {
      note(key, "\"auto\" with nothing to resolve it: the default applies (as in DeepSpeed)");
    } else {
      error(key, fmt::format("\"auto\" was not resolved: give the training argument that sets it (see `zinf config "
                             "resolve --help`) or write {} here",
                             expected));
    }
    return nullptr;
  }
  return v;
}

bool Reader::boolean(const std::string& key, bool& out) {
  const Json* v = value_for(key, "true or false");
  if (v == nullptr) return false;
  if (v->is_boolean()) {
    out = v->get<bool>();
    return true;
  }
  // pydantic (DeepSpeed's validator) also takes 0 and 1.
  if (v->is_number_integer() && (v->get<std::int64_t>() == 0 || v->get<std::int64_t>() == 1)) {
    out = v->get<std::int64_t>() == 1;
    return true;
  }
  report_type(key, *v, "true or false");
  return false;
}

bool Reader::integer(const std::string& key, std::int64_t& out, std::int64_t min, std::int64_t max) {
  const Json* v = value_for(key, "an integer");
  if (v == nullptr) return false;
  std::int64_t value = 0;
  if (v->is_number_integer() && !v->is_number_unsigned()) {
    value = v->get<std::int64_t>();
  } else if (v->is_number_unsigned()) {
    const auto u = v->get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      error(key, fmt::format("{} is too large (at most {})", u, max));
      return false;
    }
    value = static_cast<std::int64_t>(u);
  } else if (v->is_number_float()) {
    // DeepSpeed configs write sizes as 5e8: accept floats that hold an exact integer.
    const double d = v->get<double>();
    if (!std::isfinite(d) || d != std::floor(d)) {
      report_type(key, *v, "an integer");
      return false;
    }
    if (d >= 9.2e18 || d <= -9.2e18) {
      error(key, fmt::format("{} is too large (at most {})", v->dump(), max));
      return false;
    }
    value = static_cast<std::int64_t>(d);
  } else {
    report_type(key, *v, "an integer");
    return false;
  }
  if (value < min || value > max) {
    if (max == std::numeric_limits<std::int64_t>::max()) {
      error(key, fmt::format("{} is out of range: must be >= {}", value, min));
    } else {
      error(key, fmt::format("{} is out of range: must be between {} and {}", value, min, max));
    }
    return false;
  }
  out = value;
  return true;
}

bool Reader::integer(const std::string& key, int& out, int min, int max) {
  std::int64_t value = out;
  if (!integer(key, value, min, max)) return false;
  out = static_cast<int>(value);
  return true;
}

bool Reader::integer(const std::string& key, std::optional<std::int64_t>& out, std::int64_t min) {
  const Json* v = raw(key);
  if (v != nullptr && v->is_null()) {
    out.reset();
    return true;
  }
  std::int64_t value = 0;
  if (!integer(key, value, min)) return false;
  out = value;
  return true;
}

bool Reader::number(const std::string& key, double& out, double min, double max, bool min_exclusive) {
  const Json* v = value_for(key, "a number");
  if (v == nullptr) return false;
  if (!v->is_number()) {
    report_type(key, *v, "a number");
    return false;
  }
  const double d = v->get<double>();
  if (!std::isfinite(d)) {
    error(key, fmt::format("must be a finite number, found {}", describe(*v)));
    return false;
  }
  const bool below = min_exclusive ? d <= min : d < min;
  if (below || d > max) {
    std::string range;
    if (std::isinf(max)) {
      range = fmt::format("must be {} {}", min_exclusive ? ">" : ">=", min);
    } else {
      range = fmt::format("must be between {} and {}", min, max);
    }
    error(key, fmt::format("{} is out of range: {}", v->dump(), range));
    return false;
  }
  out = d;
  return true;
}

bool Reader::number_pair(const std::string& key, double& first, double& second, double min, double max_exclusive) {
  const Json* v = value_for(key, "a list of two numbers");
  if (v == nullptr) return false;
  if (!v->is_array() || v->size() != 2 || !(*v)[0].is_number() || !(*v)[1].is_number()) {
    report_type(key, *v, "a list of two numbers, e.g. [0.9, 0.999]");
    return false;
  }
  const double a = (*v)[0].get<double>();
  const double b = (*v)[1].get<double>();
  bool ok = true;
  for (double d : {a, b}) {
    if (!std::isfinite(d) || d < min || d >= max_exclusive) ok = false;
  }
  if (!ok) {
    error(key, fmt::format("{} is out of range: each value must be in [{}, {})", v->dump(), min, max_exclusive));
    return false;
  }
  first = a;
  second = b;
  return true;
}

bool Reader::string(const std::string& key, std::string& out, bool allow_null) {
  const Json* v = value_for(key, "a string");
  if (v == nullptr) return false;
  if (allow_null && v->is_null()) {
    out.clear();
    return true;
  }
  if (!v->is_string()) {
    report_type(key, *v, "a string");
    return false;
  }
  out = v->get<std::string>();
  return true;
}

bool Reader::string_list(const std::string& key, std::vector<std::string>& out) {
  const Json* v = value_for(key, "a list of strings");
  if (v == nullptr) return false;
  if (!v->is_array() || !std::all_of(v->begin(), v->end(), [](const Json& e) { return e.is_string(); })) {
    report_type(key, *v, "a list of strings");
    return false;
  }
  out.clear();
  for (const auto& e : *v) out.push_back(e.get<std::string>());
  return true;
}

Reader Reader::section(const std::string& key, AutoPolicy auto_policy) {
  const Json* v = raw(key);
  if (v == nullptr || v->is_null()) return Reader(nullptr, child_path(key), *ctx_, auto_policy);
  if (!v->is_object()) {
    report_type(key, *v, "an object ({...})");
    return Reader(nullptr, child_path(key), *ctx_, auto_policy);
  }
  return Reader(v, child_path(key), *ctx_, auto_policy);
}

void Reader::unsupported(const std::string& key, Severity severity, const std::string& reason,
                         const std::function<bool(const Json&)>& active) {
  const Json* v = raw(key);
  if (v == nullptr) return;
  if (active && !active(*v)) return;
  const std::string message = "not supported by zinf: " + reason;
  if (severity == Severity::kError) {
    error(key, message);
  } else if (severity == Severity::kWarning) {
    warning(key, message + " (ignored)");
  } else {
    note(key, message);
  }
}

void Reader::accept(std::initializer_list<const char*> keys) {
  for (const char* k : keys) known_.emplace_back(k);
}

void Reader::finish(Severity unknown_severity, const std::string& hint) {
  if (object_ == nullptr) return;
  for (auto it = object_->begin(); it != object_->end(); ++it) {
    if (std::find(known_.begin(), known_.end(), it.key()) != known_.end()) continue;
    std::string message = "unknown key" + did_you_mean(it.key(), known_);
    if (!hint.empty()) message += " " + hint;
    if (unknown_severity == Severity::kError) {
      error(it.key(), message);
    } else {
      warning(it.key(), message + " (ignored)");
    }
  }
}

}  // namespace zinf::config::detail
