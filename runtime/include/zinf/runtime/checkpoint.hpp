#pragma once
// zinf's checkpoints: the format (trainer_state.json, whose keys CheckpointManifest holds, and
// the optimizer state in safetensors, one file or one per rank, every tensor checksummed), the
// atomic save (a crash at any moment leaves the last complete checkpoint), the checks a resume
// makes, the re-sharding read of a checkpoint saved on another number of ranks, and the export as
// a Hugging Face model. The trainer hands tensors in and takes them out; nothing here calls it.
//
// Layout of <output_dir>/checkpoints/: step-NNNNNNNN/ directories and `latest`, a file naming
// the newest one.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "zinf/configs/document.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/runtime/data.hpp"
#include "zinf/runtime/loss_scaler.hpp"
#include "zinf/runtime/model_config.hpp"

namespace zinf::io {
class SafetensorsFile;
}

namespace zinf::runtime {

class Communicator;

inline constexpr int kCheckpointVersion = 1;
inline constexpr const char* kTrainerStateFile = "trainer_state.json";

// The checkpoint directory `resume` names ("latest" = the one `<output_dir>/checkpoints/latest`
// points to). Throws zinf::Error when there is none.
std::string resolve_checkpoint(const std::string& output_dir, const std::string& resume);

// Writes a checkpoint's fp32 master weights as a Hugging Face model directory (config.json and
// safetensors, `file_dtype` fp32 or bf16, sharded above max_shard_bytes; 0 = one file), loadable
// by transformers. Returns the files written. Throws zinf::Error for a missing or damaged checkpoint.
std::vector<std::string> export_checkpoint(const std::string& checkpoint, const std::string& out_dir,
                                           kernels::cpu::DType file_dtype, std::uint64_t max_shard_bytes = 0);

// Every key of trainer_state.json but the checksums (which the save computes).
struct CheckpointManifest {
  std::int64_t step = 0;           // optimizer steps done, skipped ones included
  std::int64_t applied_steps = 0;  // steps that updated the weights (the scheduler's and Adam's count)
  DataPosition data;
  std::string data_source;
  std::uint64_t data_tokens = 0;
  std::int64_t seq_len = 0;
  double eval_fraction = 0;
  std::int64_t micro = 1, grad_accum = 1;
  std::string precision;  // "bf16", "fp32" or "fp16"
  std::string param_dtype;
  std::uint64_t seed = 0;
  std::optional<std::uint64_t> eval_samples;  // held-out samples each eval covers (older checkpoints lack it)
  std::uint64_t tokens_seen = 0;
  double first_loss = 0;
  std::optional<double> best_eval_loss;
  bool loss_scaler_enabled = false;
  LossScaler::State loss_scaler;
  config::Json model;  // model_config_json()
  std::vector<std::pair<std::string, std::int64_t>> units;  // name, elements
  int world_size = 1;
  int zero_stage = 0;
  int state_shards = 1;  // optimizer-state files: 1, or one per rank of a sharded run
  config::Json lora;     // null: full training; else the adapters' options and base (see the trainer)

  config::Json to_json() const;
  // Throws nlohmann::json exceptions for a missing key or a wrong type (the reader reports them).
  static CheckpointManifest from_json(const config::Json& j);
};

// A checkpoint directory opened for reading: trainer_state.json parsed and checked, and rank
// `rank`'s state tensors verified against their checksums as they are taken.
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::string& dir, int rank = 0);
  // Every key, parsed on first use (a resume needs them; an export needs only the units and the
  // model, so a checkpoint written before a key existed still exports). Throws zinf::Error for a
  // missing key or a wrong type.
  const CheckpointManifest& manifest() const;
  int state_shards() const noexcept { return shards_; }
  const config::Json& model() const noexcept { return state_.at("model"); }
  bool is_lora() const noexcept { return state_.contains("lora"); }
  const std::string& dir() const noexcept { return dir_; }
  // Throws unless the checkpoint's units are exactly `layout`'s.
  void check_layout(const ModelLayout& layout, const ModelConfig& model) const;
  // Unit `unit`'s tensor of `kind` (master, exp_avg, exp_avg_sq), n fp32 values, checksum verified.
  std::span<const float> tensor(const std::string& unit, const char* kind, std::size_t n) const;

 private:
  std::string dir_;
  config::Json state_;  // trainer_state.json
  int shards_ = 1;
  std::vector<std::pair<std::string, std::int64_t>> units_;
  mutable std::optional<CheckpointManifest> manifest_;
  config::Json sums_;
  std::shared_ptr<io::SafetensorsFile> file_;
};

// What a run must share with the checkpoint it resumes, or the continuation is not the same run.
struct ResumeRun {
  std::int64_t seq_len = 0;
  std::string data_source;
  std::uint64_t data_tokens = 0;
  double eval_fraction = 0;
  std::int64_t micro = 1, grad_accum = 1;
  int world = 1;
  std::string precision;
  bool lora = false;
};
// Throws zinf::Error naming the difference and what to do; any split of the same global batch
// over ranks, micro-batches and accumulation continues the run (logged).
void check_resumable(const CheckpointReader& ck, const ResumeRun& run);

// This rank's piece of each unit's optimizer state from a checkpoint of any shard count: unit u's
// range [rank * shard[u], (rank + 1) * shard[u]) taken from whichever saved shards overlap it (the
// checkpoint's W shards, or its one whole copy), so a run saved on W ranks resumes on W'. `ranks`
// is this run's shard count (1: unsharded), `rank` this rank's shard. `put` receives master,
// exp_avg and exp_avg_sq (shard[u] elements each, zero-padded past the unit's end).
using StatePut = std::function<void(std::size_t unit, std::span<const float> master, std::span<const float> exp_avg,
                                    std::span<const float> exp_avg_sq)>;
void read_state(const CheckpointReader& ck0, const ModelLayout& layout, const std::vector<std::int64_t>& shard,
                int ranks, int rank, const StatePut& put);

// One rank's optimizer state as a checkpoint stores it: tensors `<name>.master`, `.exp_avg` and
// `.exp_avg_sq` of `elements` fp32 values per entry, read one entry at a time as they are written.
struct StateSource {
  std::vector<std::pair<std::string, std::size_t>> entries;  // name, elements
  std::function<void(std::size_t entry, std::span<float> master, std::span<float> exp_avg, std::span<float> exp_avg_sq)>
      read;
};

struct CheckpointSave {
  std::string output_dir;
  std::int64_t step = 0;
  int keep_last = 0;  // keep the newest N checkpoints at or below this step; 0 = all
  int shards = 1;     // state files: 1 (rank 0 writes it), or one per rank
  // Rank 0: the manifest (state_shards is set here) and any further files, written into the
  // checkpoint's directory before it is put in place (a LoRA run's PEFT adapter).
  std::function<CheckpointManifest()> manifest;
  std::function<void(const std::string& dir)> extra_files;
};

// Collective over `comm`: every rank with a shard writes it, rank 0 writes trainer_state.json and
// moves the finished directory into place (an existing checkpoint of the same step is swapped
// atomically), updates `latest` and prunes. Returns the checkpoint's directory.
std::string save_checkpoint(Communicator& comm, const CheckpointSave& save, const StateSource& state);

}  // namespace zinf::runtime
