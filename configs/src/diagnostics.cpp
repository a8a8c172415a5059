#include "zinf/configs/diagnostics.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "zinf/common/error.hpp"

namespace zinf::config {

void Diagnostics::error(std::string path, std::string message) {
  items_.push_back({Severity::kError, std::move(path), std::move(message)});
}
void Diagnostics::warning(std::string path, std::string message) {
  items_.push_back({Severity::kWarning, std::move(path), std::move(message)});
}
void Diagnostics::note(std::string path, std::string message) {
  items_.push_back({Severity::kNote, std::move(path), std::move(message)});
}

bool Diagnostics::has_errors() const noexcept { return count(Severity::kError) > 0; }

std::size_t Diagnostics::count(Severity severity) const noexcept {
  return static_cast<std::size_t>(
      std::count_if(items_.begin(), items_.end(), [&](const Diagnostic& d) { return d.severity == severity; }));
}

bool Diagnostics::mentions(const std::string& path, Severity severity) const noexcept {
  return std::any_of(items_.begin(), items_.end(),
                     [&](const Diagnostic& d) { return d.severity == severity && d.path == path; });
}

const char* severity_name(Severity severity) noexcept {
  switch (severity) {
    case Severity::kNote: return "note";
    case Severity::kWarning: return "warning";
    case Severity::kError: return "error";
  }
  return "?";
}

std::string Diagnostics::format(Severity at_least) const {
  std::string out;
  // Errors first, then warnings, then notes: the lines a user must act on come on top.
  for (Severity s : {Severity::kError, Severity::kWarning, Severity::kNote}) {
    if (s < at_least) continue;
    for (const auto& d : items_) {
      if (d.severity != s) continue;
      out += severity_name(s);
      out += ": ";
      if (!d.path.empty()) {
        out += d.path;
        out += ": ";
      }
      out += d.message;
      out += '\n';
    }
  }
  return out;
}

void throw_if_errors(const Diagnostics& diagnostics, const std::string& what) {
  if (!diagnostics.has_errors()) return;
  throw Error("{} has {} error(s):\n{}", what, diagnostics.count(Severity::kError),
              diagnostics.format(Severity::kWarning));
}

}  // namespace zinf::config
