// `zinf config check | resolve | presets | show`.
#include <fmt/format.h>

#include <cstdio>
#include <iostream>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"
#include "zinf/configs/document.hpp"
#include "zinf/configs/parse.hpp"
#include "zinf/configs/presets.hpp"
#include "zinf/configs/summary.hpp"

namespace zinf::tools {

namespace {

using config::Json;
using config::Severity;

struct CheckOptions {
  std::string file;
  config::TrainingArgs args;
  bool json = false;
  bool strict = false;
};

struct ResolveOptions {
  std::string file;
  config::TrainingArgs args;
  std::string output;
  bool yaml = false;
  bool full = false;
};

struct ShowOptions {
  std::string name;
  bool yaml = false;
};

Json diagnostics_json(const config::Diagnostics& d, Severity s) {
  Json out = Json::array();
  for (const auto& item : d.all()) {
    if (item.severity == s) out.push_back({{"path", item.path}, {"message", item.message}});
  }
  return out;
}

int run_check(const CheckOptions& o) {
  const config::LoadedDocument doc = config::load_document(o.file);
  // Only given arguments fill "auto" here; the rest stays "auto" and is shown as such.
  const config::Resolution res = config::resolve_auto(doc.json, o.args, /*use_defaults=*/false);
  config::ParseOptions popts;
  popts.world_size = o.args.world_size.value_or(1);
  popts.allow_auto = true;
  config::ParseResult parsed = config::parse_config(res.resolved, popts);
  for (std::size_t i = 0; i < res.mismatches.size(); ++i) {
    parsed.diagnostics.error(res.mismatch_paths[i], "contradicts a training argument: " + res.mismatches[i].substr(2));
  }
  const std::size_t errors = parsed.diagnostics.count(Severity::kError);
  const std::size_t warnings = parsed.diagnostics.count(Severity::kWarning);
  const bool ok = errors == 0 && !(o.strict && warnings > 0);

  if (o.json) {
    Json out;
    out["file"] = doc.source;
    out["extends"] = doc.chain;
    out["world_size"] = popts.world_size;
    out["ok"] = ok;
    out["errors"] = diagnostics_json(parsed.diagnostics, Severity::kError);
    out["warnings"] = diagnostics_json(parsed.diagnostics, Severity::kWarning);
    out["notes"] = diagnostics_json(parsed.diagnostics, Severity::kNote);
    out["auto"] = parsed.config.auto_keys;
    if (errors == 0) out["config"] = config::to_json(parsed.config);
    std::cout << out.dump(2) << "\n";
    return ok ? kExitOk : kExitRuntimeError;
  }

  std::cout << fmt::format("config   {}", doc.source);
  if (doc.chain.size() > 1) std::cout << fmt::format("  (extends {})", fmt::join(doc.chain.begin(), doc.chain.end() - 1, " -> "));
  std::cout << fmt::format("\nworld    {} rank(s)\n", popts.world_size);
  if (errors == 0) std::cout << config::summarize(parsed.config);
  if (!parsed.config.auto_keys.empty() && errors == 0) {
    std::cout << fmt::format("\n\"auto\" ({}): settled at launch from the training arguments (see `zinf config "
                             "resolve`):\n  {}\n",
                             parsed.config.auto_keys.size(), fmt::join(parsed.config.auto_keys, ", "));
  }
  const std::string diag = parsed.diagnostics.format();
  if (!diag.empty()) std::cout << "\n" << diag;
  if (errors > 0) {
    std::cout << fmt::format("\n{} error(s), {} warning(s): the config is not usable as it is\n", errors, warnings);
  } else if (!ok) {
    std::cout << fmt::format("\n{} warning(s) with --strict: failing\n", warnings);
  } else {
    std::cout << fmt::format("\nOK ({} warning(s))\n", warnings);
  }
  return ok ? kExitOk : kExitRuntimeError;
}

int run_resolve(const ResolveOptions& o) {
  const config::LoadedDocument doc = config::load_document(o.file);
  const ResolvedConfig rc = resolve_and_parse(doc, o.args);
  const config::Resolution& res = rc.resolution;
  const config::ParseResult& parsed = rc.parsed;

  for (const auto& f : res.filled) std::cerr << "filled    " << f << "\n";
  for (const auto& f : res.defaulted) std::cerr << "default   " << f << "\n";
  const std::string warnings = parsed.diagnostics.format(Severity::kWarning);
  if (!warnings.empty()) std::cerr << warnings;

  const Json& out_json = o.full ? config::to_json(parsed.config) : res.resolved;
  const std::string text = o.yaml ? config::to_yaml_text(out_json) : config::to_json_text(out_json);
  if (o.output == "-") {
    std::cout << text;
  } else {
    write_file_atomic(o.output, text);
    std::cerr << fmt::format("wrote {}\n", o.output);
  }
  return kExitOk;
}

int run_presets(bool json) {
  if (json) {
    Json out = Json::array();
    for (const auto& p : config::presets()) {
      out.push_back({{"name", std::string(p.name)}, {"description", std::string(p.description)}});
    }
    std::cout << out.dump(2) << "\n";
    return kExitOk;
  }
  std::size_t width = 0;
  for (const auto& p : config::presets()) width = std::max(width, p.name.size());
  for (const auto& p : config::presets()) std::cout << fmt::format("{:<{}}  {}\n", p.name, width, p.description);
  std::cout << "\nUse one with `--deepspeed NAME`, print it with `zinf config show NAME`, or build on it with "
               "\"extends\": \"NAME\" in your own config.\n";
  return kExitOk;
}

int run_show(const ShowOptions& o) {
  const auto [name, yaml_file] = config::parse_preset_ref(o.name);
  const bool yaml = o.yaml || yaml_file;
  const auto preset = config::find_preset(name);
  if (!preset) {
    throw Error("no preset named '{}'; `zinf config presets` lists them: {}", o.name,
                fmt::join(config::preset_names(), ", "));
  }
  std::cout << (yaml ? preset->yaml_text : preset->json_text);
  return kExitOk;
}

}  // namespace

void add_config_commands(CLI::App& app, Action& action) {
  auto* config_cmd = app.add_subcommand("config", "Check, resolve and list DeepSpeed-format configs");
  config_cmd->require_subcommand(1);

  auto check = std::make_shared<CheckOptions>();
  auto* c = config_cmd->add_subcommand("check", "Validate a config (file or preset name) and summarise it");
  c->add_option("FILE", check->file, "DeepSpeed config (.json/.yaml) or preset name")->required();
  add_training_args(*c, check->args);
  c->add_flag("--json", check->json, "print one JSON object (diagnostics and the full config)");
  c->add_flag("--strict", check->strict, "treat warnings as errors");
  c->callback([check, &action] { action = [check] { return run_check(*check); }; });

  auto resolve = std::make_shared<ResolveOptions>();
  auto* r = config_cmd->add_subcommand("resolve", "Fill \"auto\" values from training arguments and write the result");
  r->add_option("FILE", resolve->file, "DeepSpeed config (.json/.yaml) or preset name")->required();
  add_training_args(*r, resolve->args);
  r->add_option("-o,--output", resolve->output, "where to write the resolved config ('-' = stdout)")->required();
  r->add_flag("--yaml", resolve->yaml, "write YAML instead of JSON");
  r->add_flag("--full", resolve->full, "write every key with its value, defaults included");
  r->callback([resolve, &action] { action = [resolve] { return run_resolve(*resolve); }; });

  auto presets_json = std::make_shared<bool>(false);
  auto* p = config_cmd->add_subcommand("presets", "List the built-in presets");
  p->add_flag("--json", *presets_json, "print a JSON list");
  p->callback([presets_json, &action] { action = [presets_json] { return run_presets(*presets_json); }; });

  auto show = std::make_shared<ShowOptions>();
  auto* s = config_cmd->add_subcommand("show", "Print a built-in preset");
  s->add_option("PRESET", show->name, "preset name (see `zinf config presets`)")->required();
  s->add_flag("--yaml", show->yaml, "print the YAML form");
  s->callback([show, &action] { action = [show] { return run_show(*show); }; });
}

}  // namespace zinf::tools
