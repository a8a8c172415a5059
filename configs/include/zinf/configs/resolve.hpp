#pragma once
// "auto" values, filled from training arguments the way the Hugging Face Trainer fills them, and
// the report of every config value that contradicts an explicitly given argument.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "zinf/configs/document.hpp"

namespace zinf::config {

// Training arguments that can fill "auto". Unset = not given on the command line.
struct TrainingArgs {
  std::optional<std::int64_t> micro_batch;   // --micro-batch
  std::optional<std::int64_t> grad_accum;    // --grad-accum
  std::optional<std::int64_t> world_size;    // --world-size
  std::optional<double> lr;                  // --lr
  std::optional<double> beta1;               // --beta1
  std::optional<double> beta2;               // --beta2
  std::optional<double> eps;                 // --eps
  std::optional<double> weight_decay;        // --weight-decay
  std::optional<double> max_grad_norm;       // --max-grad-norm
  std::optional<std::int64_t> warmup_steps;  // --warmup-steps
  std::optional<std::int64_t> total_steps;   // --total-steps
  bool bf16 = false;                         // --bf16
  bool fp16 = false;                         // --fp16
  std::optional<std::int64_t> hidden_size;   // --hidden-size (from the model's config.json)
};

// The Hugging Face TrainingArguments defaults, used for an "auto" whose argument was not given.
struct TrainingDefaults {
  std::int64_t micro_batch = 8;
  std::int64_t grad_accum = 1;
  std::int64_t world_size = 1;
  double lr = 5e-5;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double max_grad_norm = 1.0;
  std::int64_t warmup_steps = 0;
};

struct Resolution {
  Json resolved;                        // the config with every resolvable "auto" replaced
  std::vector<std::string> filled;      // "optimizer.params.lr = 0.0003 (from --lr)"
  std::vector<std::string> defaulted;   // "optimizer.params.eps = 1e-08 (default of --eps)"
  std::vector<std::string> unresolved;  // "scheduler.params.total_num_steps: pass --total-steps"
  std::vector<std::string> mismatches;  // "- ds optimizer.params.lr=0.001 vs arg --lr=0.0003"
  std::vector<std::string> mismatch_paths;  // the config key of each mismatch, same order

  bool has_mismatches() const noexcept { return !mismatches.empty(); }
  // The full mismatch report with the advice to use "auto" (empty when there is none).
  std::string mismatch_report() const;
};

// `use_defaults`: fill an "auto" whose argument was not given from TrainingDefaults (as the HF
// Trainer does); otherwise leave it "auto" and list it as unresolved.
Resolution resolve_auto(const Json& config, const TrainingArgs& args, bool use_defaults = true,
                        const TrainingDefaults& defaults = {});

}  // namespace zinf::config
