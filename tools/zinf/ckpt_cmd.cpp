// `zinf ckpt`: checkpoint tools (export as a Hugging Face model, merge LoRA adapters).
#include <filesystem>
#include <iostream>
#include <optional>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/runtime/checkpoint.hpp"
#include "zinf/runtime/lora.hpp"
#include "zinf/runtime/model_config.hpp"

namespace zinf::tools {
namespace {

namespace fs = std::filesystem;

struct ExportOptions {
  std::string checkpoint;
  std::string to;
  std::string dtype = "bf16";
  std::string max_shard = "5G";
};

int run_export(const ExportOptions& o) {
  std::error_code ec;
  // A run's output directory means its latest checkpoint.
  const std::string ck = fs::exists(fs::path(o.checkpoint) / "checkpoints" / "latest", ec)
                             ? runtime::resolve_checkpoint(o.checkpoint, "latest")
                             : o.checkpoint;
  if (!fs::is_directory(ck, ec)) throw Error("no checkpoint directory '{}'", ck);
  const auto files = runtime::export_checkpoint(ck, o.to, o.dtype == "fp32" ? kernels::cpu::DType::kF32 : kernels::cpu::DType::kBF16,
                                                parse_size(o.max_shard, "--max-shard-size"));
  std::cout << fmt::format("wrote {} from {}: {}\n", o.to, ck, fmt::join(files, ", "));
  return kExitOk;
}

struct MergeOptions {
  std::string base, adapter, to, model;
  std::string dtype = "auto";
  std::string max_shard = "5G";
};

int run_merge(const MergeOptions& o) {
  std::error_code ec;
  const std::string adapter = fs::exists(fs::path(o.adapter) / "checkpoints" / "latest", ec)
                                  ? runtime::resolve_checkpoint(o.adapter, "latest")
                                  : o.adapter;
  std::string config = o.model;
  if (config.empty()) {
    const fs::path dir = fs::is_directory(o.base, ec) ? fs::path(o.base) : fs::path(o.base).parent_path();
    config = (dir / "config.json").string();
    if (!fs::exists(config, ec)) {
      throw Error("no config.json next to the base '{}': pass the base model's config with --model", o.base);
    }
  } else if (fs::is_directory(config, ec)) {
    config = (fs::path(config) / "config.json").string();
  }
  const runtime::ModelConfig model = runtime::load_model_config(config);
  const runtime::LoadedAdapter a = runtime::load_adapter(adapter, model);
  std::optional<kernels::cpu::DType> dtype;
  if (o.dtype == "bf16") dtype = kernels::cpu::DType::kBF16;
  if (o.dtype == "fp32") dtype = kernels::cpu::DType::kF32;
  const auto files = runtime::merge_adapter(o.base, model, a, o.to, dtype, parse_size(o.max_shard, "--max-shard-size"));
  std::cout << fmt::format("merged {} ({} adapted linears, {}) into {}: wrote {} in {}\n", adapter,
                           a.layout.adapters.size(), a.layout.config.describe(), o.base, fmt::join(files, ", "), o.to);
  return kExitOk;
}

}  // namespace

void add_ckpt_commands(CLI::App& app, Action& action) {
  CLI::App* ckpt = app.add_subcommand("ckpt", "checkpoint tools");
  ckpt->require_subcommand(1);
  auto e = std::make_shared<ExportOptions>();
  CLI::App* ex = ckpt->add_subcommand("export", "a checkpoint's weights as a Hugging Face model (config.json + safetensors)");
  ex->add_option("checkpoint", e->checkpoint, "checkpoint directory (step-N), or a run's --output-dir for its latest")
      ->required();
  ex->add_option("--to", e->to, "directory to write (created; an earlier export there is replaced atomically)")->required();
  ex->add_option("--dtype", e->dtype, "bf16 (default) or fp32")->check(CLI::IsMember({"bf16", "fp32"}));
  ex->add_option("--max-shard-size", e->max_shard, "shard above this size (default 5G; 0 = one file)");
  ex->callback([e, &action] { action = [e] { return run_export(*e); }; });

  auto mo = std::make_shared<MergeOptions>();
  CLI::App* mg = ckpt->add_subcommand("merge", "LoRA adapters folded into their base: a full Hugging Face model");
  mg->add_option("--base", mo->base, "the base model: a directory with config.json and safetensors, or a .safetensors "
                                     "file or index")
      ->required();
  mg->add_option("--adapter", mo->adapter, "a PEFT adapter directory, a LoRA checkpoint (step-N), or a LoRA run's "
                                           "--output-dir for its latest checkpoint")
      ->required();
  mg->add_option("--to", mo->to, "directory to write the merged model into")->required();
  mg->add_option("--model", mo->model, "the base's config.json when --base is not a directory holding one");
  mg->add_option("--dtype", mo->dtype, "auto (each tensor as the base stores it; default), bf16 or fp32")
      ->check(CLI::IsMember({"auto", "bf16", "fp32"}));
  mg->add_option("--max-shard-size", mo->max_shard, "shard above this size (default 5G; 0 = one file)");
  mg->callback([mo, &action] { action = [mo] { return run_merge(*mo); }; });

}

}  // namespace zinf::tools
