#pragma once
// Validation collects every problem of a config before reporting, each with the dotted path of the
// key (`zero_optimization.offload_param.device`), so a user fixes them all in one go.

#include <string>
#include <vector>

namespace zinf::config {

enum class Severity { kNote, kWarning, kError };

struct Diagnostic {
  Severity severity;
  std::string path;     // dotted key path; empty for the document as a whole
  std::string message;  // what was found and what was expected
};

class Diagnostics {
 public:
  void error(std::string path, std::string message);
  void warning(std::string path, std::string message);
  void note(std::string path, std::string message);

  bool has_errors() const noexcept;
  std::size_t count(Severity severity) const noexcept;
  const std::vector<Diagnostic>& all() const noexcept { return items_; }
  // True when some diagnostic with this severity names exactly this path.
  bool mentions(const std::string& path, Severity severity) const noexcept;

  // One line per diagnostic: "error: <path>: <message>".
  std::string format(Severity at_least = Severity::kNote) const;

 private:
  std::vector<Diagnostic> items_;
};

const char* severity_name(Severity severity) noexcept;

// Throws zinf::Error carrying every error (and warnings) of `diagnostics`, if there is one.
void throw_if_errors(const Diagnostics& diagnostics, const std::string& what);

}  // namespace zinf::config
