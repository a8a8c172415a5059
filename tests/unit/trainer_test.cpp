// Training data (token files, the sampler) and the trainer: outputs, resume bit-identity,
// checkpoint damage, the schedules in the metrics, a falling loss on the embedded corpus.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <set>
#include <sstream>
#include <sys/wait.h>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <sentencepiece_trainer.h>

#include "io_test_util.hpp"
#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"
#include "zinf/configs/parse.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/io/safetensors.hpp"
#include "zinf/kernels/device_info.hpp"
#include "zinf/runtime/comm.hpp"
#include "zinf/runtime/data.hpp"
#include "zinf/runtime/embedded.hpp"
#include "zinf/runtime/lora.hpp"
#include "zinf/runtime/loss_scaler.hpp"
#include "zinf/runtime/lr_schedule.hpp"
#include "zinf/runtime/model.hpp"
#include "zinf/runtime/model_config.hpp"
#include "zinf/runtime/nccl_comm.hpp"
#include "zinf/runtime/weights.hpp"
#include "zinf/runtime/backend.hpp"
#include "zinf/runtime/trainer.hpp"

namespace zinf::runtime {
namespace fs = std::filesystem;
using io::testing::ScratchDir;
using Json = nlohmann::json;


std::vector<std::uint32_t> iota_tokens(std::size_t n, std::uint32_t mod) {
  std::vector<std::uint32_t> t(n);
  for (std::size_t i = 0; i < n; ++i) t[i] = static_cast<std::uint32_t>((i * 7 + i / 13) % mod);
  return t;
}

TEST(TokenData, HeaderedFilesRoundTripInBothWidths) {
  ScratchDir d;
  for (const std::uint32_t mod : {300u, 70000u}) {
    auto tokens = iota_tokens(1000, mod);
    tokens[17] = mod - 1;
    const std::string path = d.path() + "/t.tok";
    write_token_file(path, tokens, mod);
    const TokenData td = TokenData::open(path);
    EXPECT_EQ(td.width(), *std::max_element(tokens.begin(), tokens.end()) > 65535 ? 4u : 2u);
    EXPECT_EQ(td.recorded_vocab(), mod);
    ASSERT_EQ(td.size(), tokens.size());
    for (std::size_t i = 0; i < tokens.size(); ++i) ASSERT_EQ(td.at(i), tokens[i]);
    EXPECT_EQ(td.max_token(), *std::max_element(tokens.begin(), tokens.end()));
  }
}

TEST(TokenData, RawFilesAndBadFilesAreClearErrors) {
  ScratchDir d;
  const std::string raw = d.path() + "/raw.bin";
  {
    std::ofstream f(raw, std::ios::binary);
    const std::uint16_t v[5] = {1, 2, 3, 4, 5};
    f.write(reinterpret_cast<const char*>(v), sizeof(v));
  }
  const TokenData r = TokenData::open(raw, 2u);
  EXPECT_EQ(r.size(), 5u);
  EXPECT_EQ(r.at(4), 5u);
  EXPECT_IO_ERROR(TokenData::open(raw), "no zinf token header");
  EXPECT_IO_ERROR(TokenData::open(raw, 4u), "not a multiple of the 4-byte token width");
  EXPECT_IO_ERROR(TokenData::open(d.path() + "/missing.tok"), "no such file");
  const std::string tok = d.path() + "/t.tok";
  write_token_file(tok, iota_tokens(100, 50), 50);
  fs::resize_file(tok, fs::file_size(tok) - 3);
  EXPECT_IO_ERROR(TokenData::open(tok), "truncated or padded");
}

// Writes a Megatron-LM indexed dataset: PREFIX.bin (uint16 tokens) and PREFIX.idx.
void write_megatron(const std::string& prefix, const std::vector<std::vector<std::uint16_t>>& seqs,
                    std::int64_t first_pointer = 0) {
  std::ofstream bin(prefix + ".bin", std::ios::binary), idx(prefix + ".idx", std::ios::binary);
  idx.write("MMIDIDX\0\0", 9);
  const std::uint64_t version = 1, count = seqs.size(), docs = seqs.size() + 1;
  const std::uint8_t code = 8;
  idx.write(reinterpret_cast<const char*>(&version), 8);
  idx.write(reinterpret_cast<const char*>(&code), 1);
  idx.write(reinterpret_cast<const char*>(&count), 8);
  idx.write(reinterpret_cast<const char*>(&docs), 8);
  for (const auto& q : seqs) {
    const auto n = static_cast<std::int32_t>(q.size());
    idx.write(reinterpret_cast<const char*>(&n), 4);
  }
  std::int64_t ptr = first_pointer;
  for (const auto& q : seqs) {
    idx.write(reinterpret_cast<const char*>(&ptr), 8);
    ptr += static_cast<std::int64_t>(q.size() * 2);
    bin.write(reinterpret_cast<const char*>(q.data()), static_cast<std::streamsize>(q.size() * 2));
  }
  for (std::int64_t i = 0; i <= static_cast<std::int64_t>(seqs.size()); ++i) idx.write(reinterpret_cast<const char*>(&i), 8);
}

TEST(TokenData, MegatronIndexedDatasetsReadAsOneStream) {
  ScratchDir d;
  write_megatron(d.path() + "/ds_text_document", {{1, 2, 3}, {4, 5}, {6, 7, 8, 9}});
  for (const char* p : {"/ds_text_document.bin", "/ds_text_document.idx", "/ds_text_document"}) {
    const TokenData td = TokenData::open(d.path() + p);
    ASSERT_EQ(td.size(), 9u) << p;
    for (std::uint32_t i = 0; i < 9; ++i) EXPECT_EQ(td.at(i), i + 1);
  }
  write_megatron(d.path() + "/gap", {{1, 2}, {3, 4}}, 2);
  EXPECT_IO_ERROR(TokenData::open(d.path() + "/gap.bin"), "only back-to-back sequences");
  write_megatron(d.path() + "/short", {{1, 2}, {3, 4}});
  fs::resize_file(d.path() + "/short.bin", 6);
  EXPECT_IO_ERROR(TokenData::open(d.path() + "/short.bin"), "describes 8 bytes of tokens");
  fs::resize_file(d.path() + "/short.idx", 40);
  EXPECT_IO_ERROR(TokenData::open(d.path() + "/short.bin"), "truncated or malformed");
}

TEST(SentencePiece, EncodesWithATrainedModelAndRefusesOtherFiles) {
  ScratchDir d;
  const std::string corpus_path = d.path() + "/corpus.txt";
  std::ofstream(corpus_path) << embedded_corpus().substr(0, 100000);
  const auto status = sentencepiece::SentencePieceTrainer::Train(
      "--input=" + corpus_path + " --model_prefix=" + d.path() + "/m --vocab_size=300 --model_type=bpe --minloglevel=2");
  ASSERT_TRUE(status.ok()) << status.ToString();
  const SentencePieceTokenizer spm(d.path() + "/m.model");
  EXPECT_EQ(spm.vocab_size(), 300u);
  EXPECT_GE(spm.eos_id(), 0);
  const std::string sentence = "Then Ada sold three apples, and Ben laughed.";
  const auto ids = spm.encode(sentence);
  EXPECT_GT(ids.size(), 2u);
  EXPECT_LT(ids.size(), sentence.size()) << "pieces, not bytes";
  for (const auto id : ids) EXPECT_LT(id, 300u);
  EXPECT_IO_ERROR(SentencePieceTokenizer{corpus_path}, "cannot load SentencePiece model");
}

TEST(Sampler, SeededOrderResumesAndHoldsOutTheEnd) {
  const TokenData td = TokenData::from_tokens(iota_tokens(8 * 100 + 1, 50), "mem");
  Sampler a(td, 8, 5, 0.1);
  EXPECT_EQ(a.eval_samples(), 10u);
  EXPECT_EQ(a.train_samples(), 90u);
  std::vector<std::int32_t> tok(3 * 8), tgt(3 * 8), tok2(3 * 8), tgt2(3 * 8);
  // Every training sample once per epoch; targets are the next tokens; eval samples never appear.
  std::set<std::int32_t> firsts;
  for (int b = 0; b < 30; ++b) {
    a.next_batch(3, tok, tgt);
    for (int s = 0; s < 3; ++s) {
      firsts.insert(tok[s * 8]);
      for (int t = 0; t < 7; ++t) EXPECT_EQ(tgt[s * 8 + t], tok[s * 8 + t + 1]);
    }
  }
  EXPECT_EQ(a.position().epoch, 0u);
  EXPECT_EQ(a.position().index, 90u);
  // Resume at a position: the same batches as the sampler that got there by itself.
  Sampler b(td, 8, 5, 0.1);
  const DataPosition at{0, 84};
  b.set_position(at);
  Sampler c(td, 8, 5, 0.1);
  for (int i = 0; i < 28; ++i) c.next_batch(3, tok, tgt);
  ASSERT_EQ(c.position(), at);
  for (int i = 0; i < 5; ++i) {  // across the epoch boundary
    b.next_batch(3, tok, tgt);
    c.next_batch(3, tok2, tgt2);
    EXPECT_EQ(tok, tok2);
    EXPECT_EQ(tgt, tgt2);
  }
  EXPECT_EQ(b.position().epoch, 1u);
  // Another seed, another order.
  Sampler other_seed(td, 8, 6, 0.1), same_seed(td, 8, 5, 0.1);
  other_seed.next_batch(3, tok, tgt);
  same_seed.next_batch(3, tok2, tgt2);
  EXPECT_NE(tok, tok2);
  EXPECT_IO_ERROR(b.set_position({0, 91}), "past the 90 training samples");
  EXPECT_IO_ERROR(Sampler(td, 400, 5, 0.1), "too few for training");
}

Json tiny_model() {
  return Json{{"architectures", {"LlamaForCausalLM"}},
              {"hidden_size", 32},
              {"num_hidden_layers", 2},
              {"num_attention_heads", 4},
              {"num_key_value_heads", 2},
              {"intermediate_size", 64},
              {"vocab_size", 256},
              {"max_position_embeddings", 64},
              {"rms_norm_eps", 1e-5},
              {"tie_word_embeddings", true}};
}

Json ds_json(const Json& scheduler, bool bf16 = true) {
  Json j{{"train_micro_batch_size_per_gpu", 2},
         {"gradient_accumulation_steps", 2},
         {"gradient_clipping", 1.0},
         {"bf16", {{"enabled", bf16}}},
         {"optimizer", {{"type", "AdamW"}, {"params", {{"lr", 3e-3}, {"weight_decay", 0.01}}}}},
         {"zero_optimization", {{"stage", 3}, {"offload_optimizer", {{"device", "cpu"}}}}}};
  if (!scheduler.is_null()) j["scheduler"] = scheduler;
  return j;
}

struct TrainRun {
  TokenData data = TokenData::from_tokens(byte_tokens(embedded_corpus().substr(0, 60000)), "corpus", 256);
  TrainOptions o;
  explicit TrainRun(const std::string& out, const Json& ds = ds_json(nullptr)) {
    o.model = parse_model_config(tiny_model(), "tiny");
    o.model_source = "tiny";
    o.data = &data;
    config::ParseResult p = config::parse_config(ds);
    if (!p.ok()) throw Error("test config: {}", p.diagnostics.format(config::Severity::kWarning));
    o.ds = p.config;
    o.ds_resolved = ds;
    o.seq_len = 32;
    o.max_steps = 20;
    o.seed = 3;
    o.eval_every = 10;
    o.output_dir = out;
  }
};

std::vector<std::vector<std::string>> read_csv(const std::string& path) {
  std::ifstream f(path);
  std::vector<std::vector<std::string>> rows;
  std::string line;
  while (std::getline(f, line)) {
    std::vector<std::string> cells;
    std::stringstream ss(line);
    std::string c;
    while (std::getline(ss, c, ',')) cells.push_back(c);
    if (!line.empty() && line.back() == ',') cells.emplace_back();
    rows.push_back(cells);
  }
  return rows;
}

std::size_t column(const std::vector<std::vector<std::string>>& rows, const std::string& name) {
  const auto& h = rows.at(0);
  return static_cast<std::size_t>(std::find(h.begin(), h.end(), name) - h.begin());
}

std::vector<std::byte> file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> v((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(v.size());
  std::memcpy(out.data(), v.data(), v.size());
  return out;
}

TEST(Trainer, WritesEveryOutputAndTheLossFalls) {
  ScratchDir d;
  TrainRun r(d.path() + "/run");
  r.o.max_steps = 40;
  const TrainResult res = train(r.o);
  EXPECT_EQ(res.steps, 40);
  for (const char* f : {"training_metrics.csv", "summary.json", "deepspeed_config_auto.json"}) {
    EXPECT_TRUE(fs::exists(r.o.output_dir + "/" + f)) << f;
  }
  const auto rows = read_csv(r.o.output_dir + "/training_metrics.csv");
  ASSERT_EQ(rows.size(), 41u);
  for (const auto& row : rows) EXPECT_EQ(row.size(), rows[0].size());
  EXPECT_EQ(rows[40][column(rows, "step")], "40");
  EXPECT_EQ(rows[40][column(rows, "gpu_mem_bytes")], "0") << "the CPU backend allocates nothing on a GPU";
  EXPECT_FALSE(rows[10][column(rows, "eval_loss")].empty()) << "eval every 10 steps";
  EXPECT_TRUE(rows[11][column(rows, "eval_loss")].empty());
  const Json summary = Json::parse(std::ifstream(r.o.output_dir + "/summary.json"));
  EXPECT_EQ(summary["steps"], 40);
  EXPECT_GT(summary["model"]["parameters"].get<std::int64_t>(), 0);
  EXPECT_GT(summary["throughput"]["tokens_per_s"].get<double>(), 0);
  EXPECT_TRUE(fs::exists(summary["last_checkpoint"].get<std::string>()));
  EXPECT_LT(res.final_loss, res.first_loss - 1.0) << "first " << res.first_loss << " final " << res.final_loss;
  EXPECT_LT(res.final_eval_loss, res.first_loss - 1.0);
  std::string latest;
  std::ifstream(r.o.output_dir + "/checkpoints/latest") >> latest;
  EXPECT_EQ(latest, "step-00000040");
}

TEST(Trainer, ResumeIsBitIdentical) {
  ScratchDir d;
  TrainRun straight(d.path() + "/straight");
  train(straight.o);
  TrainRun first(d.path() + "/split");
  first.o.max_steps = 10;
  train(first.o);
  TrainRun second(d.path() + "/split");
  second.o.resume = "latest";
  const TrainResult r = train(second.o);
  EXPECT_EQ(r.steps, 20);
  const auto a = read_csv(straight.o.output_dir + "/training_metrics.csv");
  const auto b = read_csv(second.o.output_dir + "/training_metrics.csv");
  ASSERT_EQ(a.size(), b.size());
  for (const char* col : {"loss", "eval_loss", "lr", "grad_norm", "tokens"}) {
    for (std::size_t i = 1; i < a.size(); ++i) {
      EXPECT_EQ(a[i][column(a, col)], b[i][column(b, col)]) << col << " at step " << i;
    }
  }
  // The final weights and optimizer state, bit for bit.
  const std::string sa = straight.o.output_dir + "/checkpoints/step-00000020/optimizer_state.safetensors";
  const std::string sb = second.o.output_dir + "/checkpoints/step-00000020/optimizer_state.safetensors";
  EXPECT_TRUE(file_bytes(sa) == file_bytes(sb));
}

TEST(Trainer, NvmeOffloadTrainsAndResumesLikeHostMemory) {
  // The same run with state and parameters on NVMe (small sub-groups, so several slices per unit)
  // gives the same losses as with everything in host memory, and resumes bit for bit.
  ScratchDir d;
  const auto nvme = [&](const std::string& swap) {
    Json j = ds_json(nullptr);
    j["zero_optimization"] = {{"stage", 3},
                              {"sub_group_size", 4096},
                              {"offload_optimizer", {{"device", "nvme"}, {"nvme_path", swap}, {"buffer_count", 2}}},
                              {"offload_param", {{"device", "nvme"}, {"nvme_path", swap}, {"max_in_cpu", 0}}}};
    return j;
  };
  TrainRun host(d.path() + "/host");
  train(host.o);
  TrainRun first(d.path() + "/nvme", nvme(d.sub("swap1")));
  first.o.max_steps = 10;
  train(first.o);
  TrainRun second(d.path() + "/nvme", nvme(d.sub("swap2")));
  second.o.resume = "latest";
  EXPECT_EQ(train(second.o).steps, 20);
  const auto a = read_csv(host.o.output_dir + "/training_metrics.csv");
  const auto b = read_csv(second.o.output_dir + "/training_metrics.csv");
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t i = 1; i < a.size(); ++i) EXPECT_EQ(a[i][column(a, "loss")], b[i][column(b, "loss")]) << i;
  EXPECT_TRUE(file_bytes(host.o.output_dir + "/checkpoints/step-00000020/optimizer_state.safetensors") ==
              file_bytes(second.o.output_dir + "/checkpoints/step-00000020/optimizer_state.safetensors"));
}

TEST(Trainer, ExportWritesTheMasterWeightsAsAHuggingFaceModel) {
  ScratchDir d;
  TrainRun r(d.path() + "/run");
  r.o.max_steps = 3;
  const TrainResult res = train(r.o);
  const std::string hf = d.path() + "/hf";
  const auto files = export_checkpoint(res.last_checkpoint, hf, kernels::cpu::DType::kF32);
  EXPECT_TRUE(fs::exists(hf + "/config.json"));
  EXPECT_TRUE(fs::exists(hf + "/model.safetensors"));
  // Loading the export back gives the checkpoint's fp32 master weights exactly.
  const ModelConfig back = load_model_config(hf + "/config.json");
  EXPECT_EQ(model_config_json(back), model_config_json(r.o.model));
  const ModelLayout layout = make_layout(back);
  auto be = make_cpu_backend();
  UnitStorage w(*be, layout, kernels::cpu::DType::kF32);
  load_weights(hf, back, layout, *be, w.view());
  const auto st = io::SafetensorsFile::open(res.last_checkpoint + "/optimizer_state.safetensors");
  for (std::size_t u = 0; u < layout.units.size(); ++u) {
    const auto bytes = st->bytes(*st->find(layout.units[u].name + ".master"));
    // Padding between tensors is not exported; compare each tensor's range.
    for (const TensorSpec& t : layout.units[u].tensors) {
      EXPECT_EQ(std::memcmp(static_cast<const float*>(w.view().units[u]) + t.offset,
                            reinterpret_cast<const float*>(bytes.data()) + t.offset, static_cast<std::size_t>(t.numel()) * 4),
                0)
          << t.name;
    }
  }
  EXPECT_IO_ERROR(export_checkpoint(d.path() + "/nothing", hf, kernels::cpu::DType::kF32), "not a zinf checkpoint");
}

// Runs the same training on W thread ranks (rank 0's outputs in `out`), ZeRO `stage`, the global
// batch of 4 samples per step split as 1 x (4 / W) micro-batches per rank.
// The same options on the synchronous path: the GPU pipeline turned off (`--gpu-overlap off`).
std::function<void(TrainOptions&)> synchronous(std::function<void(TrainOptions&)> tweak) {
  return [tweak = std::move(tweak)](TrainOptions& o) {
    tweak(o);
    o.gpu_overlap = false;
  };
}

void train_on_ranks(const std::string& out, int w, int stage, std::int64_t steps, const std::string& resume = "",
                    const std::function<void(Json&)>& ds_tweak = {},
                    const std::function<void(TrainOptions&)>& o_tweak = {}) {
  static int group = 0;
  const std::string id = "trainer-" + std::to_string(group++);
  std::vector<std::thread> threads;
  std::vector<std::string> errors(static_cast<std::size_t>(w));
  for (int r = 0; r < w; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto comm = make_gloo_communicator_in_process(r, w, id);
        Json ds = ds_json(nullptr, false);
        ds["train_micro_batch_size_per_gpu"] = 1;
        ds["gradient_accumulation_steps"] = 4 / w;
        ds["zero_optimization"] = stage == 0 ? Json{{"stage", 0}}
                                             : Json{{"stage", stage}, {"offload_optimizer", {{"device", "cpu"}}}};
        if (ds_tweak) ds_tweak(ds);
        TrainRun run(out, ds);
        run.o.max_steps = steps;
        run.o.eval_every = 0;
        run.o.comm = comm.get();
        run.o.resume = resume;
        if (o_tweak) o_tweak(run.o);
        train(run.o);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  std::string all;
  for (int r = 0; r < w; ++r) {
    if (!errors[static_cast<std::size_t>(r)].empty()) all += fmt::format("rank {}: {}\n", r, errors[static_cast<std::size_t>(r)]);
  }
  if (!all.empty()) throw Error("{}", all);
}

// The GPU pipeline's conditions (one GPU: micro-batch 4, no gradient accumulation), with bf16 or
// fp32 weights and, when given, a clipping threshold.
void one_gpu_pipeline(Json& ds, bool bf16, std::optional<double> clip) {
  ds["bf16"]["enabled"] = bf16;
  ds["train_micro_batch_size_per_gpu"] = 4;
  ds["gradient_accumulation_steps"] = 1;
  if (clip) ds["gradient_clipping"] = *clip;
}

// ... with a tight live budget and no persistent units, so the coordinator reuses its buffers.
void tight_gpu_pipeline(Json& ds, bool bf16, std::optional<double> clip) {
  one_gpu_pipeline(ds, bf16, clip);
  ds["zero_optimization"]["stage3_max_live_parameters"] = 20000;
  ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0;
}

std::vector<double> losses(const std::string& out) {
  const auto rows = read_csv(out + "/training_metrics.csv");
  std::vector<double> l;
  for (std::size_t i = 1; i < rows.size(); ++i) l.push_back(std::stod(rows[i][column(rows, "loss")]));
  return l;
}

TEST(Trainer, EveryZeroStageOnOneTwoAndFourRanksGivesTheSameLosses) {
  ScratchDir d;
  train_on_ranks(d.path() + "/w1", 1, 0, 6);
  const std::vector<double> want = losses(d.path() + "/w1");
  ASSERT_EQ(want.size(), 6u);
  for (const int w : {2, 4}) {
    for (const int stage : {0, 1, 2, 3}) {
      const std::string out = fmt::format("{}/w{}-s{}", d.path(), w, stage);
      train_on_ranks(out, w, stage, 6);
      const std::vector<double> got = losses(out);
      ASSERT_EQ(got.size(), want.size());
      for (std::size_t i = 0; i < want.size(); ++i) {
        EXPECT_NEAR(got[i], want[i], 2e-5 * want[i]) << "W " << w << " stage " << stage << " step " << i + 1;
      }
    }
  }
  // Consolidating the 2 shards of a stage-2 checkpoint gives the weights the unsharded (stage 0)
  // run reached, within the rounding of the gradient norm's different summation order.
  export_checkpoint(d.path() + "/w2-s0/checkpoints/step-00000006", d.path() + "/hf0", kernels::cpu::DType::kF32);
  export_checkpoint(d.path() + "/w2-s2/checkpoints/step-00000006", d.path() + "/hf2", kernels::cpu::DType::kF32);
  const auto f0 = io::SafetensorsFile::open(d.path() + "/hf0/model.safetensors");
  const auto f2 = io::SafetensorsFile::open(d.path() + "/hf2/model.safetensors");
  ASSERT_EQ(f0->tensors().size(), f2->tensors().size());
  for (const auto& [name, t] : f0->tensors()) {
    const io::StTensor* t2 = f2->find(name);
    ASSERT_NE(t2, nullptr) << name;
    const auto a = f0->bytes(t), b = f2->bytes(*t2);
    ASSERT_EQ(a.size(), b.size());
    const auto* x = reinterpret_cast<const float*>(a.data());
    const auto* y = reinterpret_cast<const float*>(b.data());
    for (std::size_t i = 0; i < a.size() / 4; ++i) ASSERT_NEAR(x[i], y[i], 1e-5 + 1e-4 * std::abs(x[i])) << name << "[" << i << "]";
  }
  EXPECT_TRUE(fs::exists(d.path() + "/w2-s2/checkpoints/step-00000006/optimizer_state.rank00001-of-00002.safetensors"));
  // The summary counts every rank's tokens.
  const Json s1 = Json::parse(std::ifstream(d.path() + "/w1/summary.json"));
  const Json s4 = Json::parse(std::ifstream(d.path() + "/w4-s3/summary.json"));
  EXPECT_EQ(s1["tokens_seen"], s4["tokens_seen"]);
  EXPECT_EQ(s4["tokens_seen"].get<std::int64_t>(), 6 * 4 * 32);
}

TEST(Trainer, Stage3CoordinatorHoldsItsBudgetsAndChangesNoLoss) {
  // Stage 3 with small budgets gathers each unit per use, yet every loss is stage 0's; the
  // recorded high-water mark stays within max_live plus the largest unit, prefetch within its
  // bucket, on 1, 2 and 4 ranks. (Untied embeddings: every use reads one unit.)
  ScratchDir d;
  const auto untied = [](TrainOptions& o) {
    Json m = tiny_model();
    m["tie_word_embeddings"] = false;
    o.model = parse_model_config(m, "tiny-untied");
  };
  train_on_ranks(d.path() + "/ref", 1, 0, 6, "", {}, untied);
  const std::vector<double> want = losses(d.path() + "/ref");
  struct Budget {
    int w;
    std::int64_t live, bucket, reuse, persist;
  };
  const Budget budgets[] = {{1, 12000, 9000, 1'000'000'000, 0},    {2, 12000, 9000, 1'000'000'000, 0},
                            {2, 0, 0, 0, 0},                       {2, 20000, 30000, 5000, 100},
                            {4, 15000, 5000, 1'000'000'000, 40},   {2, 1'000'000'000, 50'000'000, 1'000'000'000, 0}};
  for (const Budget& b : budgets) {
    const std::string out = fmt::format("{}/w{}-live{}-bucket{}-reuse{}", d.path(), b.w, b.live, b.bucket, b.reuse);
    SCOPED_TRACE(out);
    train_on_ranks(out, b.w, 3, 6, "", [&](Json& ds) {
      ds["zero_optimization"]["stage3_max_live_parameters"] = b.live;
      ds["zero_optimization"]["stage3_prefetch_bucket_size"] = b.bucket;
      ds["zero_optimization"]["stage3_max_reuse_distance"] = b.reuse;
      ds["zero_optimization"]["stage3_param_persistence_threshold"] = b.persist;
      ds["zero_optimization"]["reduce_bucket_size"] = 10000;  // a few units per reduce-scatter
    }, untied);
    const std::vector<double> got = losses(out);
    ASSERT_EQ(got.size(), want.size());
    for (std::size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 2e-5 * want[i]) << "step " << i + 1;
    const Json z = Json::parse(std::ifstream(out + "/summary.json"))["zero"];
    const std::int64_t hwm = z["live_params_high_water"].get<std::int64_t>();
    EXPECT_LE(hwm, b.live + z["largest_unit"].get<std::int64_t>());
    EXPECT_GT(hwm, 0);
    if (b.bucket > 0) {
      EXPECT_LT(z["prefetch_ahead_high_water"].get<std::int64_t>(), b.bucket + z["largest_unit"].get<std::int64_t>());
    }
    EXPECT_GT(z["gradient_buckets_reduced"].get<std::int64_t>(), 0);
    const auto misses = z["prefetch_misses"].get<std::uint64_t>(), hits = z["prefetch_hits"].get<std::uint64_t>();
    if (b.bucket == 0) {
      EXPECT_EQ(z["prefetch_ahead_high_water"].get<std::int64_t>(), 0);
      EXPECT_GT(misses, hits);  // nothing comes early; only back-to-back reads are kept
    }
    if (b.live >= 1'000'000'000) {
      EXPECT_EQ(misses, 0u);  // everything fits: all gathered ahead of use
      EXPECT_GT(hits, 0u);
    }
    // The per-step CSV columns agree with the summary.
    const auto rows = read_csv(out + "/training_metrics.csv");
    std::int64_t csv_hwm = 0;
    std::uint64_t csv_misses = 0;
    for (std::size_t i = 1; i < rows.size(); ++i) {
      csv_hwm = std::max<std::int64_t>(csv_hwm, std::stoll(rows[i][column(rows, "live_params_hwm")]));
      csv_misses += std::stoull(rows[i][column(rows, "prefetch_misses")]);
      EXPECT_GE(std::stod(rows[i][column(rows, "param_wait_s")]), 0.0);
    }
    EXPECT_EQ(csv_hwm, hwm);
    EXPECT_EQ(csv_misses, misses);
  }
}

TEST(Trainer, NvmeOffloadOnTwoRanksMatchesHostMemoryAndResumes) {
  // Stage 3 on 2 ranks with each rank's optimizer state and parameters on NVMe (one nvme_path for
  // both; the prefetcher reads the next unit ahead) gives host memory's losses bit for bit, and
  // resumes bit for bit. bf16, so the parameters come from their NVMe copies.
  ScratchDir d;
  const auto nvme = [&](const std::string& swap) {
    return [swap](Json& ds) {
      ds["bf16"]["enabled"] = true;
      ds["zero_optimization"] = {{"stage", 3},
                                 {"sub_group_size", 4096},
                                 {"stage3_param_persistence_threshold", 0},
                                 {"offload_optimizer", {{"device", "nvme"}, {"nvme_path", swap}, {"buffer_count", 2}}},
                                 // Enough staging for the next unit's reads to start while one is held.
                                 {"offload_param", {{"device", "nvme"}, {"nvme_path", swap}, {"max_in_cpu", 0},
                                                    {"buffer_count", 8}}}};
    };
  };
  train_on_ranks(d.path() + "/host", 2, 3, 6, "", [](Json& ds) {
    ds["bf16"]["enabled"] = true;
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0;
  });
  train_on_ranks(d.path() + "/nvme", 2, 3, 3, "", nvme(d.sub("swap1")));
  train_on_ranks(d.path() + "/nvme", 2, 3, 6, "latest", nvme(d.sub("swap2")));
  EXPECT_EQ(losses(d.path() + "/host"), losses(d.path() + "/nvme"));
  for (int r = 0; r < 2; ++r) {
    const std::string f = fmt::format("/checkpoints/step-00000006/optimizer_state.rank{:05d}-of-00002.safetensors", r);
    EXPECT_TRUE(file_bytes(d.path() + "/host" + f) == file_bytes(d.path() + "/nvme" + f)) << f;
  }
  const Json s = Json::parse(std::ifstream(d.path() + "/nvme/summary.json"));
  EXPECT_GT(s["peak_memory_bytes"]["nvme"].get<std::int64_t>(), 0);
}

TEST(Trainer, TheCudaBackendTrainsLikeTheCpu) {
  // The same runs with the model on the GPU: fp32 within rounding, bf16 within bf16 tolerance
  // (the GPU's flash attention takes bf16 operands; the CPU's attention is fp32), at stage 0 and
  // stage 3, and with 2 ranks where 2 GPUs are visible.
  const kernels::GpuQuery q = kernels::query_gpus();
  if (q.gpus.empty()) GTEST_SKIP() << "no GPU here: " << (q.built_with_cuda ? q.problem : std::string("built without CUDA"));
  ScratchDir d;
  for (const bool bf16 : {false, true}) {
    for (const int stage : {0, 3}) {
      const auto tweak = [&](Json& ds) {
        ds["bf16"]["enabled"] = bf16;
        ds["zero_optimization"]["stage"] = stage;
      };
      const std::string tag = fmt::format("{}-s{}", bf16 ? "bf16" : "fp32", stage);
      train_on_ranks(d.path() + "/cpu-" + tag, 1, stage, 8, "", tweak);
      train_on_ranks(d.path() + "/cuda-" + tag, 1, stage, 8, "", tweak, [](TrainOptions& o) { o.device = "cuda"; });
      const auto want = losses(d.path() + "/cpu-" + tag), got = losses(d.path() + "/cuda-" + tag);
      ASSERT_EQ(got.size(), want.size()) << tag;
      for (std::size_t i = 0; i < want.size(); ++i) {
        EXPECT_NEAR(got[i], want[i], (bf16 ? 2e-2 : 2e-4) * want[i]) << tag << " step " << i + 1;
      }
      const Json s = Json::parse(std::ifstream(d.path() + "/cuda-" + tag + "/summary.json"));
      EXPECT_EQ(s["backend"], "cuda") << tag;
    }
  }
  if (q.gpus.size() >= 2) {
    train_on_ranks(d.path() + "/cuda-w2", 2, 3, 8, "", {}, [](TrainOptions& o) {
      o.device = "cuda";
      o.gpu = o.comm->rank();
    });
    const auto want = losses(d.path() + "/cpu-fp32-s3"), got = losses(d.path() + "/cuda-w2");
    ASSERT_EQ(got.size(), want.size());
    for (std::size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 2e-4 * want[i]) << "2 GPUs, step " << i + 1;
  }
}

TEST(Trainer, TheGpuPipelineStepsExactlyLikeTheSynchronousPath) {
  // One GPU, stage 3, first without gradient accumulation: the pipelined step (gradients copied down on their
  // own stream as each unit's backward ends, each unit stepped by the optimizer thread as it
  // lands, parameters uploaded on the copy stream into reused buffers) against the synchronous
  // path (gpu_overlap off), and each next forward overlapping the end of the step (its gathers
  // wait for each unit's update). A tight live budget makes the coordinator reuse buffers. Without
  // clipping the runs are bit-identical: the losses and the saved optimizer state. With clipping
  // the norm is summed on the GPU rather than the host, so the clip coefficient may differ in its
  // last bits.
  const kernels::GpuQuery q = kernels::query_gpus();
  if (q.gpus.empty()) GTEST_SKIP() << "no GPU here: " << (q.built_with_cuda ? q.problem : std::string("built without CUDA"));
  ScratchDir d;
  for (const bool bf16 : {true, false}) {
    for (const double clip : {0.0, 1.0}) {
      const auto tweak = [&](Json& ds) { tight_gpu_pipeline(ds, bf16, clip); };
      const std::string tag = fmt::format("{}-clip{}", bf16 ? "bf16" : "fp32", clip);
      train_on_ranks(d.path() + "/sync-" + tag, 1, 3, 6, "", tweak, synchronous([](TrainOptions& o) { o.device = "cuda"; }));
      train_on_ranks(d.path() + "/pipe-" + tag, 1, 3, 6, "", tweak, [](TrainOptions& o) { o.device = "cuda"; });
      const auto want = losses(d.path() + "/sync-" + tag), got = losses(d.path() + "/pipe-" + tag);
      ASSERT_EQ(got.size(), 6u) << tag;
      const std::string f = "/checkpoints/step-00000006/optimizer_state.safetensors";
      if (clip == 0.0) {
        EXPECT_EQ(got, want) << tag;
        EXPECT_TRUE(file_bytes(d.path() + "/sync-" + tag + f) == file_bytes(d.path() + "/pipe-" + tag + f)) << tag;
        // Stopped at step 3 (its checkpoint waits for the step in flight) and resumed: the same.
        train_on_ranks(d.path() + "/resumed-" + tag, 1, 3, 3, "", tweak, [](TrainOptions& o) { o.device = "cuda"; });
        train_on_ranks(d.path() + "/resumed-" + tag, 1, 3, 6, "latest", tweak, [](TrainOptions& o) { o.device = "cuda"; });
        EXPECT_EQ(losses(d.path() + "/resumed-" + tag), want) << tag;
        EXPECT_TRUE(file_bytes(d.path() + "/sync-" + tag + f) == file_bytes(d.path() + "/resumed-" + tag + f)) << tag;
      } else {
        for (std::size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-5 * want[i]) << tag << " step " << i + 1;
      }
    }
  }
  // Gradient accumulation (2 x 2 and 1 x 4): after each micro-batch but the last, each unit's
  // sum so far comes down, and goes back up to be added to the next micro-batch's gradient: the
  // synchronous path's sum in its order. Bit-identical without clipping, across a resume, also
  // with half of the optimizer state on the GPU (whose sums stay there) and with
  // communication_data_type bf16 (ignored: the sums are fp32); with clipping, within the norm's
  // last bits. The GPU's peak stays within the trainer's plan, which counts the uploaded sums.
  // 1 x 4 takes the middle micro-batches' path (add, then copy down) and reuses the uploaded
  // sums' buffers; stage 2 keeps every unit gathered.
  struct Accum {
    double clip, ratio;
    bool bf16_comm;
    int micro, gas, stage;
  };
  for (const Accum a : {Accum{0.0, 1.0, false, 2, 2, 3}, Accum{1.0, 1.0, false, 2, 2, 3}, Accum{0.0, 0.5, true, 2, 2, 3},
                        Accum{0.0, 1.0, false, 1, 4, 3}, Accum{0.0, 0.5, false, 1, 4, 3}, Accum{0.0, 1.0, false, 2, 2, 2}}) {
    const auto tweak = [a](Json& ds) {
      tight_gpu_pipeline(ds, true, a.clip);
      ds["train_micro_batch_size_per_gpu"] = a.micro;
      ds["gradient_accumulation_steps"] = a.gas;
      if (a.ratio < 1.0) ds["zero_optimization"]["offload_optimizer"]["ratio"] = a.ratio;
      if (a.bf16_comm) ds["communication_data_type"] = "bf16";
    };
    const std::string tag = fmt::format("s{}-{}x{}-clip{}-r{}{}", a.stage, a.micro, a.gas, a.clip, a.ratio, a.bf16_comm ? "-bf16comm" : "");
    const auto cuda = [](TrainOptions& o) { o.device = "cuda"; };
    train_on_ranks(d.path() + "/sync-" + tag, 1, a.stage, 6, "", tweak, synchronous(cuda));
    train_on_ranks(d.path() + "/pipe-" + tag, 1, a.stage, 6, "", tweak, cuda);
    const auto want = losses(d.path() + "/sync-" + tag), got = losses(d.path() + "/pipe-" + tag);
    ASSERT_EQ(got.size(), 6u) << tag;
    const Json sum = Json::parse(std::ifstream(d.path() + "/pipe-" + tag + "/summary.json"));
    EXPECT_TRUE(sum["gpu_pipeline"]["enabled"].get<bool>()) << tag;
    EXPECT_EQ(sum["gpu_pipeline"]["gradient_dtype"], "fp32") << tag;
    EXPECT_LE(sum["gpu_memory"]["peak_bytes"].get<double>(), sum["gpu_memory"]["planned_bytes"].get<double>()) << tag;
    if (a.ratio < 1.0) {
      EXPECT_GT(sum["gpu_pipeline"]["gpu_optimizer_units"].get<int>(), 0) << tag;
    }
    const std::string f = "/checkpoints/step-00000006/optimizer_state.safetensors";
    if (a.clip == 0.0) {
      EXPECT_EQ(got, want) << tag;
      EXPECT_TRUE(file_bytes(d.path() + "/sync-" + tag + f) == file_bytes(d.path() + "/pipe-" + tag + f)) << tag;
      train_on_ranks(d.path() + "/resumed-" + tag, 1, a.stage, 3, "", tweak, cuda);
      train_on_ranks(d.path() + "/resumed-" + tag, 1, a.stage, 6, "latest", tweak, cuda);
      EXPECT_EQ(losses(d.path() + "/resumed-" + tag), want) << tag;
    } else {
      for (std::size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-5 * want[i]) << tag << " step " << i + 1;
    }
  }

  // Parameters and optimizer state on NVMe: the read-ahead of the next unit's shard must wait for
  // the step in flight to finish it. Bit-identical to the synchronous path.
  const auto nvme = [&](const std::string& swap) {
    return [swap](Json& ds) {
      one_gpu_pipeline(ds, true, 0.0);
      ds["zero_optimization"] = {{"stage", 3},
                                 {"sub_group_size", 4096},
                                 {"stage3_param_persistence_threshold", 0},
                                 {"offload_optimizer", {{"device", "nvme"}, {"nvme_path", swap}, {"buffer_count", 2}}},
                                 {"offload_param", {{"device", "nvme"}, {"nvme_path", swap}, {"max_in_cpu", 0},
                                                    {"buffer_count", 8}}}};
    };
  };
  train_on_ranks(d.path() + "/nvme-sync", 1, 3, 5, "", nvme(d.sub("swap-sync")), synchronous([](TrainOptions& o) { o.device = "cuda"; }));
  train_on_ranks(d.path() + "/nvme-pipe", 1, 3, 5, "", nvme(d.sub("swap-pipe")), [](TrainOptions& o) { o.device = "cuda"; });
  EXPECT_EQ(losses(d.path() + "/nvme-pipe"), losses(d.path() + "/nvme-sync"));
  const std::string nvme_state = "/checkpoints/step-00000005/optimizer_state.safetensors";
  EXPECT_TRUE(file_bytes(d.path() + "/nvme-sync" + nvme_state) == file_bytes(d.path() + "/nvme-pipe" + nvme_state));

  // communication_data_type bf16: the gradients come down as bf16 and are stepped as such. Close
  // to the fp32-gradient run, not the same, and said in the summary.
  const auto bf16_grads = [](Json& ds) {
    one_gpu_pipeline(ds, true, 1.0);
    ds["communication_data_type"] = "bf16";
  };
  train_on_ranks(d.path() + "/bf16-grads", 1, 3, 6, "", bf16_grads, [](TrainOptions& o) { o.device = "cuda"; });
  const auto want = losses(d.path() + "/pipe-bf16-clip1"), got = losses(d.path() + "/bf16-grads");
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 2e-3 * want[i]) << "step " << i + 1;
  const std::string state = "/checkpoints/step-00000006/optimizer_state.safetensors";
  EXPECT_FALSE(file_bytes(d.path() + "/bf16-grads" + state) == file_bytes(d.path() + "/pipe-bf16-clip1" + state));
  const Json sum = Json::parse(std::ifstream(d.path() + "/bf16-grads/summary.json"));
  EXPECT_EQ(sum["gpu_pipeline"]["gradient_dtype"], "bf16");
  EXPECT_EQ(sum["gpu_pipeline"]["enabled"], true);
  EXPECT_EQ(sum["gpu_pipeline"]["gradients_in_parameter_shards"], true);
  // bf16 gradients land in the bf16 parameter shards they are about to replace. Against parameters
  // on NVMe (own gradient shards: the staging buffers are not theirs), the same bits, and across a
  // resume.
  const auto landing = [&](const std::string& swap) {
    return [swap](Json& ds) {
      one_gpu_pipeline(ds, true, 0.0);
      ds["communication_data_type"] = "bf16";
      ds["zero_optimization"]["stage3_max_live_parameters"] = 20000;
      ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0;
      if (!swap.empty()) {
        ds["zero_optimization"]["offload_param"] = {{"device", "nvme"}, {"nvme_path", swap}, {"max_in_cpu", 0},
                                                    {"buffer_count", 8}};
      }
    };
  };
  train_on_ranks(d.path() + "/land-own", 1, 3, 6, "", landing(d.sub("swap-land")), [](TrainOptions& o) { o.device = "cuda"; });
  train_on_ranks(d.path() + "/land-in-params", 1, 3, 6, "", landing(""), [](TrainOptions& o) { o.device = "cuda"; });
  train_on_ranks(d.path() + "/land-resumed", 1, 3, 3, "", landing(""), [](TrainOptions& o) { o.device = "cuda"; });
  train_on_ranks(d.path() + "/land-resumed", 1, 3, 6, "latest", landing(""), [](TrainOptions& o) { o.device = "cuda"; });
  const auto own = losses(d.path() + "/land-own");
  ASSERT_EQ(own.size(), 6u);
  EXPECT_EQ(losses(d.path() + "/land-in-params"), own);
  EXPECT_EQ(losses(d.path() + "/land-resumed"), own);
  EXPECT_TRUE(file_bytes(d.path() + "/land-own" + state) == file_bytes(d.path() + "/land-in-params" + state));
  EXPECT_TRUE(file_bytes(d.path() + "/land-own" + state) == file_bytes(d.path() + "/land-resumed" + state));
  EXPECT_EQ(Json::parse(std::ifstream(d.path() + "/land-own/summary.json"))["gpu_pipeline"]["gradients_in_parameter_shards"],
            false);
}

TEST(Trainer, TheGpuPipelineOnTwoGpusStepsExactlyLikeTheSynchronousPath) {
  // Two GPUs at stage 3: each unit's parameters all-gathered and its gradient reduce-scattered
  // over NCCL, GPU to GPU, each rank copying down and stepping its own shard, against the
  // synchronous path (host collectives over Gloo). A sum of two gradients is the same either way:
  // without clipping the runs are bit-identical (the losses, and both ranks' saved state), also
  // across a resume; with clipping the norm is summed on the GPU, within rounding. A tight live
  // budget makes the coordinator reuse buffers; the memory plan bounds the peak.
  const kernels::GpuQuery q = kernels::query_gpus();
  std::string why;
  if (q.gpus.size() < 2 || !nccl_usable(&why)) {
    GTEST_SKIP() << "needs 2 GPUs and NCCL: "
                 << (q.gpus.size() < 2 ? fmt::format("{} GPU(s) visible{}", q.gpus.size(), q.problem.empty() ? "" : ": " + q.problem)
                                       : why);
  }
  ScratchDir d;
  const auto cuda2 = [](TrainOptions& o) {
    o.device = "cuda";
    o.gpu = o.comm->rank();
  };
  const auto state = [](int rank, int step) {
    return fmt::format("/checkpoints/step-{:08d}/optimizer_state.rank{:05d}-of-00002.safetensors", step, rank);
  };
  for (const bool bf16 : {true, false}) {
    for (const double clip : {0.0, 1.0}) {
      const auto tweak = [&](Json& ds) { tight_gpu_pipeline(ds, bf16, clip); };
      const std::string tag = fmt::format("{}-clip{}", bf16 ? "bf16" : "fp32", clip);
      train_on_ranks(d.path() + "/sync-" + tag, 2, 3, 6, "", tweak, synchronous(cuda2));
      train_on_ranks(d.path() + "/pipe-" + tag, 2, 3, 6, "", tweak, cuda2);
      const auto want = losses(d.path() + "/sync-" + tag), got = losses(d.path() + "/pipe-" + tag);
      ASSERT_EQ(got.size(), 6u) << tag;
      const Json s = Json::parse(std::ifstream(d.path() + "/pipe-" + tag + "/summary.json"));
      EXPECT_EQ(s["gpu_pipeline"]["enabled"], true) << tag;
      EXPECT_EQ(s["gpu_pipeline"]["gpus"], 2) << tag;
      EXPECT_EQ(s["gpu_pipeline"]["gpu_collectives"], "nccl") << tag;
      EXPECT_LE(s["gpu_memory"]["peak_bytes"].get<std::uint64_t>(), s["gpu_memory"]["planned_bytes"].get<std::uint64_t>()) << tag;
      EXPECT_EQ(Json::parse(std::ifstream(d.path() + "/sync-" + tag + "/summary.json"))["gpu_pipeline"]["gpu_collectives"], "none");
      if (clip == 0.0) {
        EXPECT_EQ(got, want) << tag;
        for (int r = 0; r < 2; ++r) {
          EXPECT_TRUE(file_bytes(d.path() + "/sync-" + tag + state(r, 6)) == file_bytes(d.path() + "/pipe-" + tag + state(r, 6)))
              << tag << " rank " << r;
        }
        train_on_ranks(d.path() + "/resumed-" + tag, 2, 3, 3, "", tweak, cuda2);
        train_on_ranks(d.path() + "/resumed-" + tag, 2, 3, 6, "latest", tweak, cuda2);
        EXPECT_EQ(losses(d.path() + "/resumed-" + tag), want) << tag;
        for (int r = 0; r < 2; ++r) {
          EXPECT_TRUE(file_bytes(d.path() + "/sync-" + tag + state(r, 6)) == file_bytes(d.path() + "/resumed-" + tag + state(r, 6)))
              << tag << " rank " << r;
        }
      } else {
        for (std::size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-5 * want[i]) << tag << " step " << i + 1;
      }
    }
  }
  // bf16 gradients (reduced in fp32, this rank's shard rounded, landing in its parameter shard):
  // close to the fp32-gradient run.
  train_on_ranks(d.path() + "/bf16-grads", 2, 3, 6, "", [](Json& ds) {
    one_gpu_pipeline(ds, true, 0.0);
    ds["communication_data_type"] = "bf16";
  }, cuda2);
  const auto want = losses(d.path() + "/pipe-bf16-clip0"), got = losses(d.path() + "/bf16-grads");
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 2e-3 * want[i]) << "step " << i + 1;
  const Json sum = Json::parse(std::ifstream(d.path() + "/bf16-grads/summary.json"));
  EXPECT_EQ(sum["gpu_pipeline"]["gradient_dtype"], "bf16");
  EXPECT_EQ(sum["gpu_pipeline"]["gradients_in_parameter_shards"], true);
  // Three GPUs, where there are: the units (multiples of 64 elements) do not split into 3 equal
  // shards, so the padded gathers and reductions are exercised; a sum of three may be added in
  // another order than the host's, so within rounding.
  if (q.gpus.size() >= 3) {
    const auto tweak = [](Json& ds) { tight_gpu_pipeline(ds, true, 0.0); };
    train_on_ranks(d.path() + "/sync-w3", 3, 3, 6, "", tweak, synchronous(cuda2));
    train_on_ranks(d.path() + "/pipe-w3", 3, 3, 6, "", tweak, cuda2);
    const auto w3 = losses(d.path() + "/sync-w3"), p3 = losses(d.path() + "/pipe-w3");
    ASSERT_EQ(p3.size(), 6u);
    for (std::size_t i = 0; i < w3.size(); ++i) EXPECT_NEAR(p3[i], w3[i], 1e-5 * w3[i]) << "3 GPUs, step " << i + 1;
    EXPECT_EQ(Json::parse(std::ifstream(d.path() + "/pipe-w3/summary.json"))["gpu_pipeline"]["gpus"], 3);
  }
}

TEST(Trainer, TheGpuShareOfTheOptimizerStepsExactlyLikeTheHost) {
  // offload_optimizer.ratio < 1 with device cpu: the first units' optimizer state lives on the GPU
  // and is stepped there with the CPU kernels' arithmetic. Against the synchronous path, which
  // steps everything on the host: bit-identical losses and saved optimizer state (the GPU's share
  // is copied back for the checkpoint), across a resume, for half the state on the GPU and for
  // all of it; with clipping, within the norm's last bits; with bf16 gradients, identical to the
  // pipeline without a GPU share.
  const kernels::GpuQuery q = kernels::query_gpus();
  if (q.gpus.empty()) GTEST_SKIP() << "no GPU here: " << (q.built_with_cuda ? q.problem : std::string("built without CUDA"));
  ScratchDir d;
  const auto cuda = [](TrainOptions& o) { o.device = "cuda"; };
  const auto config = [](bool bf16, double clip, double ratio, bool bf16_grads) {
    return [=](Json& ds) {
      one_gpu_pipeline(ds, bf16, clip);
      ds["zero_optimization"]["stage3_max_live_parameters"] = 20000;
      ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0;
      ds["zero_optimization"]["offload_optimizer"]["ratio"] = ratio;
      if (bf16_grads) ds["communication_data_type"] = "bf16";
    };
  };
  const std::string f6 = "/checkpoints/step-00000006/optimizer_state.safetensors";
  for (const bool bf16 : {true, false}) {
    for (const double ratio : {0.5, 0.0}) {
      const std::string tag = fmt::format("{}-r{}", bf16 ? "bf16" : "fp32", ratio);
      train_on_ranks(d.path() + "/sync-" + tag, 1, 3, 6, "", config(bf16, 0.0, ratio, false), synchronous(cuda));
      train_on_ranks(d.path() + "/share-" + tag, 1, 3, 6, "", config(bf16, 0.0, ratio, false), cuda);
      const auto want = losses(d.path() + "/sync-" + tag);
      ASSERT_EQ(want.size(), 6u) << tag;
      EXPECT_EQ(losses(d.path() + "/share-" + tag), want) << tag;
      EXPECT_TRUE(file_bytes(d.path() + "/sync-" + tag + f6) == file_bytes(d.path() + "/share-" + tag + f6)) << tag;
      const Json sum = Json::parse(std::ifstream(d.path() + "/share-" + tag + "/summary.json"));
      const Json sync = Json::parse(std::ifstream(d.path() + "/sync-" + tag + "/summary.json"));
      EXPECT_GT(sum["gpu_pipeline"]["gpu_optimizer_units"].get<int>(), 0) << tag;
      EXPECT_EQ(sync["gpu_pipeline"]["gpu_optimizer_units"].get<int>(), 0) << tag << ": no pipeline, no GPU share";
      if (ratio == 0.0) {
        EXPECT_GE(sum["gpu_pipeline"]["gpu_optimizer_elements"].get<std::int64_t>(),
                  sum["model"]["parameters"].get<std::int64_t>()) << tag << ": all of it (with the units' padding)";
      }
      const Json g = sum["gpu_memory"];
      EXPECT_GT(g["planned"]["optimizer_share"].get<std::uint64_t>(), 0u) << tag;
      EXPECT_LE(g["peak_bytes"].get<std::uint64_t>(), g["planned_bytes"].get<std::uint64_t>()) << tag;
      if (bf16 && ratio == 0.5) {
        // Stopped at step 3 and resumed: the GPU's share goes to the checkpoint and comes back.
        train_on_ranks(d.path() + "/resumed-" + tag, 1, 3, 3, "", config(bf16, 0.0, ratio, false), cuda);
        train_on_ranks(d.path() + "/resumed-" + tag, 1, 3, 6, "latest", config(bf16, 0.0, ratio, false), cuda);
        EXPECT_EQ(losses(d.path() + "/resumed-" + tag), want) << tag;
        EXPECT_TRUE(file_bytes(d.path() + "/sync-" + tag + f6) == file_bytes(d.path() + "/resumed-" + tag + f6)) << tag;
      }
    }
  }
  // Clipping: every step waits for the norm, summed on the GPU here and on the host there.
  train_on_ranks(d.path() + "/sync-clip", 1, 3, 6, "", config(true, 1.0, 0.5, false), synchronous(cuda));
  train_on_ranks(d.path() + "/share-clip", 1, 3, 6, "", config(true, 1.0, 0.5, false), cuda);
  const auto want = losses(d.path() + "/sync-clip"), got = losses(d.path() + "/share-clip");
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-5 * want[i]) << "step " << i + 1;
  // bf16 gradients: the GPU's units step with the same rounded gradients as the host's would.
  train_on_ranks(d.path() + "/bf16g-host", 1, 3, 6, "", config(true, 1.0, 1.0, true), cuda);
  train_on_ranks(d.path() + "/bf16g-share", 1, 3, 6, "", config(true, 1.0, 0.5, true), cuda);
  EXPECT_EQ(losses(d.path() + "/bf16g-share"), losses(d.path() + "/bf16g-host"));
  EXPECT_TRUE(file_bytes(d.path() + "/bf16g-host" + f6) == file_bytes(d.path() + "/bf16g-share" + f6));
}

TEST(Trainer, TheGpuMemoryLimitIsPlannedHeldAndRefusedWithTheNumbers) {
  // --gpu-memory-limit: the plan (an upper bound) is checked at start-up; the backend counts every
  // allocation against the limit; the peak stays within both. Stages 3 (pipeline) and 0.
  const kernels::GpuQuery q = kernels::query_gpus();
  if (q.gpus.empty()) GTEST_SKIP() << "no GPU here: " << (q.built_with_cuda ? q.problem : std::string("built without CUDA"));
  ScratchDir d;
  // (Stage 3 also with bf16 gradients, whose fp32 buffers are freed as soon as they are rounded.)
  for (const int variant : {3, 0, 4}) {
    const bool bf16_grads = variant == 4;
    const int stage = bf16_grads ? 3 : variant;
    const auto tweak = [&](Json& ds) {
      one_gpu_pipeline(ds, true, std::nullopt);
      ds["zero_optimization"]["stage3_max_live_parameters"] = 20000;
      if (bf16_grads) ds["communication_data_type"] = "bf16";
    };
    const std::string free = fmt::format("{}/free-v{}", d.path(), variant);
    train_on_ranks(free, 1, stage, 2, "", tweak, [](TrainOptions& o) { o.device = "cuda"; });
    const Json g = Json::parse(std::ifstream(free + "/summary.json"))["gpu_memory"];
    const auto planned = g["planned_bytes"].get<std::uint64_t>(), peak = g["peak_bytes"].get<std::uint64_t>();
    EXPECT_EQ(g["limit_bytes"].get<std::uint64_t>(), 0u);
    EXPECT_GT(peak, 0u);
    EXPECT_LE(peak, planned) << "stage " << stage << ": the plan is an upper bound";
    // The metrics report the same peak: the CSV's last gpu_mem_bytes, and summary.json's.
    const auto rows = read_csv(free + "/training_metrics.csv");
    EXPECT_EQ(std::stoull(rows.back()[column(rows, "gpu_mem_bytes")]), peak);
    EXPECT_EQ(Json::parse(std::ifstream(free + "/summary.json"))["peak_memory_bytes"]["gpu"].get<std::uint64_t>(), peak);
    // Limited to the plan: trains, within it.
    const std::string capped = fmt::format("{}/capped-v{}", d.path(), variant);
    train_on_ranks(capped, 1, stage, 2, "", tweak, [&](TrainOptions& o) {
      o.device = "cuda";
      o.gpu_memory_limit = planned;
    });
    const Json c = Json::parse(std::ifstream(capped + "/summary.json"))["gpu_memory"];
    EXPECT_LE(c["peak_bytes"].get<std::uint64_t>(), planned);
    EXPECT_EQ(losses(capped), losses(free));
    // Below the plan: refused at start-up, with the plan in the message.
    try {
      train_on_ranks(d.path() + "/small", 1, stage, 2, "", tweak, [&](TrainOptions& o) {
        o.device = "cuda";
        o.gpu_memory_limit = planned - 1;
      });
      ADD_FAILURE() << "a limit below the plan was accepted";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("does not fit --gpu-memory-limit"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("activations"), std::string::npos) << e.what();
    }
  }
}

TEST(Trainer, ShardedResumeIsBitIdenticalAndReshardsToOtherRanks) {
  ScratchDir d;
  train_on_ranks(d.path() + "/straight", 2, 2, 8);
  train_on_ranks(d.path() + "/split", 2, 2, 4);
  train_on_ranks(d.path() + "/split", 2, 2, 8, "latest");
  const std::vector<double> want = losses(d.path() + "/straight");
  EXPECT_EQ(want, losses(d.path() + "/split"));
  for (int r = 0; r < 2; ++r) {
    const std::string f = fmt::format("/checkpoints/step-00000008/optimizer_state.rank{:05d}-of-00002.safetensors", r);
    EXPECT_TRUE(file_bytes(d.path() + "/straight" + f) == file_bytes(d.path() + "/split" + f)) << f;
  }
  // The step-4 checkpoint of 2 shards resumes on 4 ranks (stage 3), on 1 rank (stage 0, one whole
  // copy), and a whole copy resumes on 2 ranks: the same global batch, the same losses within the
  // rounding of another reduction order.
  const std::string step4 = d.path() + "/split/checkpoints/step-00000004";
  train_on_ranks(d.path() + "/w1-s0", 1, 0, 4);
  const struct {
    std::string name, from;
    int w, stage;
  } cases[] = {{"to-w4-s3", step4, 4, 3}, {"to-w1-s0", step4, 1, 0},
               {"from-whole-to-w2-s3", d.path() + "/w1-s0/checkpoints/step-00000004", 2, 3}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    train_on_ranks(d.path() + "/" + c.name, c.w, c.stage, 8, c.from);
    const std::vector<double> got = losses(d.path() + "/" + c.name);
    ASSERT_EQ(got.size(), 4u);
    for (std::size_t i = 0; i < 4; ++i) EXPECT_NEAR(got[i], want[4 + i], 2e-5 * want[4 + i]) << "step " << 5 + i;
  }
  // Another global batch is refused with the arithmetic.
  EXPECT_IO_ERROR(train_on_ranks(d.path() + "/split", 4, 2, 10, "latest",
                                 [](Json& ds) { ds["gradient_accumulation_steps"] = 2; }),
                  "global batch of 4 samples", "this run's is 8");
  // A missing piece is named, by the ranks that need it; the others stop with them, naming them
  // (no rank goes on to wait in a collective for a peer that has gone).
  fs::remove(d.path() + "/split/checkpoints/step-00000008/checksums.rank00001-of-00002.json");
  EXPECT_IO_ERROR(train_on_ranks(d.path() + "/split", 2, 2, 10, "latest"), "rank 1: checkpoint",
                  "lacks rank 1's piece", "rank 0: rank 0: rank(s) 1 could not resume");
  EXPECT_IO_ERROR(train_on_ranks(d.path() + "/split", 4, 3, 10, "latest"), "lacks rank 1's piece",
                  "rank 0: rank 0: rank(s) 2, 3 could not resume");
}

TEST(Trainer, KeepLastAndInterruptedSavesLeaveAUsableCheckpoint) {
  ScratchDir d;
  TrainRun r(d.path() + "/run");
  r.o.max_steps = 8;
  r.o.save_every = 2;
  r.o.keep_last = 2;
  train(r.o);
  std::vector<std::string> dirs;
  for (const auto& e : fs::directory_iterator(r.o.output_dir + "/checkpoints")) dirs.push_back(e.path().filename());
  std::sort(dirs.begin(), dirs.end());
  EXPECT_EQ(dirs, (std::vector<std::string>{"latest", "step-00000006", "step-00000008"}));
  // A crash in the middle of the next save leaves a .partial directory; latest still works.
  fs::create_directories(r.o.output_dir + "/checkpoints/step-00000010.partial");
  std::ofstream(r.o.output_dir + "/checkpoints/step-00000010.partial/optimizer_state.safetensors") << "torn";
  TrainRun again(r.o.output_dir);
  again.o.max_steps = 10;
  again.o.resume = "latest";
  EXPECT_EQ(train(again.o).steps, 10);
  EXPECT_FALSE(fs::exists(r.o.output_dir + "/checkpoints/step-00000010.partial"));
}

TEST(Trainer, ResumingAnEarlierCheckpointReplacesTheLaterHistory) {
  ScratchDir d;
  TrainRun r(d.path() + "/run");
  r.o.max_steps = 8;
  r.o.save_every = 2;
  train(r.o);
  // A fresh run into the same directory is refused, and changes nothing.
  const auto csv_before = file_bytes(r.o.output_dir + "/training_metrics.csv");
  TrainRun fresh(r.o.output_dir);
  EXPECT_IO_ERROR(train(fresh.o), "already holds a run with checkpoints");
  EXPECT_TRUE(file_bytes(r.o.output_dir + "/training_metrics.csv") == csv_before);
  // Resume at or past the end: nothing to train, nothing rewritten.
  TrainRun done(r.o.output_dir);
  done.o.max_steps = 8;
  done.o.resume = "latest";
  EXPECT_EQ(train(done.o).steps, 8);
  EXPECT_TRUE(file_bytes(r.o.output_dir + "/training_metrics.csv") == csv_before);
  // Resume from step 4 (steps 6 and 8 exist from the first run and are replaced in place); a torn
  // line at the end of the CSV is dropped with the rows after step 4.
  std::ofstream(r.o.output_dir + "/training_metrics.csv", std::ios::app) << "9,0.1,torn";
  TrainRun again(r.o.output_dir);
  again.o.resume = r.o.output_dir + "/checkpoints/step-00000004";
  again.o.max_steps = 8;
  again.o.save_every = 2;
  train(again.o);
  const auto rows = read_csv(r.o.output_dir + "/training_metrics.csv");
  ASSERT_EQ(rows.size(), 9u);
  for (std::size_t i = 1; i < rows.size(); ++i) EXPECT_EQ(rows[i][0], std::to_string(i));
  // The same steps from the same state: the replaced checkpoint is bit-identical to the first.
  TrainRun straight(d.path() + "/straight");
  straight.o.max_steps = 8;
  train(straight.o);
  EXPECT_TRUE(file_bytes(straight.o.output_dir + "/checkpoints/step-00000008/optimizer_state.safetensors") ==
              file_bytes(r.o.output_dir + "/checkpoints/step-00000008/optimizer_state.safetensors"));
  for (const auto& e : fs::directory_iterator(r.o.output_dir + "/checkpoints")) {
    EXPECT_EQ(e.path().filename().string().find('.'), std::string::npos) << "leftover " << e.path();
  }
}

// trainer_state.json carries its own checksum: a hand-edited step or data position is refused, not
// resumed into another run. Two runs into one output directory: the second is refused while the
// first holds it.
TEST(Trainer, AnEditedManifestAndABusyOutputDirectoryAreRefused) {
  ScratchDir d;
  TrainRun r(d.path() + "/run");
  r.o.max_steps = 2;
  train(r.o);
  const std::string state = r.o.output_dir + "/checkpoints/step-00000002/trainer_state.json";
  Json s = Json::parse(std::ifstream(state));
  ASSERT_TRUE(s.contains("manifest_xxh3"));
  s["step"] = 1;
  std::ofstream(state) << s.dump(2) << "\n";
  TrainRun edited(r.o.output_dir);
  edited.o.max_steps = 4;
  edited.o.resume = "latest";
  EXPECT_IO_ERROR(train(edited.o), "does not match its own checksum");
  // A run holding the directory (as a live `zinf train` does): a second is refused, nothing written.
  DirectoryLock held(d.path() + "/busy", "the output directory");
  TrainRun second(d.path() + "/busy");
  second.o.max_steps = 1;
  EXPECT_IO_ERROR(train(second.o), "in use by another zinf run");
  EXPECT_FALSE(fs::exists(d.path() + "/busy/checkpoints"));
}

TEST(Trainer, DamagedOrMismatchedCheckpointsAreClearErrors) {
  ScratchDir d;
  TrainRun r(d.path() + "/run");
  r.o.max_steps = 2;
  train(r.o);
  const std::string ck = r.o.output_dir + "/checkpoints/step-00000002";
  // Another model shape.
  TrainRun other(r.o.output_dir);
  Json m = tiny_model();
  m["num_hidden_layers"] = 3;
  other.o.model = parse_model_config(m, "tiny3");
  other.o.resume = ck;
  EXPECT_IO_ERROR(train(other.o), "is for another model shape");
  // Another sequence length.
  TrainRun seq(r.o.output_dir);
  seq.o.seq_len = 16;
  seq.o.resume = ck;
  EXPECT_IO_ERROR(train(seq.o), "--seq-len 32");
  // Another batch, precision or data.
  TrainRun batch(r.o.output_dir, [] {
    Json j = ds_json(nullptr);
    j["train_micro_batch_size_per_gpu"] = 4;
    return j;
  }());
  batch.o.resume = ck;
  EXPECT_IO_ERROR(train(batch.o), "global batch of 4 samples (micro-batch 2 x 2 accumulation steps x 1 rank(s)), this run's is 8");
  TrainRun fp32(r.o.output_dir, ds_json(nullptr, false));
  fp32.o.resume = ck;
  EXPECT_IO_ERROR(train(fp32.o), "trained in bf16, not fp32");
  TrainRun data(r.o.output_dir);
  data.o.eval_fraction = 0.1;
  data.o.resume = ck;
  EXPECT_IO_ERROR(train(data.o), "resume with the same data");
  // A flipped byte in the state.
  const std::string st = ck + "/optimizer_state.safetensors";
  auto bytes = file_bytes(st);
  bytes[bytes.size() - 7] ^= std::byte{0x10};
  std::ofstream(st, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  TrainRun damaged(r.o.output_dir);
  damaged.o.resume = "latest";
  EXPECT_IO_ERROR(train(damaged.o), "does not match its checksum");
  // No checkpoint at all.
  TrainRun none(d.path() + "/empty");
  none.o.resume = "latest";
  EXPECT_IO_ERROR(train(none.o), "no checkpoint in");
}

TEST(Trainer, EverySchedulesLrReachesTheMetrics) {
  const std::vector<Json> schedulers = {
      {{"type", "WarmupLR"}, {"params", {{"warmup_min_lr", 0.0}, {"warmup_max_lr", 3e-3}, {"warmup_num_steps", 4}}}},
      {{"type", "WarmupDecayLR"},
       {"params", {{"warmup_min_lr", 1e-4}, {"warmup_max_lr", 3e-3}, {"warmup_num_steps", 3}, {"total_num_steps", 8}}}},
      {{"type", "WarmupCosineLR"}, {"params", {{"warmup_num_steps", 3}, {"total_num_steps", 8}}}},
      {{"type", "OneCycle"},
       {"params", {{"cycle_min_lr", 1e-4}, {"cycle_max_lr", 3e-3}, {"cycle_first_step_size", 3}}}},
      {{"type", "LRRangeTest"}, {"params", {{"lr_range_test_min_lr", 1e-4}, {"lr_range_test_step_size", 2}}}},
  };
  for (const Json& s : schedulers) {
    ScratchDir d;
    TrainRun r(d.path() + "/run", ds_json(s));
    r.o.max_steps = 8;
    r.o.eval_every = 0;
    train(r.o);
    const LrSchedule want(r.o.ds.scheduler, r.o.ds.optimizer.lr);
    const auto rows = read_csv(r.o.output_dir + "/training_metrics.csv");
    ASSERT_EQ(rows.size(), 9u);
    for (std::int64_t step = 0; step < 8; ++step) {
      const double lr = std::stod(rows[static_cast<std::size_t>(step + 1)][column(rows, "lr")]);
      const double expect = step == 0 ? want.initial_lr() : want.lr_at(step - 1);
      EXPECT_NEAR(lr, expect, 1e-6 * std::max(1e-3, expect)) << s["type"] << " step " << step;
    }
  }
}

TEST(Trainer, AStopRequestSavesAndResumes) {
  ScratchDir d;
  TrainRun r(d.path() + "/run");
  int polls = 0;
  r.o.stop_requested = [&polls] { return ++polls >= 4; };  // once before the first step, then after each
  const TrainResult res = train(r.o);
  EXPECT_TRUE(res.stopped_early);
  EXPECT_EQ(res.steps, 3);
  TrainRun again(r.o.output_dir);
  again.o.resume = "latest";
  EXPECT_EQ(train(again.o).steps, 20);
  // A stop asked for during the set-up: no step, no checkpoint; resumed, the same checkpoint.
  TrainRun early(d.path() + "/early");
  early.o.stop_requested = [] { return true; };
  const TrainResult none = train(early.o);
  EXPECT_TRUE(none.stopped_early);
  EXPECT_EQ(none.steps, 0);
  EXPECT_TRUE(std::isnan(none.final_loss));
  EXPECT_FALSE(fs::exists(d.path() + "/early/checkpoints"));
  TrainRun resumed(r.o.output_dir);
  resumed.o.resume = "latest";
  resumed.o.max_steps = 30;
  resumed.o.stop_requested = [] { return true; };
  const TrainResult same = train(resumed.o);
  EXPECT_EQ(same.steps, 20);
  EXPECT_NE(same.last_checkpoint.find("step-00000020"), std::string::npos) << same.last_checkpoint;
}

TEST(LossScaler, FollowsDeepSpeedsDynamicRule) {
  config::Fp16Config c;
  c.enabled = true;
  c.initial_scale_power = 4;  // 16
  c.loss_scale_window = 3;
  c.hysteresis = 2;
  c.min_loss_scale = 2;
  LossScaler s(c);
  EXPECT_TRUE(s.dynamic());
  EXPECT_EQ(s.scale(), 16.0);
  // DeepSpeed's update_scale, step by step. Iteration 0 clean: (0 - (-1)) % 3 = 1 -> no growth.
  s.update(false);
  EXPECT_EQ(s.scale(), 16.0);
  s.update(false);  // it 1: 2 % 3
  EXPECT_EQ(s.scale(), 16.0);
  s.update(false);  // it 2: 3 % 3 == 0 -> doubles
  EXPECT_EQ(s.scale(), 32.0);
  s.update(true);  // it 3: overflow, hysteresis 2 -> 1, scale kept
  EXPECT_EQ(s.scale(), 32.0);
  EXPECT_EQ(s.state().hysteresis, 1);
  s.update(true);  // it 4: overflow with hysteresis 1 -> halves
  EXPECT_EQ(s.scale(), 16.0);
  s.update(false);  // it 5: (5 - 4) % 3
  s.update(false);  // it 6
  EXPECT_EQ(s.state().hysteresis, 1) << "restored only when the scale grows (not consecutive)";
  s.update(false);  // it 7: (7 - 4) % 3 == 0 -> doubles, hysteresis back to 2
  EXPECT_EQ(s.scale(), 32.0);
  EXPECT_EQ(s.state().hysteresis, 2);
  // Down to the minimum, then an overflow there ends the run.
  for (int i = 0; i < 8 && s.scale() > 2.0; ++i) s.update(true);
  EXPECT_EQ(s.scale(), 2.0);
  EXPECT_EQ(s.state().hysteresis, 1) << "an overflow never refills the hysteresis";
  EXPECT_THROW(s.update(true), Error);  // an overflow at the minimum ends the run
  // Static scale: never changes.
  config::Fp16Config st;
  st.enabled = true;
  st.loss_scale = 128;
  LossScaler fixed(st);
  EXPECT_FALSE(fixed.dynamic());
  fixed.update(true);
  fixed.update(false);
  EXPECT_EQ(fixed.scale(), 128.0);
}

TEST(LossScaler, BelowTheMinimumRisesToItAndDamagedStatesAreRefused) {
  config::Fp16Config c;
  c.enabled = true;
  c.initial_scale_power = 0;  // 1, below the minimum of 2: DeepSpeed's max(scale / 2, min) gives 2
  c.hysteresis = 1;
  c.min_loss_scale = 2;
  LossScaler s(c);
  s.update(true);
  EXPECT_EQ(s.scale(), 2.0);
  EXPECT_THROW(s.update(true), Error);
  EXPECT_THROW(s.set_state({0.0, 3, 1, 1}), Error);
  EXPECT_THROW(s.set_state({8.0, 3, 1, 0}), Error);
  s.set_state({8.0, 3, 1, 1});
  EXPECT_EQ(s.scale(), 8.0);
}

TEST(LossScaler, ConsecutiveHysteresisRefillsOnEveryCleanStep) {
  config::Fp16Config c;
  c.enabled = true;
  c.initial_scale_power = 4;
  c.loss_scale_window = 100;
  c.hysteresis = 2;
  c.consecutive_hysteresis = true;
  LossScaler s(c);
  s.update(true);  // hysteresis 2 -> 1
  s.update(false);  // refilled to 2
  s.update(true);  // 2 -> 1 again, scale kept
  EXPECT_EQ(s.scale(), 16.0);
  s.update(true);  // now halves
  EXPECT_EQ(s.scale(), 8.0);
}

TEST(Trainer, Fp16SkipsOverflowingStepsAndAdaptsTheScale) {
  ScratchDir d;
  Json ds = ds_json(Json{{"type", "WarmupLR"}, {"params", {{"warmup_min_lr", 0.0}, {"warmup_max_lr", 3e-3}, {"warmup_num_steps", 5}}}}, false);
  ds["fp16"] = {{"enabled", true}, {"initial_scale_power", 10}, {"loss_scale_window", 4}, {"hysteresis", 2}};
  TrainRun r(d.path() + "/run", ds);
  r.o.max_steps = 12;
  r.o.eval_every = 0;
  // Overflows injected at steps 3, 4 and 5.
  r.o.after_backward = [](std::int64_t step, const std::vector<void*>& g) {
    if (step >= 3 && step <= 5) static_cast<float*>(g[1])[7] = INFINITY;
  };
  const TrainResult res = train(r.o);
  EXPECT_EQ(res.steps, 12);
  const auto rows = read_csv(r.o.output_dir + "/training_metrics.csv");
  std::vector<std::string> scale, skipped, lr;
  for (std::size_t i = 1; i < rows.size(); ++i) {
    scale.push_back(rows[i][column(rows, "loss_scale")]);
    skipped.push_back(rows[i][column(rows, "skipped")]);
    lr.push_back(rows[i][column(rows, "lr")]);
  }
  // The scale used by each step. Window 4 from iteration 0: (it + 1) % 4 == 0 doubles at it 3,
  // but it 3..5 overflow: it 2 hysteresis 2->1 (step 3), it 3 halves (step 4), it 4 halves (5).
  EXPECT_EQ(skipped, (std::vector<std::string>{"0", "0", "1", "1", "1", "0", "0", "0", "0", "0", "0", "0"}));
  EXPECT_EQ(scale, (std::vector<std::string>{"1024", "1024", "1024", "1024", "512", "256", "256", "256", "256", "512",
                                             "512", "512"}));
  // The schedule stands still over skipped steps: steps 3-6 use the lr of applied step 2.
  EXPECT_EQ(lr[2], lr[3]);
  EXPECT_EQ(lr[3], lr[4]);
  EXPECT_EQ(lr[4], lr[5]);
  EXPECT_NE(lr[5], lr[6]);
  EXPECT_TRUE(std::isfinite(res.final_loss));
  EXPECT_LT(res.final_loss, res.first_loss);
}

TEST(Trainer, BadInputsAreClearErrors) {
  ScratchDir d;
  TrainRun r(d.path() + "/run");
  Json m = tiny_model();
  m["vocab_size"] = 100;
  r.o.model = parse_model_config(m, "small-vocab");
  EXPECT_IO_ERROR(train(r.o), "holds token");
  TrainRun lion(d.path() + "/lion", [] {
    Json j = ds_json(nullptr);
    j["optimizer"] = {{"type", "Lion"}, {"params", {{"lr", 1e-4}}}};
    return j;
  }());
  EXPECT_IO_ERROR(train(lion.o), "not available in the trainer yet");
}

// ---------------------------------------------------------------------------------------------
// LoRA (docs/lora.md)

LoraConfig test_lora(double dropout = 0.1) {
  LoraConfig c;
  c.rank = 4;
  c.alpha = 8;
  c.dropout = dropout;
  c.targets = parse_lora_targets("all-linear");
  return c;
}

// The bf16 base as loaded: each unit's values from the seeded initialisation, rounded.
std::vector<std::uint16_t> seeded_bf16_unit(const ModelConfig& model, std::size_t u, std::uint64_t seed) {
  const ModelLayout layout = make_layout(model);
  std::vector<float> f(static_cast<std::size_t>(layout.units[u].numel));
  init_unit(model, layout.units[u], seed, f);
  std::vector<std::uint16_t> b(f.size());
  kernels::cpu::convert(f.data(), kernels::cpu::DType::kF32, b.data(), kernels::cpu::DType::kBF16, f.size());
  return b;
}

TEST(Trainer, LoraTrainsOnlyTheAdaptersAndLeavesTheBaseBitIdentical) {
  ScratchDir d;
  for (const int stage : {1, 3}) {
    Json ds = ds_json(nullptr);
    ds["zero_optimization"] = {{"stage", stage}, {"offload_optimizer", {{"device", "cpu"}}}};
    if (stage == 3) {
      ds["zero_optimization"]["offload_param"] = {{"device", "nvme"}, {"nvme_path", d.sub("swap")}, {"max_in_cpu", 0}};
    }
    const std::string tag = fmt::format("s{}", stage);
    TrainRun r(d.path() + "/lora-" + tag, ds);
    r.o.lora = test_lora();
    r.o.max_steps = 30;
    std::size_t inspected = 0;
    r.o.inspect_base = [&](std::size_t u, std::span<const std::uint16_t> shard, std::span<const std::uint16_t> copy) {
      const auto want = seeded_bf16_unit(r.o.model, u, r.o.seed);
      EXPECT_TRUE(std::equal(shard.begin(), shard.end(), want.begin(), want.end())) << tag << " unit " << u;
      if (stage != 3) {
        EXPECT_TRUE(std::equal(copy.begin(), copy.end(), want.begin(), want.end())) << tag << " compute copy " << u;
      } else {
        EXPECT_TRUE(copy.empty());
      }
      ++inspected;
    };
    const TrainResult res = train(r.o);
    EXPECT_EQ(inspected, make_layout(r.o.model).units.size()) << tag;
    EXPECT_LT(res.final_loss, res.first_loss - 0.1) << tag << " first " << res.first_loss << " final " << res.final_loss;
    const Json s = Json::parse(std::ifstream(r.o.output_dir + "/summary.json"));
    EXPECT_EQ(s["lora"]["rank"], 4) << tag;
    EXPECT_EQ(s["lora"]["adapted_linears"], 2 * 7) << tag;
    EXPECT_TRUE(s["lora"]["base"]["verified_unchanged"].get<bool>());
    // The checkpoint: the adapters' state only, and the adapters in PEFT's format.
    const std::string ck = res.last_checkpoint;
    const auto st = io::SafetensorsFile::open(ck + "/optimizer_state.safetensors");
    EXPECT_EQ(st->tensors().size(), 3u) << tag;
    EXPECT_NE(st->find("lora.exp_avg_sq"), nullptr);
    const LoadedAdapter a = load_adapter(ck, r.o.model);
    EXPECT_EQ(a.layout.config.rank, 4);
    EXPECT_EQ(a.layout.adapters.size(), 14u);
    float b_norm = 0;
    for (const LoraAdapter& ad : a.layout.adapters) {
      for (std::int64_t i = 0; i < ad.out * 4; ++i) b_norm += std::abs(a.params[static_cast<std::size_t>(ad.b + i)]);
    }
    EXPECT_GT(b_norm, 0.0f) << "B starts at zero and must have trained";
  }
  // No optimizer state and no gradients for the base: far less host memory than full training.
  TrainRun full(d.path() + "/full");
  full.o.max_steps = 2;
  train(full.o);
  const Json sf = Json::parse(std::ifstream(full.o.output_dir + "/summary.json"));
  const Json sl = Json::parse(std::ifstream(d.path() + "/lora-s1/summary.json"));
  EXPECT_LT(sl["peak_memory_bytes"]["host_pinned"].get<double>(), 0.35 * sf["peak_memory_bytes"]["host_pinned"].get<double>());
}

TEST(Trainer, LoraResumeIsBitIdenticalWithDropout) {
  ScratchDir d;
  const auto run = [&](const std::string& out, std::int64_t steps, const std::string& resume) {
    TrainRun r(out);
    r.o.lora = test_lora(0.2);
    r.o.max_steps = steps;
    r.o.eval_every = 3;
    r.o.resume = resume;
    return train(r.o);
  };
  run(d.path() + "/straight", 12, "");
  run(d.path() + "/split", 6, "");
  EXPECT_EQ(run(d.path() + "/split", 12, "latest").steps, 12);
  const auto a = read_csv(d.path() + "/straight/training_metrics.csv");
  const auto b = read_csv(d.path() + "/split/training_metrics.csv");
  ASSERT_EQ(a.size(), b.size());
  for (const char* col : {"loss", "eval_loss", "grad_norm"}) {
    for (std::size_t i = 1; i < a.size(); ++i) EXPECT_EQ(a[i][column(a, col)], b[i][column(b, col)]) << col << " " << i;
  }
  for (const char* f : {"optimizer_state.safetensors", "adapter_model.safetensors"}) {
    EXPECT_TRUE(file_bytes(d.path() + "/straight/checkpoints/step-00000012/" + f) ==
                file_bytes(d.path() + "/split/checkpoints/step-00000012/" + f))
        << f;
  }
}

TEST(Trainer, LoraOnTwoRanksMatchesOneRank) {
  ScratchDir d;
  const auto lora = [](TrainOptions& o) { o.lora = test_lora(0.0); };
  train_on_ranks(d.path() + "/w1", 1, 3, 6, "", {}, lora);
  const auto want = losses(d.path() + "/w1");
  for (const int stage : {0, 3}) {
    const std::string out = fmt::format("{}/w2-s{}", d.path(), stage);
    train_on_ranks(out, 2, stage, 6, "", {}, lora);
    const auto got = losses(out);
    ASSERT_EQ(got.size(), want.size());
    for (std::size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 2e-5 * want[i]) << "stage " << stage << " step " << i + 1;
  }
  // One copy of the adapters' state (rank 0 writes it), the same as one rank's within rounding.
  // The two runs sum the micro-batches' gradients in another order, and the forward pass rounds
  // the adapted weights and activations to bf16 (relative step 2^-8), so an element may drift by
  // a bf16 step's share of each Adam update (lr 3e-3, 6 steps): at most lr / 32 per element, with
  // the whole vector within 0.1% (RMS) of one rank's.
  const auto a = load_adapter(d.path() + "/w1/checkpoints/step-00000006", parse_model_config(tiny_model(), "tiny"));
  const auto b = load_adapter(d.path() + "/w2-s3/checkpoints/step-00000006", parse_model_config(tiny_model(), "tiny"));
  ASSERT_EQ(a.params.size(), b.params.size());
  double diff2 = 0.0, norm2 = 0.0, worst = 0.0;
  for (std::size_t i = 0; i < a.params.size(); ++i) {
    const double e = static_cast<double>(a.params[i]) - b.params[i];
    diff2 += e * e;
    norm2 += static_cast<double>(a.params[i]) * a.params[i];
    worst = std::max(worst, std::abs(e));
    ASSERT_NEAR(a.params[i], b.params[i], 3e-3 / 32 + 1e-3 * std::abs(a.params[i])) << i;
  }
  EXPECT_LT(std::sqrt(diff2 / norm2), 1e-3) << "largest difference " << worst;
  std::printf("adapters, 2 ranks vs 1: RMS difference %.3g of the RMS value, largest %.3g\n", std::sqrt(diff2 / norm2), worst);
}

TEST(Trainer, LoraMistakesAreClearErrors) {
  ScratchDir d;
  const auto expect_error = [](const std::function<void()>& f, const std::string& text) {
    try {
      f();
      ADD_FAILURE() << "no error; expected one containing: " << text;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  {
    Json ds = ds_json(nullptr, false);
    ds["fp16"] = {{"enabled", true}};
    TrainRun r(d.path() + "/fp16", ds);
    r.o.lora = test_lora();
    expect_error([&] { train(r.o); }, "fp16 (loss scaling) is not available");
  }
  TrainRun lora(d.path() + "/lora");
  lora.o.lora = test_lora();
  lora.o.max_steps = 2;
  train(lora.o);
  TrainRun full(d.path() + "/full");
  full.o.max_steps = 2;
  train(full.o);
  {
    TrainRun r(d.path() + "/lora");
    r.o.lora = test_lora();
    r.o.lora.rank = 8;
    r.o.max_steps = 4;
    r.o.resume = "latest";
    expect_error([&] { train(r.o); }, "resume with the same --lora-* options");
  }
  {
    TrainRun r(d.path() + "/lora");
    r.o.lora = test_lora();
    r.o.max_steps = 4;
    r.o.seed = 4;  // another seeded base
    r.o.resume = "latest";
    expect_error([&] { train(r.o); }, "trained on another base model");
  }
  {
    TrainRun r(d.path() + "/lora");
    r.o.max_steps = 4;
    r.o.resume = "latest";
    expect_error([&] { train(r.o); }, "is a LoRA run's (adapters only)");
  }
  {
    TrainRun r(d.path() + "/full");
    r.o.lora = test_lora();
    r.o.max_steps = 4;
    r.o.resume = "latest";
    expect_error([&] { train(r.o); }, "is from full training, not LoRA");
  }
  {
    TrainRun r(d.path() + "/other");
    r.o.lora = test_lora();
    r.o.lora.alpha = 16;
    r.o.lora_init = d.path() + "/lora/checkpoints/step-00000002";
    expect_error([&] { train(r.o); }, "pass the same --lora-rank, --lora-alpha");
  }
  expect_error([&] { export_checkpoint(d.path() + "/lora/checkpoints/step-00000002", d.path() + "/hf", kernels::cpu::DType::kBF16); },
               "zinf ckpt merge");
}

TEST(Trainer, LoraAdaptersMergeAndLoadInTheReferenceWithTheSameLoss) {
  // Train adapters on a base read from safetensors; then (1) the merged model's loss equals the
  // base-with-adapters loss in zinf, and (2) the PyTorch reference's own LoRA, reading the PEFT
  // files, gives zinf's loss (tests/reference/check_lora_adapter.py).
  ScratchDir d;
  const ModelConfig model = parse_model_config(tiny_model(), "tiny");
  const ModelLayout layout = make_layout(model);
  auto cpu = make_cpu_backend();
  {
    // A base whose values are bf16 numbers, so the bf16 training base and fp32 checks agree.
    UnitStorage w(*cpu, layout, DType::kBF16);
    init_parameters(model, layout, 9, *cpu, w.view());
    save_weights(d.path() + "/base", model, layout, *cpu, w.view(), DType::kF32);
  }
  TrainRun r(d.path() + "/run");
  r.o.init_weights = d.path() + "/base";
  r.o.lora = test_lora(0.1);
  r.o.max_steps = 8;
  const TrainResult res = train(r.o);
  const LoadedAdapter a = load_adapter(res.last_checkpoint, model);
  merge_adapter(d.path() + "/base", model, a, d.path() + "/merged", std::nullopt, 0);
  // A held-out style batch.
  const std::int64_t b = 2, s = 16;
  std::vector<std::int32_t> tokens(b * s), targets(b * s);
  for (std::int64_t i = 0; i < b * s; ++i) {
    tokens[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((i * 37 + 11) % 256);
    targets[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((i * 53 + 5) % 256);
  }
  Model with(model, *cpu, ModelOptions{DType::kF32, true, a.layout.config});
  UnitStorage base(*cpu, layout, DType::kF32);
  load_weights(d.path() + "/base", model, layout, *cpu, base.view());
  with.set_batch(tokens, targets, b, s);
  with.set_lora({a.params.data(), nullptr, 0, false});
  const float lora_loss = with.forward(base.view());
  Model plain(model, *cpu, ModelOptions{DType::kF32, true, {}});
  UnitStorage merged(*cpu, layout, DType::kF32);
  load_weights(d.path() + "/merged", model, layout, *cpu, merged.view());
  plain.set_batch(tokens, targets, b, s);
  EXPECT_NEAR(plain.forward(merged.view()), lora_loss, 2e-5 * lora_loss);
  EXPECT_TRUE(fs::exists(d.path() + "/merged/config.json"));
  // The reference: its LoRA on the PEFT files, and its plain model on the merged weights.
  const std::string check = d.path() + "/check";
  fs::create_directories(check);
  io::write_safetensors(check + "/batch.safetensors",
                        {{"tokens", io::StDType::kI32, {b, s}, [&](std::byte* dst) { std::memcpy(dst, tokens.data(), tokens.size() * 4); }},
                         {"targets", io::StDType::kI32, {b, s}, [&](std::byte* dst) { std::memcpy(dst, targets.data(), targets.size() * 4); }}});
  std::ofstream(check + "/zinf.json") << Json{{"loss", lora_loss}}.dump();
  const char* env_python = std::getenv("ZINF_PYTHON");
  const std::string python = env_python != nullptr && *env_python != '\0' ? env_python : ZINF_PYTHON;
  const char* env_source = std::getenv("ZINF_SOURCE_DIR");  // where the tests run from a bundle
  const std::string source = env_source != nullptr && *env_source != '\0' ? env_source : ZINF_SOURCE_DIR;
  const std::string cmd = fmt::format("'{}' '{}/tests/reference/check_lora_adapter.py' '{}/base' '{}' '{}/merged' '{}' 2>&1",
                                      python, source, d.path(), res.last_checkpoint, d.path(), check);
  const int rc = std::system(cmd.c_str());
  if (WIFEXITED(rc) && WEXITSTATUS(rc) == 77) GTEST_SKIP() << "no PyTorch for " << python;
  EXPECT_EQ(rc, 0) << cmd;
}

TEST(Trainer, LoraOnTheGpuTrainsLikeTheCpu) {
  const kernels::GpuQuery q = kernels::query_gpus();
  if (q.gpus.empty()) GTEST_SKIP() << "no GPU here: " << (q.built_with_cuda ? q.problem : std::string("built without CUDA"));
  ScratchDir d;
  const auto run = [&](const std::string& name, const std::string& device, bool offload) {
    TrainRun r(d.path() + "/" + name);
    r.o.lora = test_lora(0.1);
    r.o.max_steps = 10;
    r.o.device = device;
    r.o.lora_offload_optimizer = offload;
    train(r.o);
    return losses(r.o.output_dir);
  };
  const auto cpu = run("cpu", "cpu", false), gpu = run("gpu", "cuda", false), host = run("gpu-host", "cuda", true);
  ASSERT_EQ(cpu.size(), gpu.size());
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    EXPECT_NEAR(gpu[i], cpu[i], 2e-2 * cpu[i]) << "step " << i + 1;  // bf16 tolerance: the GPU's attention takes bf16
    EXPECT_NEAR(host[i], gpu[i], 1e-5 * gpu[i]) << "step " << i + 1;  // the same Adam arithmetic on the host
  }
}

}  // namespace zinf::runtime
