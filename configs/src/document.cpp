#include "zinf/configs/document.hpp"

#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <sstream>

#include "suggest.hpp"
#include "zinf/common/error.hpp"
#include "zinf/configs/presets.hpp"

namespace zinf::config {

namespace {

constexpr int kMaxDepth = 64;                        // real configs nest 3-4 deep
constexpr std::uintmax_t kMaxFileBytes = 16u << 20;  // a config is a few KiB
constexpr int kMaxExtendsDepth = 8;

// nlohmann's messages start with "[json.exception.parse_error.101] "; keep only the part a user reads.
std::string clean_json_message(const std::string& what) {
  const auto pos = what.find("] ");
  return pos == std::string::npos ? what : what.substr(pos + 2);
}

bool is_blank(std::string_view text) {
  return std::all_of(text.begin(), text.end(), [](char c) { return std::isspace(static_cast<unsigned char>(c)); });
}

std::string display_key_path(const std::vector<std::string>& keys) {
  std::string out;
  for (const auto& k : keys) {
    if (!out.empty()) out += '.';
    out += k;
  }
  return out.empty() ? "<top level>" : out;
}

// Byte offset of the first invalid UTF-8 sequence, or npos. (The JSON lexer checks this itself;
// yaml-cpp does not, and JSON output of such a string would fail later.)
std::size_t invalid_utf8_offset(std::string_view text) {
  std::size_t i = 0;
  const auto* b = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  while (i < n) {
    const unsigned char c = b[i];
    std::size_t len = 0;
    std::uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07;
    } else {
      return i;
    }
    if (i + len > n) return i;
    for (std::size_t k = 1; k < len; ++k) {
      if ((b[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (b[i + k] & 0x3F);
    }
    // Overlong forms, surrogates and values past U+10FFFF are invalid.
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10FFFF ||
        (cp >= 0xD800 && cp <= 0xDFFF)) {
      return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

}  // namespace

Json parse_json(std::string_view text, const std::string& source) {
  if (is_blank(text)) throw Error("{}: the config is empty; expected a JSON object such as {{\"train_batch_size\": 8}}", source);

  // Duplicate keys are an error (Python's json keeps the last silently; we refuse to guess).
  // One frame per open object/array: the keys seen so far and the key that opened it.
  struct Frame {
    bool is_object;
    std::set<std::string> keys;
    std::string opened_by;
  };
  std::vector<Frame> frames;
  std::string last_key;
  auto key_path = [&]() {
    std::vector<std::string> keys;
    for (std::size_t i = 1; i < frames.size(); ++i) keys.push_back(frames[i].opened_by);
    return keys;
  };

  auto callback = [&](int depth, nlohmann::detail::parse_event_t event, Json& parsed) -> bool {
    using E = nlohmann::detail::parse_event_t;
    if (depth > kMaxDepth) throw Error("{}: nesting deeper than {} levels; a config is a few levels deep", source, kMaxDepth);
    switch (event) {
      case E::object_start:
      case E::array_start: {
        std::string opened = frames.empty() ? "" : (frames.back().is_object ? last_key : "[]");
        frames.push_back({event == E::object_start, {}, std::move(opened)});
        break;
      }
      case E::object_end:
      case E::array_end:
        if (!frames.empty()) frames.pop_back();
        break;
      case E::key: {
        last_key = parsed.get<std::string>();
        if (!frames.empty() && !frames.back().keys.insert(last_key).second) {
          auto keys = key_path();
          keys.push_back(last_key);
          throw Error("{}: duplicate key \"{}\"; each key may appear once per object (remove one of them)",
                      source, display_key_path(keys));
        }
        break;
      }
      case E::value:
        break;
    }
    return true;
  };

  Json json;
  try {
    json = Json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const Json::parse_error& e) {
    throw Error("{}: invalid JSON: {}", source, clean_json_message(e.what()));
  } catch (const Json::exception& e) {
    throw Error("{}: invalid JSON: {}", source, clean_json_message(e.what()));
  }
  if (!json.is_object()) {
    throw Error("{}: the top level must be a JSON object ({{...}}), found {}", source, json.type_name());
  }
  return json;
}

namespace {

// YAML 1.2 core schema for plain (unquoted) scalars, so "5e8", "true", "~" mean what they mean in
// JSON; quoted scalars (tag "!") stay strings.
Json yaml_scalar(const std::string& tag, const std::string& s) {
  if (tag == "!") return s;  // quoted or otherwise explicitly a string
  static const std::regex kInt(R"([-+]?[0-9]+)");
  static const std::regex kHex(R"(0x[0-9a-fA-F]+)");
  static const std::regex kFloat(R"([-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?)");
  if (s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL") return nullptr;
  if (s == "true" || s == "True" || s == "TRUE") return true;
  if (s == "false" || s == "False" || s == "FALSE") return false;
  if (std::regex_match(s, kInt)) {
    errno = 0;
    const long long v = std::strtoll(s.c_str(), nullptr, 10);
    if (errno == 0) return v;
    return std::strtod(s.c_str(), nullptr);  // too large for int64: keep the magnitude as a float
  }
  if (std::regex_match(s, kHex)) {
    errno = 0;
    const unsigned long long v = std::strtoull(s.c_str(), nullptr, 16);
    if (errno == 0) return v;
  }
  if (std::regex_match(s, kFloat)) return std::strtod(s.c_str(), nullptr);
  if (s == ".inf" || s == ".Inf" || s == ".INF" || s == "+.inf") return std::numeric_limits<double>::infinity();
  if (s == "-.inf" || s == "-.Inf" || s == "-.INF") return -std::numeric_limits<double>::infinity();
  if (s == ".nan" || s == ".NaN" || s == ".NAN") return std::numeric_limits<double>::quiet_NaN();
  return s;
}

// Builds JSON straight from yaml-cpp's parse events (no YAML::Node tree), with every limit
// checked as the events arrive:
//  - yaml-cpp 0.7 (Debian 12) never returns on some malformed input (a ',' where a token starts
//    outside [...] or {...}: ",", "[1],", "\"a\",\n\"b\": 1", ... found by the fuzzer); it emits
//    events forever. A document of n bytes yields at most a few events per byte, so a budget of
//    events turns that loop into an error.
//  - nesting depth, duplicate keys (with their line), non-scalar keys, several documents.
class JsonBuilder : public YAML::EventHandler {
 public:
  JsonBuilder(const std::string& source, std::string_view text)
      : source_(source),
        budget_(4 * text.size() + 64),
        expansion_budget_(std::max<std::size_t>(100'000, 16 * text.size())),
        has_document_markers_(has_markers(text)) {}

  void OnDocumentStart(const YAML::Mark& mark) override {
    spend();
    if (++documents_ == 1) return;
    if (has_document_markers_) {
      throw Error("{}: holds more than one YAML document; a config is one document (remove the '---' separators)",
                  source_);
    }
    // Without a '---', yaml-cpp only starts another document (and another, forever) after a
    // token it cannot place: in practice a ',' outside [...] or {...}.
    throw Error("{}: invalid YAML at line {}, column {}: unexpected text where the document should end (a ',' "
                "outside [...] or {{...}}?)",
                source_, mark.line + 1, mark.column + 1);
  }
  void OnDocumentEnd() override { spend(); }
  void OnNull(const YAML::Mark& mark, YAML::anchor_t anchor) override { add(mark, nullptr, anchor); }
  void OnAlias(const YAML::Mark& mark, YAML::anchor_t anchor) override {
    const auto it = anchors_.find(anchor);
    if (it == anchors_.end()) throw Error("{}: line {}: alias to an unknown anchor", source_, mark.line + 1);
    // Each alias copies its anchor's value: nested aliases grow exponentially (an "alias bomb"
    // of a few lines expands to gigabytes), so the values they make are counted and bounded.
    expanded_ += values_in(it->second);
    if (expanded_ > expansion_budget_) {
      throw Error("{}: line {}: aliases expand to more than {} values (aliases of aliases?); a config holds a few "
                  "hundred: write the values out, or alias only small blocks",
                  source_, mark.line + 1, expansion_budget_);
    }
    add(mark, it->second, 0);
  }
  void OnScalar(const YAML::Mark& mark, const std::string& tag, YAML::anchor_t anchor,
                const std::string& value) override {
    add(mark, yaml_scalar(tag, value), anchor, &value);
  }
  void OnSequenceStart(const YAML::Mark& mark, const std::string&, YAML::anchor_t anchor,
                       YAML::EmitterStyle::value) override {
    open(mark, Json::array(), anchor);
  }
  void OnSequenceEnd() override { close(); }
  void OnMapStart(const YAML::Mark& mark, const std::string&, YAML::anchor_t anchor,
                  YAML::EmitterStyle::value) override {
    open(mark, Json::object(), anchor);
  }
  void OnMapEnd() override { close(); }

  bool has_root() const { return root_.has_value(); }
  Json take_root() { return std::move(*root_); }

 private:
  struct Frame {
    Json value;
    YAML::anchor_t anchor = 0;
    bool expecting_key = true;  // maps alternate key, value
    std::string key;
    std::size_t key_line = 0;
  };

  // Scalars, sequences and mappings in `j`, itself included.
  static std::size_t values_in(const Json& j) {
    std::size_t n = 1;
    if (j.is_structured()) {
      for (const auto& v : j) n += values_in(v);
    }
    return n;
  }

  static bool has_markers(std::string_view text) {
    for (std::size_t pos = 0; pos < text.size();) {
      if (text.substr(pos, 3) == "---" || text.substr(pos, 3) == "...") return true;
      pos = text.find('\n', pos);
      if (pos == std::string_view::npos) break;
      ++pos;
    }
    return false;
  }

  void spend() {
    if (++events_ > budget_) {
      throw Error("{}: invalid YAML: the parser made no progress (a ',' outside [...] or {{...}} where a value "
                  "should start?)",
                  source_);
    }
  }

  std::string path(const std::string& last = {}) const {
    std::string out;
    for (const auto& f : stack_) {
      if (!f.value.is_object() || f.expecting_key) continue;
      if (!out.empty()) out += '.';
      out += f.key;
    }
    if (!last.empty()) { if (!out.empty()) out += "."; out += last; }
    return out.empty() ? "<top level>" : out;
  }

  void open(const YAML::Mark& mark, Json value, YAML::anchor_t anchor) {
    spend();
    if (!stack_.empty() && stack_.back().value.is_object() && stack_.back().expecting_key) {
      throw Error("{}: line {}: {}: a key must be a plain name, found a {}", source_, mark.line + 1, path(),
                  value.is_object() ? "mapping" : "sequence");
    }
    if (static_cast<int>(stack_.size()) >= kMaxDepth) {
      throw Error("{}: nesting deeper than {} levels; a config is a few levels deep", source_, kMaxDepth);
    }
    Frame frame;
    frame.value = std::move(value);
    frame.anchor = anchor;
    stack_.push_back(std::move(frame));
  }

  void close() {
    spend();
    ZINF_ASSERT(!stack_.empty(), "YAML end event without a start");
    Frame f = std::move(stack_.back());
    stack_.pop_back();
    if (f.anchor != 0) anchors_[f.anchor] = f.value;
    place(std::move(f.value), nullptr, 0);
  }

  void add(const YAML::Mark& mark, Json value, YAML::anchor_t anchor, const std::string* raw = nullptr) {
    spend();
    if (anchor != 0) anchors_[anchor] = value;
    place(std::move(value), raw, mark.line + 1);
  }

  // Puts a finished value into the open collection (or makes it the document root).
  void place(Json value, const std::string* raw, std::size_t line) {
    if (stack_.empty()) {
      root_ = std::move(value);
      return;
    }
    Frame& top = stack_.back();
    if (top.value.is_array()) {
      top.value.push_back(std::move(value));
      return;
    }
    if (top.expecting_key) {
      if (value.is_object() || value.is_array()) {
        throw Error("{}: line {}: {}: a key must be a plain name", source_, line, path());
      }
      top.key = raw != nullptr ? *raw : (value.is_string() ? value.get<std::string>() : value.dump());
      top.key_line = line;
      if (top.value.contains(top.key)) {
        throw Error("{}: duplicate key \"{}\" (line {}); each key may appear once per mapping (remove one of them)",
                    source_, path(top.key), line);
      }
      top.expecting_key = false;
      return;
    }
    top.value[top.key] = std::move(value);
    top.expecting_key = true;
  }

  const std::string& source_;
  std::size_t budget_;
  std::size_t expansion_budget_;  // values aliases may copy in all
  std::size_t expanded_ = 0;
  std::size_t events_ = 0;
  bool has_document_markers_;
  int documents_ = 0;
  std::vector<Frame> stack_;
  std::map<YAML::anchor_t, Json> anchors_;
  std::optional<Json> root_;
};

}  // namespace

Json parse_yaml(std::string_view text, const std::string& source) {
  if (is_blank(text)) throw Error("{}: the config is empty; expected a YAML mapping such as 'train_batch_size: 8'", source);
  if (text.find('\0') != std::string_view::npos) {
    throw Error("{}: the file contains NUL bytes; it is not a text config (binary file?)", source);
  }
  if (const auto bad = invalid_utf8_offset(text); bad != std::string_view::npos) {
    throw Error("{}: invalid UTF-8 at byte {}; a config must be UTF-8 text (binary file?)", source, bad);
  }
  JsonBuilder builder(source, text);
  try {
    std::istringstream in{std::string(text)};
    YAML::Parser parser(in);
    while (parser.HandleNextDocument(builder)) {
    }
  } catch (const YAML::Exception& e) {
    throw Error("{}: invalid YAML at line {}, column {}: {}", source, e.mark.line + 1, e.mark.column + 1, e.msg);
  }
  if (!builder.has_root()) throw Error("{}: the config is empty (only comments?)", source);
  Json root = builder.take_root();
  if (!root.is_object()) {
    throw Error("{}: the top level must be a mapping (key: value lines), found {}", source,
                root.is_array() ? "a sequence" : (root.is_null() ? "nothing" : "a single value"));
  }
  return root;
}

Json parse_document(std::string_view text, Format format, const std::string& source) {
  return format == Format::kJson ? parse_json(text, source) : parse_yaml(text, source);
}

Format detect_format(const std::string& path, std::string_view text) {
  const auto ext = std::filesystem::path(path).extension().string();
  if (ext == ".json") return Format::kJson;
  if (ext == ".yaml" || ext == ".yml") return Format::kYaml;
  for (char c : text) {
    if (std::isspace(static_cast<unsigned char>(c))) continue;
    return c == '{' ? Format::kJson : Format::kYaml;
  }
  return Format::kJson;
}

std::string read_text_file(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (ec || !fs::exists(status)) throw Error("cannot read '{}': no such file", path);
  if (fs::is_directory(status)) throw Error("cannot read '{}': it is a directory, expected a config file", path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read '{}': {}", path, errno_text(errno));
  std::string text;
  char buf[65536];
  while (in.read(buf, sizeof(buf)) || in.gcount() > 0) {
    text.append(buf, static_cast<std::size_t>(in.gcount()));
    if (text.size() > kMaxFileBytes) {
      throw Error("'{}' is larger than {} MiB; that is not a config file", path, kMaxFileBytes >> 20);
    }
  }
  if (in.bad()) throw Error("error while reading '{}': {}", path, errno_text(errno));
  return text;
}

void merge_patch(Json& target, const Json& patch) {
  if (!patch.is_object()) {
    target = patch;
    return;
  }
  if (!target.is_object()) target = Json::object();
  for (auto it = patch.begin(); it != patch.end(); ++it) {
    if (it.value().is_null()) {
      target.erase(it.key());
    } else {
      merge_patch(target[it.key()], it.value());
    }
  }
}

namespace {

struct Loaded {
  Json json;
  std::string source;
  std::string base_dir;
};

Loaded load_one(const std::string& ref, const std::string& base_dir) {
  namespace fs = std::filesystem;
  fs::path candidate(ref);
  if (candidate.is_relative() && !base_dir.empty()) candidate = fs::path(base_dir) / candidate;
  std::error_code ec;
  if (fs::exists(candidate, ec)) {
    const std::string path = candidate.string();
    const std::string text = read_text_file(path);
    return {parse_document(text, detect_format(path, text), path), path, candidate.parent_path().string()};
  }
  // Not a file: a built-in preset ("deepspeed_zero3" or "deepspeed_zero3.yaml").
  const auto [name, yaml] = parse_preset_ref(ref);
  if (auto preset = find_preset(name)) {
    const std::string source = "preset " + std::string(preset->name);
    return {yaml ? parse_yaml(preset->yaml_text, source) : parse_json(preset->json_text, source), source, ""};
  }
  if (ref.find('/') != std::string::npos || name != ref) {
    throw Error("cannot read '{}': no such file{}", candidate.string(), detail::did_you_mean(name, preset_names()));
  }
  throw Error("'{}' is neither a config file nor a built-in preset{}; `zinf config presets` lists the presets", ref,
              detail::did_you_mean(name, preset_names()));
}

}  // namespace

LoadedDocument resolve_extends(Json json, const std::string& source, const std::string& base_dir) {
  // Walk the chain from the leaf to its root, then merge root first so the leaf wins.
  std::vector<Loaded> chain{{std::move(json), source, base_dir}};
  std::set<std::string> seen{source};
  while (chain.back().json.contains("extends")) {
    const Json& ext = chain.back().json["extends"];
    if (!ext.is_string()) {
      throw Error("{}: extends: expected the name of a preset or a config file (a string), found {}",
                  chain.back().source, ext.type_name());
    }
    if (static_cast<int>(chain.size()) > kMaxExtendsDepth) {
      throw Error("{}: \"extends\" chain is deeper than {}; check for a loop", source, kMaxExtendsDepth);
    }
    Loaded next;
    try {
      next = load_one(ext.get<std::string>(), chain.back().base_dir);
    } catch (Error& e) {
      throw std::move(e).with_context(fmt::format("in \"extends\" of {}", chain.back().source));
    }
    if (!seen.insert(next.source).second) {
      throw Error("{}: \"extends\" forms a loop through {}", source, next.source);
    }
    chain.push_back(std::move(next));
  }
  LoadedDocument out{Json::object(), source, {}};
  for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
    it->json.erase("extends");
    merge_patch(out.json, it->json);
    out.chain.push_back(it->source);
  }
  return out;
}

LoadedDocument load_document(const std::string& file_or_preset) {
  Loaded first = load_one(file_or_preset, "");
  return resolve_extends(std::move(first.json), first.source, first.base_dir);
}

std::string to_json_text(const Json& json) { return json.dump(2) + "\n"; }

namespace {

void emit_yaml(YAML::Emitter& out, const Json& j) {
  switch (j.type()) {
    case Json::value_t::object:
      out << YAML::BeginMap;
      for (auto it = j.begin(); it != j.end(); ++it) {
        out << YAML::Key << it.key() << YAML::Value;
        emit_yaml(out, it.value());
      }
      out << YAML::EndMap;
      break;
    case Json::value_t::array:
      out << YAML::Flow << YAML::BeginSeq;
      for (const auto& v : j) emit_yaml(out, v);
      out << YAML::EndSeq;
      break;
    case Json::value_t::string:
      out << YAML::DoubleQuoted << j.get<std::string>();
      break;
    case Json::value_t::null:
      out << YAML::Null;
      break;
    default:
      out << j.dump();  // numbers and booleans print the same in both languages
  }
}

}  // namespace

std::string to_yaml_text(const Json& json) {
  YAML::Emitter out;
  emit_yaml(out, json);
  return std::string(out.c_str()) + "\n";
}

}  // namespace zinf::config
