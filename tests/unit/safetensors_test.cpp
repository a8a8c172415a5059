// safetensors: round trips (single file, sharded with an index), every kind of malformed file as
// a clear error, and replacement that never leaves a torn checkpoint.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>

#include "io_test_util.hpp"
#include "zinf/io/safetensors.hpp"

namespace zinf::io {
namespace {

using testing::ScratchDir;
namespace fs = std::filesystem;

StWriteTensor floats(const std::string& name, std::vector<std::int64_t> shape, float start) {
  StWriteTensor t;
  t.name = name;
  t.dtype = StDType::kF32;
  t.shape = std::move(shape);
  t.fill = [n = t.bytes() / 4, start](std::byte* dst) {
    std::vector<float> v(n);
    std::iota(v.begin(), v.end(), start);
    std::memcpy(dst, v.data(), n * 4);
  };
  return t;
}

std::vector<float> read_floats(const SafetensorsSet::Entry& e) {
  std::vector<float> v(static_cast<std::size_t>(e.tensor->numel()));
  std::memcpy(v.data(), e.file->bytes(*e.tensor).data(), v.size() * 4);
  return v;
}

// Writes a file from a raw header and data.
void raw_file(const std::string& path, const std::string& header, std::size_t data_bytes, std::int64_t len = -1) {
  std::ofstream out(path, std::ios::binary);
  const std::uint64_t n = len < 0 ? header.size() : static_cast<std::uint64_t>(len);
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << header;
  out << std::string(data_bytes, '\0');
}

TEST(Safetensors, SingleFileRoundTrip) {
  ScratchDir dir;
  const std::string path = dir.path() + "/w.safetensors";
  write_safetensors(path, {floats("a", {2, 3}, 1.0f), floats("b", {4}, 10.0f), floats("empty", {0, 5}, 0.0f)},
                    {{"format", "pt"}});
  const auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->tensors().size(), 3u);
  EXPECT_EQ(f->metadata().at("format"), "pt");
  const StTensor* a = f->find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->shape, (std::vector<std::int64_t>{2, 3}));
  const auto set = SafetensorsSet::open(path);
  EXPECT_EQ(read_floats(set.find("a")), (std::vector<float>{1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(read_floats(set.find("b")), (std::vector<float>{10, 11, 12, 13}));
  EXPECT_EQ(set.find("missing").file, nullptr);
  // Header then data start 8-byte aligned, as the reference writer lays them out.
  std::uint64_t len = 0;
  std::ifstream(path, std::ios::binary).read(reinterpret_cast<char*>(&len), 8);
  EXPECT_EQ(len % 8, 0u);
}

TEST(Safetensors, ShardedCheckpointWithIndex) {
  ScratchDir dir;
  const std::string ckpt = dir.path() + "/ckpt";
  std::vector<StWriteTensor> ts;
  for (int i = 0; i < 5; ++i) ts.push_back(floats(fmt::format("t{}", i), {256}, static_cast<float>(i * 1000)));
  const auto files = write_safetensors_checkpoint(ckpt, ts, 2048);  // two tensors (1 KiB each) per shard
  EXPECT_EQ(files.size(), 4u);  // 3 shards + index
  EXPECT_TRUE(fs::exists(ckpt + "/model-00001-of-00003.safetensors"));
  EXPECT_TRUE(fs::exists(ckpt + "/model.safetensors.index.json"));
  const auto set = SafetensorsSet::open(ckpt);
  EXPECT_EQ(set.shard_count(), 3u);
  EXPECT_EQ(set.names().size(), 5u);
  EXPECT_EQ(read_floats(set.find("t4"))[7], 4007.0f);
  // Saving again with no shard limit replaces the shards by one file; a user file stays.
  { std::ofstream(ckpt + "/tokenizer.json") << "{}"; }
  write_safetensors_checkpoint(ckpt, ts, 0);
  EXPECT_FALSE(fs::exists(ckpt + "/model-00001-of-00003.safetensors"));
  EXPECT_FALSE(fs::exists(ckpt + "/model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(ckpt + "/tokenizer.json"));
  EXPECT_FALSE(fs::exists(ckpt + ".old"));
  EXPECT_FALSE(fs::exists(ckpt + ".partial"));
  EXPECT_EQ(read_floats(SafetensorsSet::open(ckpt).find("t2"))[0], 2000.0f);
}

TEST(Safetensors, AFailedSaveLeavesThePreviousCheckpoint) {
  ScratchDir dir;
  const std::string ckpt = dir.path() + "/ckpt";
  write_safetensors_checkpoint(ckpt, {floats("x", {8}, 1.0f)}, 0);
  StWriteTensor bad = floats("x", {8}, 5.0f);
  bad.fill = [](std::byte*) { throw Error("simulated failure while producing a tensor"); };
  EXPECT_IO_ERROR(write_safetensors_checkpoint(ckpt, {bad}, 0), "simulated failure");
  EXPECT_EQ(read_floats(SafetensorsSet::open(ckpt).find("x"))[0], 1.0f);
}

TEST(Safetensors, MalformedFilesAreClearErrors) {
  ScratchDir dir;
  const std::string p = dir.path() + "/bad.safetensors";
  EXPECT_IO_ERROR(SafetensorsFile::open(dir.path() + "/none.safetensors"), "none.safetensors", "No such file");
  { std::ofstream(p) << "abc"; }
  EXPECT_IO_ERROR(SafetensorsFile::open(p), "shorter than the 8-byte header length");
  raw_file(p, "{}", 0, 1000);
  EXPECT_IO_ERROR(SafetensorsFile::open(p), "header claims 1000 bytes", "truncated");
  raw_file(p, "{not json", 0);
  EXPECT_IO_ERROR(SafetensorsFile::open(p), "not JSON");
  raw_file(p, "[1,2]", 0);
  EXPECT_IO_ERROR(SafetensorsFile::open(p), "not a JSON object");
  raw_file(p, R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8);
  EXPECT_IO_ERROR(SafetensorsFile::open(p), "'w'", "outside the 8 data bytes");
  raw_file(p, R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", 16);
  EXPECT_IO_ERROR(SafetensorsFile::open(p), "needs 12 bytes but data_offsets span 16");
  raw_file(p, R"({"w":{"dtype":"F17","shape":[4],"data_offsets":[0,16]}})", 16);
  EXPECT_IO_ERROR(SafetensorsFile::open(p), "unknown dtype 'F17'");
  raw_file(p, R"({"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", 16);
  EXPECT_IO_ERROR(SafetensorsFile::open(p), "negative");
  raw_file(p, R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})", 24);
  EXPECT_IO_ERROR(SafetensorsFile::open(p), "overlap");
  raw_file(p, R"({"w":{"dtype":"F32","shape":[4]}})", 16);
  EXPECT_IO_ERROR(SafetensorsFile::open(p), "data_offsets must be [begin, end]");
  EXPECT_IO_ERROR(SafetensorsSet::open(dir.path()), "holds neither model.safetensors nor model.safetensors.index.json");
}

TEST(Safetensors, BrokenIndexesAreClearErrors) {
  ScratchDir dir;
  write_safetensors(dir.path() + "/s1.safetensors", {floats("a", {2}, 0.0f)});
  const std::string index = dir.path() + "/model.safetensors.index.json";
  { std::ofstream(index) << R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})"; }
  EXPECT_IO_ERROR(SafetensorsSet::open(dir.path()), "places tensor 'b' in 's1.safetensors', which does not hold it");
  { std::ofstream(index) << R"({"weight_map": {"a": "gone.safetensors"}})"; }
  EXPECT_IO_ERROR(SafetensorsSet::open(index), "gone.safetensors");
  { std::ofstream(index) << R"({"weight_map": {"a": "../s1.safetensors"}})"; }
  EXPECT_IO_ERROR(SafetensorsSet::open(index), "plain file name");
  { std::ofstream(index) << R"({"metadata": {}})"; }
  EXPECT_IO_ERROR(SafetensorsSet::open(index), "no \"weight_map\"");
}

}  // namespace
}  // namespace zinf::io
