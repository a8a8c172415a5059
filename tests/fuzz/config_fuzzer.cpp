// libFuzzer harness for the config reader: JSON and YAML documents, then the typed parser, "auto"
// resolution and serialisation. Any input must end in a zinf::Error or a result; never a crash,
// a hang or a sanitizer report. Build and run: scripts/fuzz.sh (docs/config.md).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "zinf/common/error.hpp"
#include "zinf/configs/document.hpp"
#include "zinf/configs/parse.hpp"
#include "zinf/configs/resolve.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  // The first byte picks the language and the world size, the rest is the document.
  const std::uint8_t selector = data[0];
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  const auto format = (selector & 1) ? zinf::config::Format::kYaml : zinf::config::Format::kJson;
  try {
    const auto json = zinf::config::parse_document(text, format, "fuzz");
    zinf::config::TrainingArgs args;
    if (selector & 2) {
      args.micro_batch = 2;
      args.lr = 1e-4;
      args.total_steps = 10;
      args.hidden_size = 64;
    }
    const auto resolved = zinf::config::resolve_auto(json, args, (selector & 4) != 0);
    zinf::config::ParseOptions options;
    options.world_size = 1 + (selector >> 4);
    options.allow_auto = (selector & 8) != 0;
    const auto parsed = zinf::config::parse_config(resolved.resolved, options);
    (void)parsed.diagnostics.format();
    if (parsed.ok()) (void)zinf::config::to_json_text(zinf::config::to_json(parsed.config));
  } catch (const zinf::Error&) {
    // Expected for bad input.
  }
  return 0;
}
