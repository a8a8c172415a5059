#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/configs/diagnostics.hpp"

namespace zinf::tools {

CLI::Validator whole_number(bool allow_negative) {
  return CLI::Validator(
      [allow_negative](std::string& s) -> std::string {
        if (s.empty() || (s[0] == '-' && !allow_negative)) return "must be a whole number of at least 0, not '" + s + "'";
        errno = 0;
        char* end = nullptr;
        if (s[0] == '-') {
          (void)std::strtoll(s.c_str(), &end, 10);
        } else {
          (void)std::strtoull(s.c_str(), &end, 10);
        }
        if (end == s.c_str() || *end != '\0') return "not a number: '" + s + "' (a whole number is expected)";
        if (errno == ERANGE) return "'" + s + "' is out of range (at most 9223372036854775807)";
        if (s[0] != '-' && std::strtoull(s.c_str(), nullptr, 10) > static_cast<unsigned long long>(
                                                                      std::numeric_limits<std::int64_t>::max())) {
          return "'" + s + "' is out of range (at most 9223372036854775807)";
        }
        return {};
      },
      "INT");
}

CLI::Validator finite_number() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(s.c_str(), &end);
        if (end == s.c_str() || *end != '\0') return "not a number: '" + s + "'";
        if (!std::isfinite(v)) return "'" + s + "' is not a finite number";
        return {};
      },
      "NUMBER");
}

void add_training_args(CLI::App& cmd, config::TrainingArgs& a) {
  const auto* group = "Training arguments (fill \"auto\" values; a config value that contradicts one is an error)";
  auto positive = CLI::Range(std::int64_t{1}, std::numeric_limits<std::int64_t>::max());
  auto beta = CLI::Validator(
      [](std::string& s) {
        double v = 0.0;
        try {
          v = std::stod(s);
        } catch (const std::exception&) {
          return std::string("not a number: ") + s;
        }
        return (v >= 0.0 && v < 1.0) ? std::string() : std::string("must be in [0, 1)");
      },
      "[0,1)");
  cmd.add_option_function<std::int64_t>("--micro-batch", [&a](const std::int64_t& v) { a.micro_batch = v; },
                                        "micro-batch size per GPU (train_micro_batch_size_per_gpu)")
      ->check(whole_number())->check(positive)->group(group);
  cmd.add_option_function<std::int64_t>("--grad-accum", [&a](const std::int64_t& v) { a.grad_accum = v; },
                                        "gradient accumulation steps")
      ->check(whole_number())->check(positive)->group(group);
  cmd.add_option_function<std::int64_t>("--world-size", [&a](const std::int64_t& v) { a.world_size = v; },
                                        "data-parallel ranks (default 1)")
      ->check(whole_number())->check(positive)->group(group);
  cmd.add_option_function<double>("--lr", [&a](const double& v) { a.lr = v; }, "learning rate")
      ->check(finite_number())->check(CLI::NonNegativeNumber)->group(group);
  cmd.add_option_function<double>("--beta1", [&a](const double& v) { a.beta1 = v; }, "Adam beta1")
      ->check(beta)->group(group);
  cmd.add_option_function<double>("--beta2", [&a](const double& v) { a.beta2 = v; }, "Adam beta2")
      ->check(beta)->group(group);
  cmd.add_option_function<double>("--eps", [&a](const double& v) { a.eps = v; }, "Adam epsilon")
      ->check(finite_number())->check(CLI::NonNegativeNumber)->group(group);
  cmd.add_option_function<double>("--weight-decay", [&a](const double& v) { a.weight_decay = v; }, "weight decay")
      ->check(finite_number())->check(CLI::NonNegativeNumber)->group(group);
  cmd.add_option_function<double>("--max-grad-norm", [&a](const double& v) { a.max_grad_norm = v; },
                                  "gradient clipping norm (gradient_clipping; 0 = off)")
      ->check(finite_number())->check(CLI::NonNegativeNumber)->group(group);
  cmd.add_option_function<std::int64_t>("--warmup-steps", [&a](const std::int64_t& v) { a.warmup_steps = v; },
                                        "scheduler warmup steps")
      ->check(whole_number())->check(CLI::NonNegativeNumber)->group(group);
  cmd.add_option_function<std::int64_t>("--total-steps", [&a](const std::int64_t& v) { a.total_steps = v; },
                                        "total optimizer steps (scheduler total_num_steps)")
      ->check(whole_number())->check(positive)->group(group);
  auto* bf16 = cmd.add_flag("--bf16", a.bf16, "bf16 mixed precision")->group(group);
  auto* fp16 = cmd.add_flag("--fp16", a.fp16, "fp16 mixed precision with dynamic loss scaling")->group(group);
  bf16->excludes(fp16);
  cmd.add_option_function<std::int64_t>("--hidden-size", [&a](const std::int64_t& v) { a.hidden_size = v; },
                                        "model hidden size (sizes the ZeRO buckets set to \"auto\")")
      ->check(whole_number())->check(positive)->group(group);
}

bool any_training_arg(const config::TrainingArgs& a) {
  return a.micro_batch || a.grad_accum || a.world_size || a.lr || a.beta1 || a.beta2 || a.eps || a.weight_decay ||
         a.max_grad_norm || a.warmup_steps || a.total_steps || a.bf16 || a.fp16 || a.hidden_size;
}

ResolvedConfig resolve_and_parse(const config::LoadedDocument& doc, const config::TrainingArgs& args) {
  ResolvedConfig out{config::resolve_auto(doc.json, args, /*use_defaults=*/true), {}};
  const config::Resolution& res = out.resolution;
  if (res.has_mismatches()) throw Error("{}", res.mismatch_report());
  if (!res.unresolved.empty()) {
    throw Error("{}: \"auto\" values with no training argument to fill them:\n  {}", doc.source,
                fmt::join(res.unresolved, "\n  "));
  }
  config::ParseOptions popts;
  popts.world_size = args.world_size.value_or(1);
  out.parsed = config::parse_config(res.resolved, popts);
  config::throw_if_errors(out.parsed.diagnostics, fmt::format("{} (after resolving \"auto\")", doc.source));
  return out;
}

}  // namespace zinf::tools
