// Checkpoints: see checkpoint.hpp.
#include "zinf/runtime/checkpoint.hpp"

#include <fcntl.h>
#include <stdio.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"
#include "zinf/io/safetensors.hpp"
#include "zinf/runtime/backend.hpp"
#include "zinf/runtime/comm.hpp"
#include "zinf/runtime/weights.hpp"
#include "sharding.hpp"

namespace zinf::runtime {
namespace fs = std::filesystem;
using config::Json;

namespace {

constexpr const char* kStateFile = "optimizer_state.safetensors";
constexpr const char* kKinds[3] = {"master", "exp_avg", "exp_avg_sq"};
// Barriers around the writing, which one rank may do much longer than the others: a launcher ends
// the job if a rank dies meanwhile.
constexpr std::chrono::milliseconds kSlowWait = std::chrono::hours(2);

// A rank's state file and checksums in a checkpoint of W > 1 shards (W = 1: kStateFile, and the
// checksums in trainer_state.json).
std::string rank_state_file(int rank, int world) { return fmt::format("optimizer_state.rank{:05d}-of-{:05d}.safetensors", rank, world); }
std::string rank_checksum_file(int rank, int world) { return fmt::format("checksums.rank{:05d}-of-{:05d}.json", rank, world); }

std::string step_dir_name(std::int64_t step) { return fmt::format("step-{:08d}", step); }

std::string checksum(const void* data, std::size_t bytes) { return fmt::format("{:016x}", XXH3_64bits(data, bytes)); }

// trainer_state.json's own checksum: of the manifest as written, without this key. A manifest
// edited by hand (its step, data position or applied steps) would resume into another run.
constexpr const char* kManifestChecksumKey = "manifest_xxh3";
std::string manifest_checksum(Json s) {
  s.erase(kManifestChecksumKey);
  const std::string text = s.dump();
  return checksum(text.data(), text.size());
}

// Keeps the newest keep_last checkpoints at or below `keep` (later ones belong to a run this one
// resumed from an earlier step, and are left alone). A directory is renamed to *.deleting before
// it is removed, so a crash never leaves a half-deleted step-N.
void prune_checkpoints(const fs::path& root, const std::string& keep, int keep_last) {
  if (keep_last <= 0) return;
  try {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(root)) {
      const std::string n = e.path().filename().string();
      if (e.is_directory() && n.rfind("step-", 0) == 0 && n.find('.') == std::string::npos && n <= keep) {
        names.push_back(n);
      }
    }
    std::sort(names.begin(), names.end());
    const auto extra = static_cast<std::ptrdiff_t>(names.size()) - keep_last;
    for (std::ptrdiff_t i = 0; i < extra; ++i) {
      const fs::path victim = root / names[static_cast<std::size_t>(i)];
      const fs::path doomed = root / (names[static_cast<std::size_t>(i)] + ".deleting");
      fs::rename(victim, doomed);
      fs::remove_all(doomed);
    }
  } catch (const fs::filesystem_error& e) {
    spdlog::warn("removing old checkpoints (--keep-last {}): {}; the new checkpoint is saved", keep_last, e.what());
  }
}

// Moves the finished directory `tmp` to `final_dir`. A checkpoint of the same step (from a run
// resumed at an earlier step) is swapped with the new one in one atomic rename, so `step-N` always
// exists whole; where the file system cannot exchange, the old copy is renamed aside first.
// Returns whether the previous copy was swapped into `tmp` (the caller removes it once `latest`
// names the new one).
bool put_in_place(const fs::path& tmp, const fs::path& final_dir) {
  bool exchanged = false;
  if (fs::exists(final_dir)) {
    exchanged = ::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0;
    if (!exchanged) {
      const fs::path old = final_dir.string() + ".old";
      fs::remove_all(old);
      fs::rename(final_dir, old);
      fs::rename(tmp, final_dir);
      fs::remove_all(old);
    }
  } else {
    fs::rename(tmp, final_dir);
  }
  sync_directory(final_dir.parent_path().string());
  return exchanged;
}

}  // namespace

std::string resolve_checkpoint(const std::string& output_dir, const std::string& resume) {
  if (resume != "latest") {
    if (!fs::is_directory(resume)) throw Error("--resume {}: no such checkpoint directory", resume);
    return resume;
  }
  const fs::path latest = fs::path(output_dir) / "checkpoints" / "latest";
  if (!fs::exists(latest)) {
    throw Error("--resume latest: no checkpoint in '{}' ({} is missing); train without --resume first",
                output_dir, latest.string());
  }
  std::string name;
  std::ifstream(latest) >> name;
  const fs::path dir = latest.parent_path() / name;
  if (name.empty() || !fs::is_directory(dir)) {
    throw Error("'{}' names '{}', which is not a checkpoint directory", latest.string(), name);
  }
  return dir.string();
}

// ---- the manifest

Json CheckpointManifest::to_json() const {
  Json s;
  s["format"] = "zinf-checkpoint";
  s["version"] = kCheckpointVersion;
  s["step"] = step;
  s["data"] = {{"epoch", data.epoch}, {"index", data.index}, {"source", data_source},
               {"tokens", data_tokens}, {"seq_len", seq_len}, {"eval_fraction", eval_fraction}};
  s["batch"] = {{"micro", micro}, {"grad_accum", grad_accum}};
  s["precision"] = precision;
  s["seed"] = seed;
  if (eval_samples) s["eval_samples"] = *eval_samples;
  s["tokens_seen"] = tokens_seen;
  s["first_loss"] = first_loss;
  s["best_eval_loss"] = best_eval_loss ? Json(*best_eval_loss) : Json(nullptr);
  s["loss_scaler"] = {{"enabled", loss_scaler_enabled}, {"scale", loss_scaler.scale}, {"iteration", loss_scaler.iteration},
                      {"last_overflow", loss_scaler.last_overflow}, {"hysteresis", loss_scaler.hysteresis}};
  s["applied_steps"] = applied_steps;
  s["scheduler"] = {{"last_batch_iteration", applied_steps - 1}};
  s["model"] = model;
  s["param_dtype"] = param_dtype;
  Json u = Json::array();
  for (const auto& [name, numel] : units) u.push_back({{"name", name}, {"numel", numel}});
  s["units"] = u;
  s["world_size"] = world_size;
  s["zero_stage"] = zero_stage;
  s["state_shards"] = state_shards;
  if (!lora.is_null()) s["lora"] = lora;
  return s;
}

CheckpointManifest CheckpointManifest::from_json(const Json& s) {
  CheckpointManifest m;
  m.step = s.at("step").get<std::int64_t>();
  m.applied_steps = s.at("applied_steps").get<std::int64_t>();
  const Json& d = s.at("data");
  m.data = {d.at("epoch").get<std::uint64_t>(), d.at("index").get<std::uint64_t>()};
  m.data_source = d.at("source").get<std::string>();
  m.data_tokens = d.at("tokens").get<std::uint64_t>();
  m.seq_len = d.at("seq_len").get<std::int64_t>();
  m.eval_fraction = d.at("eval_fraction").get<double>();
  m.micro = s.at("batch").at("micro").get<std::int64_t>();
  m.grad_accum = s.at("batch").at("grad_accum").get<std::int64_t>();
  m.precision = s.at("precision").get<std::string>();
  m.param_dtype = s.value("param_dtype", std::string());
  m.seed = s.at("seed").get<std::uint64_t>();
  if (s.contains("eval_samples")) m.eval_samples = s.at("eval_samples").get<std::uint64_t>();
  m.tokens_seen = s.at("tokens_seen").get<std::uint64_t>();
  m.first_loss = s.at("first_loss").get<double>();
  if (!s.at("best_eval_loss").is_null()) m.best_eval_loss = s.at("best_eval_loss").get<double>();
  const Json& ls = s.at("loss_scaler");
  m.loss_scaler_enabled = ls.at("enabled").get<bool>();
  if (m.loss_scaler_enabled) {
    m.loss_scaler = {ls.at("scale").get<double>(), ls.at("iteration").get<std::int64_t>(),
                     ls.at("last_overflow").get<std::int64_t>(), ls.at("hysteresis").get<int>()};
  }
  m.model = s.at("model");
  (void)m.model.size();
  for (const Json& u : s.at("units")) m.units.emplace_back(u.at("name").get<std::string>(), u.at("numel").get<std::int64_t>());
  m.world_size = s.value("world_size", 1);
  m.zero_stage = s.value("zero_stage", 0);
  m.state_shards = s.value("state_shards", 1);
  if (s.contains("lora")) m.lora = s.at("lora");
  return m;
}

// ---- reading

CheckpointReader::CheckpointReader(const std::string& dir, int rank) : dir_(dir) {
  const std::string state_path = (fs::path(dir) / kTrainerStateFile).string();
  if (!fs::exists(state_path)) throw Error("'{}' is not a zinf checkpoint: {} is missing", dir, kTrainerStateFile);
  try {
    state_ = Json::parse(config::read_text_file(state_path));
    if (state_.value("format", "") != "zinf-checkpoint") throw Error("{} is not a zinf checkpoint", state_path);
    // (Checkpoints written before the key existed have none.)
    if (state_.contains(kManifestChecksumKey) &&
        state_.at(kManifestChecksumKey).get<std::string>() != manifest_checksum(state_)) {
      throw Error("checkpoint '{}' is damaged: {} does not match its own checksum (edited, or written by a failing "
                  "disk); use an earlier checkpoint",
                  dir, kTrainerStateFile);
    }
    if (state_.at("version").get<int>() != kCheckpointVersion) {
      throw Error("{}: checkpoint version {} is not supported (this zinf reads {})", state_path,
                  state_.at("version").get<int>(), kCheckpointVersion);
    }
    for (const Json& u : state_.at("units")) units_.emplace_back(u.at("name").get<std::string>(), u.at("numel").get<std::int64_t>());
    (void)state_.at("model").size();
    // State files: one (state_shards 1), or one shard per rank of a ZeRO >= 1 run.
    shards_ = state_.value("state_shards", 1);
    if (shards_ < 1 || rank >= shards_) {
      throw Error("{}: the state is in {} shard(s), which has no shard {}", state_path, shards_, rank);
    }
    if (shards_ == 1) {
      sums_ = state_.at("checksums");
    } else {
      const std::string sums_path = (fs::path(dir) / rank_checksum_file(rank, shards_)).string();
      if (!fs::exists(sums_path)) {
        throw Error("checkpoint '{}' lacks rank {}'s piece ({} is missing): it is incomplete", dir, rank,
                    rank_checksum_file(rank, shards_));
      }
      sums_ = Json::parse(config::read_text_file(sums_path));
    }
  } catch (const Json::exception& e) {
    throw Error("{} is damaged or from another zinf: {}", state_path, e.what());
  }
  const fs::path file = fs::path(dir) / (shards_ == 1 ? std::string(kStateFile) : rank_state_file(rank, shards_));
  if (!fs::exists(file)) {
    throw Error("checkpoint '{}' lacks rank {}'s state ({} is missing): it is incomplete", dir, rank, file.filename().string());
  }
  file_ = io::SafetensorsFile::open(file.string());
}

const CheckpointManifest& CheckpointReader::manifest() const {
  if (!manifest_) {
    try {
      manifest_ = CheckpointManifest::from_json(state_);
    } catch (const Json::exception& e) {
      throw Error("{}/{} is damaged or from another zinf: {}", dir_, kTrainerStateFile, e.what());
    }
  }
  return *manifest_;
}

void CheckpointReader::check_layout(const ModelLayout& layout, const ModelConfig& model) const {
  bool same = units_.size() == layout.units.size();
  for (std::size_t u = 0; same && u < layout.units.size(); ++u) {
    same = units_[u].first == layout.units[u].name && units_[u].second == layout.units[u].numel;
  }
  if (!same) {
    throw Error("checkpoint '{}' is for another model shape ({} units; this model has {}): {} vs {}", dir_,
                units_.size(), layout.units.size(), state_.at("model").dump(), model_config_json(model).dump());
  }
}

std::span<const float> CheckpointReader::tensor(const std::string& unit, const char* kind, std::size_t n) const {
  const std::string tname = unit + "." + kind;
  const io::StTensor* t = file_->find(tname);
  if (t == nullptr || t->dtype != io::StDType::kF32 || t->numel() != static_cast<std::int64_t>(n)) {
    throw Error("checkpoint '{}': tensor '{}' is missing or has the wrong type or size (want F32 [{}])", dir_, tname, n);
  }
  const auto bytes = file_->bytes(*t);
  if (!sums_.contains(tname) || !sums_.at(tname).is_string() ||
      sums_.at(tname).get<std::string>() != checksum(bytes.data(), bytes.size())) {
    throw Error("checkpoint '{}' is damaged: tensor '{}' does not match its checksum; use an earlier checkpoint", dir_,
                tname);
  }
  return {reinterpret_cast<const float*>(bytes.data()), n};
}

void check_resumable(const CheckpointReader& ck, const ResumeRun& run) {
  const CheckpointManifest& m = ck.manifest();
  const std::string& dir = ck.dir();
  if (!m.lora.is_null() != run.lora) {
    if (run.lora) {
      throw Error("checkpoint '{}' is from full training, not LoRA: to fine-tune its weights with LoRA, export them "
                  "(zinf ckpt export) and start a new run with --init",
                  dir);
    }
    throw Error("checkpoint '{}' is a LoRA run's (adapters only): resume it with its --lora-* options, or merge it "
                "into its base (zinf ckpt merge)",
                dir);
  }
  if (m.seq_len != run.seq_len) {
    throw Error("checkpoint '{}' was trained with --seq-len {}, not {}: resume with the same sequence length", dir,
                m.seq_len, run.seq_len);
  }
  if (m.data_tokens != run.data_tokens || m.eval_fraction != run.eval_fraction) {
    throw Error("checkpoint '{}' was trained on {} ({} tokens, --eval-fraction {}), not {} ({} tokens, "
                "--eval-fraction {}): resume with the same data",
                dir, m.data_source, m.data_tokens, m.eval_fraction, run.data_source, run.data_tokens, run.eval_fraction);
  }
  if (m.data_source != run.data_source) {
    spdlog::warn("resuming on {} (the checkpoint names {}; same size)", run.data_source, m.data_source);
  }
  // The sample stream is shared by all ranks; a step takes micro x accumulation x ranks samples
  // of it. Any split of the same global batch continues the run (re-sharding to other ranks).
  const std::int64_t was = m.micro * m.grad_accum * m.world_size, is = run.micro * run.grad_accum * run.world;
  if (was != is) {
    throw Error("checkpoint '{}' was trained with a global batch of {} samples (micro-batch {} x {} accumulation "
                "steps x {} rank(s)), this run's is {} ({} x {} x {}): choose the micro-batch and "
                "--gradient-accumulation-steps so that micro-batch x accumulation x ranks = {}",
                dir, was, m.micro, m.grad_accum, m.world_size, is, run.micro, run.grad_accum, run.world, was);
  }
  if (m.micro != run.micro || m.grad_accum != run.grad_accum || m.world_size != run.world) {
    spdlog::info("resuming a run of {} rank(s) x {} x {} on {} rank(s) x {} x {} (same global batch)", m.world_size,
                 m.micro, m.grad_accum, run.world, run.micro, run.grad_accum);
  }
  if (m.precision != run.precision) {
    throw Error("checkpoint '{}' was trained in {}, not {}: resume with the same precision", dir, m.precision,
                run.precision);
  }
}

void read_state(const CheckpointReader& ck0, const ModelLayout& layout, const std::vector<std::int64_t>& shard,
                int ranks, int rank, const StatePut& put) {
  const std::string& dir = ck0.dir();
  const int from = ck0.state_shards();
  if (from == ranks) {
    // The same shards: this rank's file alone (bit-identical resume).
    const CheckpointReader own(dir, rank);
    for (std::size_t u = 0; u < layout.units.size(); ++u) {
      const auto n = static_cast<std::size_t>(shard[u]);
      const std::string& name = layout.units[u].name;
      put(u, own.tensor(name, kKinds[0], n), own.tensor(name, kKinds[1], n), own.tensor(name, kKinds[2], n));
    }
    return;
  }
  spdlog::info("re-sharding the optimizer state: {} shard(s) in the checkpoint, {} in this run", from, ranks);
  std::map<int, std::unique_ptr<CheckpointReader>> readers;
  std::vector<float> piece[3];
  for (std::size_t u = 0; u < layout.units.size(); ++u) {
    const std::int64_t n = layout.units[u].numel;
    const std::int64_t sh = shard[u];
    const ShardRange want = shard_range(n, sh, rank);
    const std::int64_t end = want.begin + want.count;
    const std::int64_t src_sh = from == 1 ? n : shard_size(n, from);
    for (auto& p : piece) p.assign(static_cast<std::size_t>(sh), 0.0f);
    for (std::int64_t lo = want.begin; lo < end;) {
      const int r = static_cast<int>(lo / src_sh);
      const std::int64_t src_begin = r * src_sh, hi = std::min(end, src_begin + src_sh);
      auto& rd = readers[r];
      if (!rd) rd = std::make_unique<CheckpointReader>(dir, r);
      for (int k = 0; k < 3; ++k) {
        const auto t = rd->tensor(layout.units[u].name, kKinds[k], static_cast<std::size_t>(src_sh));
        std::memcpy(piece[k].data() + (lo - want.begin), t.data() + (lo - src_begin), static_cast<std::size_t>(hi - lo) * 4);
      }
      lo = hi;
    }
    put(u, piece[0], piece[1], piece[2]);
  }
}

// ---- saving

std::string save_checkpoint(Communicator& comm, const CheckpointSave& save, const StateSource& state) {
  const int rank = comm.rank(), world = comm.size();
  const fs::path root = fs::path(save.output_dir) / "checkpoints";
  const std::string name = step_dir_name(save.step);
  const fs::path final_dir = root / name;
  const fs::path tmp = root / (name + ".partial");
  if (rank == 0) {
    fs::create_directories(root);
    fs::remove_all(tmp);
    fs::create_directories(tmp);
  }
  // Ranks write their shards into the directory rank 0 made; rank 0 then finishes the save.
  if (world > 1) comm.barrier(kSlowWait);
  if (rank >= save.shards) {
    comm.barrier(kSlowWait);
    comm.barrier(kSlowWait);
    return final_dir.string();
  }
  // One fp32 tensor per entry and kind, each filled as written (an entry read once for its three).
  std::vector<io::StWriteTensor> tensors;
  std::size_t cached = SIZE_MAX;
  std::vector<float> kinds[3];
  Json sums = Json::object();
  for (std::size_t e = 0; e < state.entries.size(); ++e) {
    const auto& [entry, n] = state.entries[e];
    for (int k = 0; k < 3; ++k) {
      const std::string tname = entry + "." + kKinds[k];
      tensors.push_back({tname, io::StDType::kF32, {static_cast<std::int64_t>(n)}, [&, e, n = n, k, tname](std::byte* dst) {
                           if (cached != e) {
                             for (auto& v : kinds) v.resize(n);
                             state.read(e, kinds[0], kinds[1], kinds[2]);
                             cached = e;
                           }
                           std::memcpy(dst, kinds[k].data(), n * sizeof(float));
                           sums[tname] = checksum(kinds[k].data(), n * sizeof(float));
                         }});
    }
  }
  const std::string state_file = save.shards == 1 ? std::string(kStateFile) : rank_state_file(rank, save.shards);
  io::write_safetensors((tmp / state_file).string(), tensors, {{"format", "zinf-optimizer-state"}});
  if (save.shards > 1) write_file_atomic((tmp / rank_checksum_file(rank, save.shards)).string(), sums.dump(2) + "\n");
  if (world > 1) comm.barrier(kSlowWait);  // every shard is on disk
  if (rank != 0) {
    comm.barrier(kSlowWait);  // rank 0 has put the checkpoint in place
    return final_dir.string();
  }
  CheckpointManifest m = save.manifest();
  m.state_shards = save.shards;
  Json s = m.to_json();
  if (save.shards == 1) {
    // (The checksums before a LoRA run's section, as trainer_state.json has always had them.)
    Json lora = s.contains("lora") ? s["lora"] : Json();
    s.erase("lora");
    s["checksums"] = sums;
    if (!lora.is_null()) s["lora"] = lora;
  }
  s[kManifestChecksumKey] = manifest_checksum(s);
  if (save.extra_files) save.extra_files(tmp.string());
  write_file_atomic((tmp / kTrainerStateFile).string(), s.dump(2) + "\n");
  sync_directory(tmp.string());
  const bool exchanged = put_in_place(tmp, final_dir);
  write_file_atomic((root / "latest").string(), name + "\n");
  if (exchanged) fs::remove_all(tmp);  // now the previous copy
  prune_checkpoints(root, name, save.keep_last);
  spdlog::info("checkpoint {} written", final_dir.string());
  if (world > 1) comm.barrier(kSlowWait);
  return final_dir.string();
}

// ---- export

std::vector<std::string> export_checkpoint(const std::string& checkpoint, const std::string& out_dir,
                                           kernels::cpu::DType file_dtype, std::uint64_t max_shard_bytes) {
  const CheckpointReader ck(checkpoint);
  if (ck.is_lora()) {
    throw Error("checkpoint '{}' is a LoRA run's: it holds the adapters only (in PEFT's format, adapter_model.safetensors); "
                "`zinf ckpt merge --base BASE --adapter {}` writes the base with them merged",
                checkpoint, checkpoint);
  }
  const ModelConfig model = parse_model_config(ck.model(), checkpoint + "/" + kTrainerStateFile);
  const ModelLayout layout = make_layout(model);
  ck.check_layout(layout, model);
  auto backend = make_cpu_backend();
  UnitStorage master(*backend, layout, kernels::cpu::DType::kF32);
  // One state file, or every rank's shard put back together (as zero_to_fp32 does).
  const int shards = ck.state_shards();
  std::vector<std::unique_ptr<CheckpointReader>> readers;
  for (int r = 1; r < shards; ++r) readers.push_back(std::make_unique<CheckpointReader>(checkpoint, r));
  for (std::size_t u = 0; u < layout.units.size(); ++u) {
    const auto n = layout.units[u].numel;
    const std::int64_t sh = shards == 1 ? n : shard_size(n, shards);
    for (int r = 0; r < shards; ++r) {
      const CheckpointReader& rd = r == 0 ? ck : *readers[static_cast<std::size_t>(r - 1)];
      const auto m = rd.tensor(layout.units[u].name, kKinds[0], static_cast<std::size_t>(sh));
      const ShardRange part = shard_range(n, sh, r);
      if (part.count > 0) {
        std::memcpy(static_cast<float*>(master.view().units[u]) + part.begin, m.data(),
                    static_cast<std::size_t>(part.count) * 4);
      }
    }
  }
  return save_weights(out_dir, model, layout, *backend, master.view(), file_dtype, max_shard_bytes);
}

}  // namespace zinf::runtime
