// safetensors reading (memory-mapped, validated) and writing (atomic). Format:
// https://github.com/huggingface/safetensors#format
#include "zinf/io/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"

namespace zinf::io {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr std::uint64_t kMaxHeader = 100u << 20;  // the reference implementation's limit
constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleName = "model.safetensors";

struct DTypeName {
  StDType dtype;
  const char* name;
  std::size_t bytes;
};
constexpr DTypeName kDTypes[] = {
    {StDType::kF64, "F64", 8}, {StDType::kF32, "F32", 4}, {StDType::kF16, "F16", 2},  {StDType::kBF16, "BF16", 2},
    {StDType::kI64, "I64", 8}, {StDType::kI32, "I32", 4}, {StDType::kI16, "I16", 2},  {StDType::kI8, "I8", 1},
    {StDType::kU8, "U8", 1},   {StDType::kBool, "BOOL", 1},
};

bool parse_dtype(const std::string& s, StDType& out) {
  for (const auto& d : kDTypes) {
    if (s == d.name) {
      out = d.dtype;
      return true;
    }
  }
  return false;
}

// numel of a shape, or -1 on overflow past 2^62.
std::int64_t checked_numel(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (const std::int64_t d : shape) {
    if (d < 0) return -1;
    if (d != 0 && n > (std::int64_t{1} << 62) / d) return -1;
    n *= d;
  }
  return n;
}

}  // namespace

const char* st_dtype_name(StDType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d.name;
  }
  return "?";
}

std::size_t st_dtype_bytes(StDType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d.bytes;
  }
  return 0;
}

std::int64_t StTensor::numel() const { return checked_numel(shape); }

std::string shape_string(const std::vector<std::int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

std::uint64_t StWriteTensor::bytes() const {
  return static_cast<std::uint64_t>(checked_numel(shape)) * st_dtype_bytes(dtype);
}

// ---------------------------------------------------------------------------------------------
// Reading

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    throw Error("cannot open safetensors file '{}': {}{}", path, errno_text(err),
                err == ENOENT ? "; check the path (a directory must hold model.safetensors or its index)" : "");
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw Error("cannot stat '{}': {}", path, errno_text(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error("'{}' is not a regular file; give a .safetensors file, an index, or a directory holding one", path);
  }
  const auto size = static_cast<std::uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    throw Error("'{}' is not a safetensors file: {} bytes, shorter than the 8-byte header length (truncated?)",
                path, size);
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);
  if (map == MAP_FAILED) throw Error("cannot map '{}' ({} bytes): {}", path, size, errno_text(map_err));
  f->map_ = map;
  f->map_bytes_ = size;
  const auto* base = static_cast<const std::byte*>(map);

  std::uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);  // little-endian on every machine zinf runs on
  if (header_len > kMaxHeader || header_len > size - 8) {
    throw Error("'{}' is not a valid safetensors file: the header claims {} bytes but the file has {} after the "
                "length{}",
                path, header_len, size - 8, header_len > kMaxHeader ? " (over the 100 MiB limit)" : " (truncated?)");
  }
  const std::string_view header(reinterpret_cast<const char*>(base + 8), header_len);
  json doc;
  try {
    doc = json::parse(header);
  } catch (const json::parse_error& e) {
    throw Error("'{}' has a malformed safetensors header (not JSON): {}", path, e.what());
  }
  if (!doc.is_object()) throw Error("'{}' has a malformed safetensors header: not a JSON object", path);
  f->data_ = base + 8 + header_len;
  const std::uint64_t data_bytes = size - 8 - header_len;

  std::vector<const StTensor*> by_offset;
  for (auto it = doc.begin(); it != doc.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) throw Error("'{}': __metadata__ must be an object of strings", path);
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) throw Error("'{}': __metadata__[\"{}\"] is not a string", path, m.key());
        f->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const auto bad = [&](const std::string& what) {
      return Error("'{}': tensor '{}' has a malformed header entry: {}", path, name, what);
    };
    if (!v.is_object()) throw bad("not an object");
    StTensor t;
    t.name = name;
    if (!v.contains("dtype") || !v["dtype"].is_string()) throw bad("no dtype");
    if (!parse_dtype(v["dtype"].get<std::string>(), t.dtype)) {
      throw bad(fmt::format("unknown dtype '{}'", v["dtype"].get<std::string>()));
    }
    if (!v.contains("shape") || !v["shape"].is_array()) throw bad("no shape");
    for (const json& d : v["shape"]) {
      if (!d.is_number_integer() || d.get<std::int64_t>() < 0) throw bad("shape has a non-integer or negative size");
      t.shape.push_back(d.get<std::int64_t>());
    }
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2 ||
        !v["data_offsets"][0].is_number_unsigned() || !v["data_offsets"][1].is_number_unsigned()) {
      throw bad("data_offsets must be [begin, end]");
    }
    t.begin = v["data_offsets"][0].get<std::uint64_t>();
    t.end = v["data_offsets"][1].get<std::uint64_t>();
    if (t.begin > t.end || t.end > data_bytes) {
      throw bad(fmt::format("data_offsets [{}, {}] fall outside the {} data bytes (truncated file?)", t.begin, t.end,
                            data_bytes));
    }
    const std::int64_t numel = t.numel();
    if (numel < 0) throw bad("shape overflows");
    const std::uint64_t want = static_cast<std::uint64_t>(numel) * st_dtype_bytes(t.dtype);
    if (t.end - t.begin != want) {
      throw bad(fmt::format("shape {} of {} needs {} bytes but data_offsets span {}", shape_string(t.shape),
                            st_dtype_name(t.dtype), want, t.end - t.begin));
    }
    by_offset.push_back(&f->tensors_.emplace(name, std::move(t)).first->second);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](const StTensor* a, const StTensor* b) { return a->begin < b->begin; });
  for (std::size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      throw Error("'{}': tensors '{}' and '{}' overlap in the data section", path, by_offset[i - 1]->name,
                  by_offset[i]->name);
    }
  }
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
}

const StTensor* SafetensorsFile::find(const std::string& name) const {
  const auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

std::span<const std::byte> SafetensorsFile::bytes(const StTensor& t) const {
  return {data_ + t.begin, static_cast<std::size_t>(t.end - t.begin)};
}

SafetensorsSet SafetensorsSet::open(const std::string& path) {
  SafetensorsSet set;
  set.path_ = path;
  std::error_code ec;
  fs::path p(path);
  if (fs::is_directory(p, ec)) {
    if (fs::exists(p / kIndexName, ec)) {
      p /= kIndexName;
    } else if (fs::exists(p / kSingleName, ec)) {
      p /= kSingleName;
    } else {
      throw Error("directory '{}' holds neither {} nor {}; give the weights file or index itself", path, kSingleName,
                  kIndexName);
    }
  } else if (!fs::exists(p, ec)) {
    throw Error("weights '{}' do not exist", path);
  }
  if (p.filename().string().ends_with(".json")) {
    std::string text;
    {
      FILE* fp = std::fopen(p.c_str(), "rb");
      if (fp == nullptr) throw Error("cannot open index '{}': {}", p.string(), errno_text(errno));
      char buf[65536];
      std::size_t n;
      while ((n = std::fread(buf, 1, sizeof buf, fp)) > 0) text.append(buf, n);
      std::fclose(fp);
    }
    json doc;
    try {
      doc = json::parse(text);
    } catch (const json::parse_error& e) {
      throw Error("index '{}' is not valid JSON: {}", p.string(), e.what());
    }
    if (!doc.is_object() || !doc.contains("weight_map") || !doc["weight_map"].is_object()) {
      throw Error("index '{}' has no \"weight_map\" object", p.string());
    }
    std::map<std::string, std::shared_ptr<SafetensorsFile>> shards;
    for (auto it = doc["weight_map"].begin(); it != doc["weight_map"].end(); ++it) {
      if (!it.value().is_string()) throw Error("index '{}': weight_map[\"{}\"] is not a file name", p.string(), it.key());
      const std::string file = it.value().get<std::string>();
      const fs::path rel(file);
      if (rel.is_absolute() || file.find("..") != std::string::npos) {
        throw Error("index '{}': shard name '{}' must be a plain file name next to the index", p.string(), file);
      }
      auto& shard = shards[file];
      if (!shard) {
        try {
          shard = SafetensorsFile::open((p.parent_path() / rel).string());
        } catch (Error& e) {
          throw std::move(e).with_context(fmt::format("while reading shard '{}' listed in '{}'", file, p.string()));
        }
        set.files_.push_back(shard);
      }
      const StTensor* t = shard->find(it.key());
      if (t == nullptr) {
        throw Error("index '{}' places tensor '{}' in '{}', which does not hold it", p.string(), it.key(), file);
      }
      set.entries_[it.key()] = Entry{shard.get(), t};
    }
  } else {
    auto file = SafetensorsFile::open(p.string());
    for (const auto& [name, t] : file->tensors()) set.entries_[name] = Entry{file.get(), &t};
    set.files_.push_back(std::move(file));
  }
  return set;
}

SafetensorsSet::Entry SafetensorsSet::find(const std::string& name) const {
  const auto it = entries_.find(name);
  return it == entries_.end() ? Entry{nullptr, nullptr} : it->second;
}

std::vector<std::string> SafetensorsSet::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& [name, e] : entries_) out.push_back(name);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Writing

namespace {

void write_file(const std::string& path, const std::vector<const StWriteTensor*>& tensors,
                const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (const StWriteTensor* t : tensors) {
    if (checked_numel(t->shape) < 0) throw Error("tensor '{}' has an invalid shape {}", t->name, shape_string(t->shape));
    const std::uint64_t b = t->bytes();
    header[t->name] = {{"dtype", st_dtype_name(t->dtype)}, {"shape", t->shape}, {"data_offsets", {offset, offset + b}}};
    offset += b;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data starts 8-byte aligned, as the reference writer does
  const std::uint64_t len = text.size();
  AtomicFile out(path);
  out.write(&len, 8);
  out.write(text.data(), text.size());
  std::vector<std::byte> buf;
  for (const StWriteTensor* t : tensors) {
    buf.resize(static_cast<std::size_t>(t->bytes()));
    if (!buf.empty()) t->fill(buf.data());
    out.write(buf.data(), buf.size());
  }
  out.commit();
}

bool is_weights_file(const fs::path& p) {
  const std::string name = p.filename().string();
  return name.ends_with(".safetensors") || name == kIndexName;
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<StWriteTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::set<std::string> seen;
  std::vector<const StWriteTensor*> ptrs;
  for (const auto& t : tensors) {
    if (!seen.insert(t.name).second) throw Error("cannot write '{}': tensor '{}' appears twice", path, t.name);
    ptrs.push_back(&t);
  }
  write_file(path, ptrs, metadata);
}

std::vector<std::string> write_safetensors_checkpoint(const std::string& dir, const std::vector<StWriteTensor>& tensors,
                                                      std::uint64_t max_shard_bytes,
                                                      const std::map<std::string, std::string>& metadata) {
  // Group tensors into shards in order, each at most max_shard_bytes (a larger tensor alone).
  std::vector<std::vector<const StWriteTensor*>> shards(1);
  std::uint64_t in_shard = 0, total = 0;
  std::set<std::string> seen;
  for (const auto& t : tensors) {
    if (!seen.insert(t.name).second) throw Error("cannot write '{}': tensor '{}' appears twice", dir, t.name);
    const std::uint64_t b = t.bytes();
    if (max_shard_bytes > 0 && in_shard > 0 && in_shard + b > max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(&t);
    in_shard += b;
    total += b;
  }

  // Everything is written into a sibling staging directory, then swapped in by two renames: at
  // every moment either `dir` or `dir`.old holds a whole checkpoint. Other files in `dir` (config,
  // tokenizer) are carried over by hard links.
  const fs::path target = fs::path(dir).lexically_normal();
  const fs::path staging = fs::path(target.string() + ".partial");
  const fs::path old = fs::path(target.string() + ".old");
  std::error_code ec;
  // An earlier checkpoint there is replaced; anything but a directory is refused, untouched.
  const fs::file_status st = fs::symlink_status(target, ec);
  if (!ec && fs::exists(st) && !fs::is_directory(st)) {
    throw Error("will not write a checkpoint to '{}': it exists and is {}, not a directory; choose another path",
                target.string(), fs::is_symlink(st) ? "a symbolic link" : "a file, device or FIFO");
  }
  fs::remove_all(staging, ec);
  if (!fs::create_directories(staging, ec) && ec) {
    throw Error("cannot create '{}': {}; check the parent directory exists and is writable", staging.string(),
                ec.message());
  }
  if (fs::is_directory(target, ec)) {
    for (const auto& entry : fs::directory_iterator(target)) {
      if (!entry.is_regular_file() || is_weights_file(entry.path())) continue;
      const fs::path to = staging / entry.path().filename();
      fs::create_hard_link(entry.path(), to, ec);
      if (ec) fs::copy_file(entry.path(), to, ec);
      if (ec) throw Error("cannot carry '{}' over into the new checkpoint: {}", entry.path().string(), ec.message());
    }
  }
  std::vector<std::string> names;
  if (shards.size() == 1) {
    names.push_back(kSingleName);
    write_file((staging / kSingleName).string(), shards[0], metadata);
  } else {
    json index;
    index["metadata"] = {{"total_size", total}};
    index["weight_map"] = json::object();
    for (std::size_t i = 0; i < shards.size(); ++i) {
      const std::string name = fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, shards.size());
      write_file((staging / name).string(), shards[i], metadata);
      for (const StWriteTensor* t : shards[i]) index["weight_map"][t->name] = name;
      names.push_back(name);
    }
    write_file_atomic((staging / kIndexName).string(), index.dump(2) + "\n");
    names.push_back(kIndexName);
  }
  fs::remove_all(old, ec);
  if (fs::exists(target, ec)) {
    fs::rename(target, old, ec);
    if (ec) throw Error("cannot replace '{}': {}", target.string(), ec.message());
  }
  fs::rename(staging, target, ec);
  if (ec) {
    throw Error("cannot move the new checkpoint into '{}': {}; the previous one is in '{}'", target.string(),
                ec.message(), old.string());
  }
  sync_directory(target.has_parent_path() ? target.parent_path().string() : ".");
  fs::remove_all(old, ec);
  return names;
}

}  // namespace zinf::io
