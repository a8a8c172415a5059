#pragma once
// Reading a config document: JSON (duplicate keys are an error) or YAML with the same schema,
// presets referenced by name, and `"extends"` chains merged key by key.

#include <nlohmann/json.hpp>

#include <string>
#include <string_view>
#include <vector>

namespace zinf::config {

using Json = nlohmann::ordered_json;  // keeps the user's key order when a config is written back

enum class Format { kJson, kYaml };

// Parses text; `source` names it in errors (a file path or "preset foo"). Throws zinf::Error with
// the line and column of a syntax error, the path of a duplicate key, or the reason a document is
// empty, too deep or not an object at the top.
Json parse_json(std::string_view text, const std::string& source);
Json parse_yaml(std::string_view text, const std::string& source);
Json parse_document(std::string_view text, Format format, const std::string& source);

// JSON for *.json, YAML for *.yaml/*.yml, else by content (a leading '{' means JSON).
Format detect_format(const std::string& path, std::string_view text);

// Reads a whole file (bounded size); errors name the path and the OS reason.
std::string read_text_file(const std::string& path);

// RFC 7396 merge: objects merge recursively, any other value in `patch` replaces, null deletes.
void merge_patch(Json& target, const Json& patch);

struct LoadedDocument {
  Json json;                        // the merged document, "extends" removed
  std::string source;               // the file path or "preset <name>"
  std::vector<std::string> chain;   // what was merged, base first
};

// Loads a config file or a built-in preset by name and applies its "extends" chain (a preset name
// or a path relative to the file that names it). Cycles and chains deeper than 8 are errors.
LoadedDocument load_document(const std::string& file_or_preset);

// Same, for a document already in memory.
LoadedDocument resolve_extends(Json json, const std::string& source, const std::string& base_dir);

// Serialises for `config resolve`/`config show` (2-space JSON or block YAML).
std::string to_json_text(const Json& json);
std::string to_yaml_text(const Json& json);

}  // namespace zinf::config
