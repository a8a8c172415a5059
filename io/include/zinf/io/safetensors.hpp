#pragma once
// safetensors (https://huggingface.co/docs/safetensors): the weights format of Hugging Face
// checkpoints. A file is an 8-byte little-endian header length, a JSON header mapping each tensor
// name to {dtype, shape, data_offsets} (plus an optional "__metadata__" of strings), then the
// tensors' bytes. A sharded checkpoint adds `model.safetensors.index.json` whose "weight_map" names
// the file holding each tensor.
//
// Reading memory-maps the file and validates the whole header before anything is used: every
// offset inside the data, sizes matching shapes, no overlaps. Any flaw is a zinf::Error naming the
// file, the tensor and what is wrong. Writing goes through a temporary file renamed into place, so
// a crash leaves the previous file whole.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace zinf::io {

enum class StDType : std::uint8_t { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

const char* st_dtype_name(StDType dtype);  // "F32", "BF16", ... as the format spells them
std::size_t st_dtype_bytes(StDType dtype);

struct StTensor {
  std::string name;
  StDType dtype = StDType::kF32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  // byte offsets into the data section
  std::uint64_t end = 0;
  std::int64_t numel() const;
};

std::string shape_string(const std::vector<std::int64_t>& shape);  // "[4, 8]"

class SafetensorsFile {
 public:
  // Maps and validates `path`; throws zinf::Error on a missing, truncated or malformed file.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const noexcept { return path_; }
  const std::map<std::string, StTensor>& tensors() const noexcept { return tensors_; }
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  // null when absent
  const StTensor* find(const std::string& name) const;
  // The tensor's bytes in the mapping (valid while this object lives).
  std::span<const std::byte> bytes(const StTensor& t) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  std::size_t map_bytes_ = 0;
  const std::byte* data_ = nullptr;  // start of the data section
  std::map<std::string, StTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint: one .safetensors file, or the shards listed by an index. open() takes the file,
// the index, or a directory holding `model.safetensors` or `model.safetensors.index.json`.
class SafetensorsSet {
 public:
  static SafetensorsSet open(const std::string& path);

  struct Entry {
    const SafetensorsFile* file;
    const StTensor* tensor;
  };
  // null file when absent
  Entry find(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::string& path() const noexcept { return path_; }
  std::size_t shard_count() const noexcept { return files_.size(); }

 private:
  std::string path_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, Entry> entries_;
};

// One tensor to write: fill(dst) writes exactly numel * dtype bytes into dst.
struct StWriteTensor {
  std::string name;
  StDType dtype = StDType::kF32;
  std::vector<std::int64_t> shape;
  std::function<void(std::byte* dst)> fill;
  std::uint64_t bytes() const;
};

// Writes one file atomically. Tensors are laid out in the order given.
void write_safetensors(const std::string& path, const std::vector<StWriteTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes a checkpoint into directory `dir` (created if missing): one `model.safetensors` when all
// tensors fit in max_shard_bytes (0 = no limit), else `model-0000K-of-0000N.safetensors` shards and
// `model.safetensors.index.json`. Shards are written first and the index last, each atomically;
// shards of an earlier save that the new index no longer names are removed after it. Returns the
// file names written.
std::vector<std::string> write_safetensors_checkpoint(const std::string& dir, const std::vector<StWriteTensor>& tensors,
                                                      std::uint64_t max_shard_bytes,
                                                      const std::map<std::string, std::string>& metadata = {});

}  // namespace zinf::io
