// Reading config documents: JSON/YAML syntax, duplicate keys, bad files, presets and "extends".
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "test_util.hpp"
#include "zinf/common/error.hpp"
#include "zinf/configs/document.hpp"

namespace zinf::config {
namespace {

using testing::J;

const std::string kData = testing::data_dir();

TEST(JsonDocument, ParsesObjectAndKeepsKeyOrder) {
  const Json j = J(R"({"b": 1, "a": {"z": true, "y": [1, 2]}})");
  EXPECT_EQ(j.dump(), R"({"b":1,"a":{"z":true,"y":[1,2]}})");
}

TEST(JsonDocument, DuplicateTopLevelKeyIsAnError) {
  EXPECT_ZINF_ERROR(J(R"({"train_batch_size": 8, "train_batch_size": 16})"), "duplicate key \"train_batch_size\"");
}

TEST(JsonDocument, DuplicateNestedKeyNamesItsPath) {
  EXPECT_ZINF_ERROR(J(R"({"zero_optimization": {"offload_param": {"device": "cpu", "device": "nvme"}}})"),
                    "zero_optimization.offload_param.device");
}

TEST(JsonDocument, SameKeyInSiblingObjectsIsFine) {
  const Json j = J(R"({"fp16": {"enabled": false}, "bf16": {"enabled": true}, "l": [{"a": 1}, {"a": 2}]})");
  EXPECT_TRUE(j["bf16"]["enabled"].get<bool>());
}

TEST(JsonDocument, SyntaxErrorGivesLineAndColumn) {
  EXPECT_ZINF_ERROR(J("{\n  \"a\": 1,\n  \"b\": ]\n}"), "line 3, column");
}

TEST(JsonDocument, EmptyAndBlankAreErrors) {
  EXPECT_ZINF_ERROR(J(""), "empty");
  EXPECT_ZINF_ERROR(J("  \n\t "), "empty");
}

TEST(JsonDocument, TopLevelMustBeObject) {
  EXPECT_ZINF_ERROR(J("[1, 2]"), "must be a JSON object");
  EXPECT_ZINF_ERROR(J("42"), "must be a JSON object");
  EXPECT_ZINF_ERROR(J("\"auto\""), "must be a JSON object");
}

TEST(JsonDocument, TruncatedAndGarbageAreErrors) {
  EXPECT_ZINF_ERROR(J(R"({"train_batch_size": 8, "fp16": {"enabled": tru)"), "invalid JSON");
  EXPECT_ZINF_ERROR(parse_json(std::string("\x00\x01\xff\xfe", 4), "bin"), "invalid JSON");
  EXPECT_ZINF_ERROR(J("{\"a\": \"\xff\xfe\"}"), "invalid JSON");  // not UTF-8
  EXPECT_ZINF_ERROR(J("{\"a\": 1} trailing"), "invalid JSON");
  EXPECT_ZINF_ERROR(J("{\"a\": NaN}"), "invalid JSON");
  EXPECT_ZINF_ERROR(J("{\"a\": 1, // comment\n}"), "invalid JSON");
}

TEST(JsonDocument, DeepNestingIsRefused) {
  std::string deep;
  for (int i = 0; i < 200; ++i) deep += "{\"a\": ";
  deep += "1";
  for (int i = 0; i < 200; ++i) deep += "}";
  EXPECT_ZINF_ERROR(J(deep.c_str()), "nesting deeper than");
  std::string arrays = "{\"a\": " + std::string(100000, '[');
  EXPECT_ZINF_ERROR(J(arrays.c_str()), "nesting deeper than");
}

TEST(YamlDocument, PlainScalarsFollowTheCoreSchema) {
  const Json y = parse_yaml(
      "a: 5e8\nb: 1.5\nc: 12\nd: true\ne: False\nf: ~\ng: auto\nh: \"12\"\ni: 'true'\nj: [1, 2.5]\nk: -3\nl: .inf\nm: "
      "0x10\nn: 2.0e-4\n",
      "y");
  EXPECT_TRUE(y["a"].is_number_float());
  EXPECT_EQ(y["a"].get<double>(), 5e8);
  EXPECT_EQ(y["b"].get<double>(), 1.5);
  EXPECT_TRUE(y["c"].is_number_integer());
  EXPECT_EQ(y["c"].get<int>(), 12);
  EXPECT_EQ(y["d"], true);
  EXPECT_EQ(y["e"], false);
  EXPECT_TRUE(y["f"].is_null());
  EXPECT_EQ(y["g"], "auto");
  EXPECT_EQ(y["h"], "12");      // quoted stays a string
  EXPECT_EQ(y["i"], "true");    // quoted stays a string
  EXPECT_EQ(y["j"][1].get<double>(), 2.5);
  EXPECT_EQ(y["k"].get<int>(), -3);
  EXPECT_TRUE(std::isinf(y["l"].get<double>()));
  EXPECT_EQ(y["m"].get<int>(), 16);
  EXPECT_DOUBLE_EQ(y["n"].get<double>(), 2e-4);
}

TEST(YamlDocument, CommasAfterQuotesInsideFlowAndBlockTextAreFine) {
  const Json y = parse_yaml("a: [\"x\", 'y']\nb: {\"k\": \"v\", 'k2': 1}\nc: it's, fine\nd: |\n  \"q\", text\ne: 1\n", "y");
  EXPECT_EQ(y["a"][1], "y");
  EXPECT_EQ(y["b"]["k2"], 1);
  EXPECT_EQ(y["c"], "it's, fine");
  EXPECT_EQ(y["d"], "\"q\", text\n");
  EXPECT_EQ(y["e"], 1);
}

TEST(YamlDocument, AnchorsAndAliasesAreExpanded) {
  const Json y = parse_yaml("base: &off {device: cpu, pin_memory: true}\nopt: *off\nlist: [&n 3, *n]\n", "y");
  EXPECT_EQ(y["opt"], y["base"]);
  EXPECT_EQ(y["opt"]["device"], "cpu");
  EXPECT_EQ(y["list"][1], 3);
}

// An alias bomb (each level aliases the one before ten times): a few hundred bytes that would
// expand to 10^9 values is refused while it expands, naming the line.
TEST(YamlDocument, AnAliasBombIsRefusedBeforeItExpands) {
  std::string y = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n";
  for (int i = 1; i <= 9; ++i) {
    y += fmt::format("a{}: &a{} [", i, i);
    for (int k = 0; k < 10; ++k) y += fmt::format("{}*a{}", k > 0 ? ", " : "", i - 1);
    y += "]\n";
  }
  EXPECT_ZINF_ERROR(parse_yaml(y, "bomb.yaml"), "aliases expand to more than");
  // Aliases of ordinary size still work.
  EXPECT_EQ(parse_yaml("a: &a [1, 2]\nb: [*a, *a]\n", "y")["b"][1][1], 2);
}

TEST(YamlDocument, DuplicateKeyIsAnErrorWithLine) {
  EXPECT_ZINF_ERROR(parse_yaml("zero_optimization:\n  stage: 2\n  stage: 3\n", "y"),
                    "duplicate key \"zero_optimization.stage\" (line 3)");
}

TEST(YamlDocument, BadDocumentsAreErrors) {
  EXPECT_ZINF_ERROR(parse_yaml("", "y"), "empty");
  EXPECT_ZINF_ERROR(parse_yaml("# only a comment\n", "y"), "empty");
  EXPECT_ZINF_ERROR(parse_yaml("- 1\n- 2\n", "y"), "must be a mapping");
  EXPECT_ZINF_ERROR(parse_yaml("just a string", "y"), "must be a mapping");
  EXPECT_ZINF_ERROR(parse_yaml("a: 1\n---\nb: 2\n", "y"), "more than one YAML document");
  EXPECT_ZINF_ERROR(parse_yaml("a: [1, 2\n", "y"), "invalid YAML at line");
  EXPECT_ZINF_ERROR(parse_yaml(std::string("a: \0b", 5), "y"), "NUL bytes");
  EXPECT_ZINF_ERROR(parse_yaml("? [a, b]\n: 1\n", "y"), "a key must be a plain name");
  EXPECT_ZINF_ERROR(parse_yaml("a: \"\x93\"\n", "y"), "invalid UTF-8 at byte 4");
  // yaml-cpp 0.7 never returns on these (fuzzer finding); zinf refuses them first.
  EXPECT_ZINF_ERROR(parse_yaml("\"a\",\n\"b\": 1\n", "y"), "invalid YAML at line 1, column 4: unexpected text where the document should end");
  EXPECT_ZINF_ERROR(parse_yaml("x:\n  - 'it''s' ,\n  - 2\n", "y"), "invalid YAML");
  for (const char* text : {",", "[1],", "&x ,", "!t ,", "a: {b: 1}, c", "a: 1\n,\n", "&a,b x", "a: *b,c", "\"\"\"\"\",", "'a''b'',", "[1]]],"}) {
    EXPECT_ZINF_ERROR(parse_yaml(text, "y"), "invalid YAML");
  }
  EXPECT_ZINF_ERROR(parse_yaml("a: \xc0\xaf\n", "y"), "invalid UTF-8");  // overlong '/'
  EXPECT_EQ(parse_yaml("a: \"h\xc3\xa9\"\n", "y")["a"], "h\xc3\xa9");   // valid two-byte sequence
}

TEST(Format, DetectedByExtensionThenContent) {
  EXPECT_EQ(detect_format("x.json", "a: 1"), Format::kJson);
  EXPECT_EQ(detect_format("x.yaml", "{}"), Format::kYaml);
  EXPECT_EQ(detect_format("x.yml", "{}"), Format::kYaml);
  EXPECT_EQ(detect_format("x.conf", "  {\"a\": 1}"), Format::kJson);
  EXPECT_EQ(detect_format("x.conf", "a: 1"), Format::kYaml);
}

TEST(Files, MissingFileAndDirectoryAreClearErrors) {
  EXPECT_ZINF_ERROR(read_text_file(kData + "/no_such_file.json"), "no such file");
  EXPECT_ZINF_ERROR(read_text_file(kData), "is a directory");
  EXPECT_ZINF_ERROR(load_document(kData + "/invalid/empty.json"), "empty");
  EXPECT_ZINF_ERROR(load_document(kData + "/invalid/whitespace.json"), "empty");
  EXPECT_ZINF_ERROR(load_document(kData + "/invalid/binary.json"), "invalid JSON");
  EXPECT_ZINF_ERROR(load_document(kData + "/invalid/truncated.json"), "invalid JSON");
  EXPECT_ZINF_ERROR(load_document(kData + "/invalid/duplicate_key.json"), "zero_optimization.stage");
}

TEST(MergePatch, FollowsRfc7396) {
  Json target = J(R"({"a": {"b": 1, "c": 2}, "d": [1, 2], "e": 1})");
  merge_patch(target, J(R"({"a": {"b": 5, "c": null, "n": {"x": 1}}, "d": [3], "e": null, "f": "new"})"));
  EXPECT_EQ(target, J(R"({"a": {"b": 5, "n": {"x": 1}}, "d": [3], "f": "new"})"));
}

TEST(Extends, PresetByNameWithOverrides) {
  const auto doc = load_document(kData + "/user_extends_preset.json");
  ASSERT_EQ(doc.chain.size(), 2u);
  EXPECT_EQ(doc.chain[0], "preset deepspeed_zero3_nvme");
  const Json& z = doc.json["zero_optimization"];
  EXPECT_EQ(z["offload_optimizer"]["nvme_path"], "/mnt/nvme0");
  EXPECT_EQ(z["offload_optimizer"]["device"], "nvme");  // kept from the preset
  EXPECT_EQ(z["offload_param"]["buffer_count"], 6);
  EXPECT_EQ(z["stage"], 3);
  EXPECT_FALSE(doc.json.contains("scheduler"));  // null removed it
  EXPECT_FALSE(doc.json.contains("extends"));
  EXPECT_EQ(doc.json["steps_per_print"], 1);
}

TEST(Extends, ChainsThroughFilesRelativeToTheReferencingFile) {
  const auto doc = load_document(kData + "/user_extends_file.yaml");
  ASSERT_EQ(doc.chain.size(), 3u);
  EXPECT_EQ(doc.json["steps_per_print"], 7);
  EXPECT_EQ(doc.json["zero_optimization"]["offload_param"]["nvme_path"], "/mnt/nvme0");
}

TEST(Extends, LoopsAndBadReferencesAreErrors) {
  const auto dir = std::filesystem::temp_directory_path() / "zinf_extends_test";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "a.json") << R"({"extends": "b.json"})";
  std::ofstream(dir / "b.json") << R"({"extends": "a.json"})";
  EXPECT_ZINF_ERROR(load_document((dir / "a.json").string()), "loop");
  std::ofstream(dir / "c.json") << R"({"extends": 3})";
  EXPECT_ZINF_ERROR(load_document((dir / "c.json").string()), "expected the name of a preset");
  std::ofstream(dir / "d.json") << R"({"extends": "deepspeed_zero3_cpuofload"})";
  EXPECT_ZINF_ERROR(load_document((dir / "d.json").string()), "did you mean \"deepspeed_zero3_cpuoffload\"");
  std::filesystem::remove_all(dir);
}

TEST(Presets, LoadByNameInBothForms) {
  const auto json_doc = load_document("deepspeed_zero2_offload");
  const auto yaml_doc = load_document("deepspeed_zero2_offload.yaml");
  EXPECT_EQ(json_doc.json, yaml_doc.json);
  EXPECT_ZINF_ERROR(load_document("deepspeed_zero9"), "neither a config file nor a built-in preset");
}

TEST(Serialise, YamlRoundTripsThroughTheParser) {
  const Json j = J(R"({"a": 5e8, "b": "auto", "c": [0.9, 0.999], "d": {"e": null, "f": false, "g": "x: y"}})");
  EXPECT_EQ(parse_yaml(to_yaml_text(j), "rt"), j);
  EXPECT_EQ(parse_json(to_json_text(j), "rt"), j);
}

}  // namespace
}  // namespace zinf::config
