#include "zinf/runtime/data.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <utility>

#include <sentencepiece_processor.h>

#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"

namespace zinf::runtime {
namespace {

template <typename T>
T load_le(const std::byte* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // little-endian hosts only (x86-64, aarch64)
  return v;
}

// splitmix64: a small, portable generator, so the sample order is the same with every standard
// library.
std::uint64_t splitmix(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

namespace {

constexpr char kMegatronMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};

std::string strip_megatron_suffix(const std::string& path) {
  for (const char* ext : {".bin", ".idx"}) {
    const std::string e(ext);
    if (path.size() > e.size() && path.compare(path.size() - e.size(), e.size(), e) == 0) {
      return path.substr(0, path.size() - e.size());
    }
  }
  return path;
}

bool is_megatron(const std::string& prefix) {
  std::FILE* f = std::fopen((prefix + ".idx").c_str(), "rb");
  if (f == nullptr) return false;
  char magic[9] = {};
  const bool ok = std::fread(magic, 1, 9, f) == 9 && std::memcmp(magic, kMegatronMagic, 9) == 0;
  std::fclose(f);
  return ok;
}

}  // namespace

TokenData TokenData::open(const std::string& path, std::optional<unsigned> raw_width) {
  const std::string prefix = strip_megatron_suffix(path);
  if (is_megatron(prefix)) return open_megatron(prefix);
  return open_file(path, raw_width);
}

TokenData TokenData::open_file(const std::string& path, std::optional<unsigned> raw_width) {
  if (raw_width && *raw_width != 2 && *raw_width != 4) {
    throw Error("token width {} for '{}': use 2 (uint16) or 4 (uint32)", *raw_width, path);
  }
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw Error("cannot open data file '{}': {}", path,
                errno == ENOENT ? std::string("no such file (make one with `zinf data tokenize`)") : errno_text(errno));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error("data file '{}' is not a regular file", path);
  }
  TokenData d;
  d.name_ = path;
  d.map_bytes_ = static_cast<std::size_t>(st.st_size);
  if (d.map_bytes_ > 0) {
    d.map_ = ::mmap(nullptr, d.map_bytes_, PROT_READ, MAP_SHARED, fd, 0);
    if (d.map_ == MAP_FAILED) {
      d.map_ = nullptr;
      const int e = errno;
      ::close(fd);
      throw Error("cannot map data file '{}': {}", path, errno_text(e));
    }
  }
  ::close(fd);
  const auto* bytes = static_cast<const std::byte*>(d.map_);
  const bool has_header =
      d.map_bytes_ >= sizeof(kTokenFileMagic) && std::memcmp(bytes, kTokenFileMagic, sizeof(kTokenFileMagic)) == 0;
  if (has_header) {
    if (d.map_bytes_ < kTokenHeaderBytes) throw Error("data file '{}': truncated header", path);
    const auto version = load_le<std::uint32_t>(bytes + 8);
    const auto width = load_le<std::uint32_t>(bytes + 12);
    const auto count = load_le<std::uint64_t>(bytes + 16);
    if (version != 1) throw Error("data file '{}': format version {} is not supported (this zinf reads 1)", path, version);
    if (width != 2 && width != 4) throw Error("data file '{}': token width {} in the header (must be 2 or 4)", path, width);
    const std::uint64_t need = kTokenHeaderBytes + count * width;
    if (count > (d.map_bytes_ / width) || d.map_bytes_ != need) {
      throw Error("data file '{}' is truncated or padded: the header says {} tokens of {} bytes ({} bytes in all) "
                  "but the file has {} bytes",
                  path, count, width, need, d.map_bytes_);
    }
    d.width_ = width;
    d.count_ = count;
    d.vocab_ = load_le<std::uint32_t>(bytes + 24);
    d.data_ = bytes + kTokenHeaderBytes;
  } else {
    if (!raw_width) {
      throw Error("data file '{}' has no zinf token header: for a raw array of tokens pass --data-dtype uint16 or "
                  "uint32; to make a token file from text use `zinf data tokenize`",
                  path);
    }
    if (d.map_bytes_ % *raw_width != 0) {
      throw Error("raw data file '{}' has {} bytes, not a multiple of the {}-byte token width (wrong --data-dtype?)",
                  path, d.map_bytes_, *raw_width);
    }
    d.width_ = *raw_width;
    d.count_ = d.map_bytes_ / *raw_width;
    d.data_ = bytes;
  }
  return d;
}

TokenData TokenData::open_megatron(const std::string& prefix) {
  // Megatron-LM's MMapIndexedDataset: PREFIX.idx describes the sequences in PREFIX.bin.
  //   char[9] "MMIDIDX\0\0", uint64 version (1), uint8 dtype code, uint64 sequence count S,
  //   uint64 document-index count D, int32 sizes[S], int64 byte pointers[S], int64 doc_idx[D].
  const std::string idx_path = prefix + ".idx";
  std::FILE* f = std::fopen(idx_path.c_str(), "rb");
  if (f == nullptr) throw Error("cannot open '{}': {}", idx_path, errno_text(errno));
  std::vector<std::byte> idx;
  {
    std::byte buf[1 << 16];
    std::size_t got = 0;
    while ((got = std::fread(buf, 1, sizeof(buf), f)) > 0) idx.insert(idx.end(), buf, buf + got);
    std::fclose(f);
  }
  constexpr std::size_t kHeader = 9 + 8 + 1 + 8 + 8;
  if (idx.size() < kHeader) throw Error("'{}' is truncated (header)", idx_path);
  const auto version = load_le<std::uint64_t>(idx.data() + 9);
  const auto code = static_cast<unsigned>(idx[17]);
  const auto seqs = load_le<std::uint64_t>(idx.data() + 18);
  const auto docs = load_le<std::uint64_t>(idx.data() + 26);
  if (version != 1) throw Error("'{}': index version {} is not supported (1 is)", idx_path, version);
  unsigned width = 0;
  if (code == 8) width = 2;       // uint16
  else if (code == 4) width = 4;  // int32
  if (width == 0) {
    throw Error("'{}': token dtype code {} is not supported (zinf reads 8 = uint16 and 4 = int32)", idx_path, code);
  }
  if (seqs > idx.size() || docs > idx.size() || idx.size() != kHeader + seqs * 4 + seqs * 8 + docs * 8) {
    throw Error("'{}' is truncated or malformed: {} sequences and {} document indices need {} bytes, the file has {}",
                idx_path, seqs, docs, kHeader + seqs * 12 + docs * 8, idx.size());
  }
  TokenData d = open_file(prefix + ".bin", width);
  // The sampler reads the sequences as one stream: they must lie back to back in the .bin.
  std::uint64_t expect = 0;
  for (std::uint64_t i = 0; i < seqs; ++i) {
    const auto size = load_le<std::int32_t>(idx.data() + kHeader + i * 4);
    const auto ptr = load_le<std::int64_t>(idx.data() + kHeader + seqs * 4 + i * 8);
    if (size < 0 || ptr < 0 || static_cast<std::uint64_t>(ptr) != expect) {
      throw Error("'{}': sequence {} starts at byte {} (expected {}); only back-to-back sequences are supported", idx_path,
                  i, ptr, expect);
    }
    expect += static_cast<std::uint64_t>(size) * width;
  }
  if (expect != d.count_ * width) {
    throw Error("'{}' describes {} bytes of tokens but '{}.bin' holds {}", idx_path, expect, prefix, d.count_ * width);
  }
  d.name_ = prefix + ".bin";
  return d;
}

TokenData TokenData::from_tokens(std::vector<std::uint32_t> tokens, std::string name, std::uint32_t vocab) {
  TokenData d;
  d.name_ = std::move(name);
  d.owned_ = std::move(tokens);
  d.width_ = 4;
  d.count_ = d.owned_.size();
  d.vocab_ = vocab;
  d.data_ = reinterpret_cast<const std::byte*>(d.owned_.data());
  return d;
}

TokenData::~TokenData() {
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
}

TokenData::TokenData(TokenData&& o) noexcept { *this = std::move(o); }

TokenData& TokenData::operator=(TokenData&& o) noexcept {
  if (this != &o) {
    if (map_ != nullptr) ::munmap(map_, map_bytes_);
    name_ = std::move(o.name_);
    owned_ = std::move(o.owned_);
    map_ = std::exchange(o.map_, nullptr);
    map_bytes_ = std::exchange(o.map_bytes_, 0);
    count_ = std::exchange(o.count_, 0);
    width_ = o.width_;
    vocab_ = o.vocab_;
    max_ = o.max_;
    // Owned tokens moved with their heap buffer, so the pointer stays valid either way.
    data_ = map_ != nullptr || !owned_.empty() ? std::exchange(o.data_, nullptr) : nullptr;
  }
  return *this;
}

std::uint32_t TokenData::max_token() const {
  if (!max_) {
    std::uint32_t m = 0;
    for (std::uint64_t i = 0; i < count_; ++i) m = std::max(m, at(i));
    max_ = m;
  }
  return *max_;
}

void write_token_file(const std::string& path, std::span<const std::uint32_t> tokens, std::uint32_t vocab) {
  std::uint32_t max = 0;
  for (const std::uint32_t t : tokens) max = std::max(max, t);
  const std::uint32_t width = max > 0xffff ? 4 : 2;
  std::byte header[kTokenHeaderBytes] = {};
  std::memcpy(header, kTokenFileMagic, sizeof(kTokenFileMagic));
  const std::uint32_t version = 1;
  const std::uint64_t count = tokens.size();
  std::memcpy(header + 8, &version, 4);
  std::memcpy(header + 12, &width, 4);
  std::memcpy(header + 16, &count, 8);
  std::memcpy(header + 24, &vocab, 4);
  AtomicFile out(path);
  out.write(header, sizeof(header));
  constexpr std::size_t kChunk = 1 << 16;
  std::vector<std::byte> buf(kChunk * width);
  for (std::size_t i = 0; i < tokens.size(); i += kChunk) {
    const std::size_t n = std::min(kChunk, tokens.size() - i);
    for (std::size_t j = 0; j < n; ++j) {
      if (width == 2) {
        const auto v = static_cast<std::uint16_t>(tokens[i + j]);
        std::memcpy(buf.data() + j * 2, &v, 2);
      } else {
        std::memcpy(buf.data() + j * 4, &tokens[i + j], 4);
      }
    }
    out.write(buf.data(), n * width);
  }
  out.commit();
}

std::vector<std::uint32_t> byte_tokens(std::string_view text) {
  std::vector<std::uint32_t> out(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) out[i] = static_cast<unsigned char>(text[i]);
  return out;
}

struct SentencePieceTokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& model_path) : impl_(std::make_unique<Impl>()) {
  const auto status = impl_->sp.Load(model_path);
  if (!status.ok()) {
    throw Error("cannot load SentencePiece model '{}': {} (pass the tokenizer.model file of the model)", model_path,
                status.ToString());
  }
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::vector<std::uint32_t> SentencePieceTokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  const auto status = impl_->sp.Encode(text, &ids);
  if (!status.ok()) throw Error("SentencePiece could not encode the text: {}", status.ToString());
  return {ids.begin(), ids.end()};
}

std::uint32_t SentencePieceTokenizer::vocab_size() const { return static_cast<std::uint32_t>(impl_->sp.GetPieceSize()); }
int SentencePieceTokenizer::eos_id() const { return impl_->sp.eos_id(); }
int SentencePieceTokenizer::bos_id() const { return impl_->sp.bos_id(); }

Sampler::Sampler(const TokenData& data, std::int64_t seq_len, std::uint64_t seed, double eval_fraction)
    : data_(&data), seq_(seq_len), seed_(seed) {
  if (seq_len < 1) throw Error("sequence length {} must be at least 1", seq_len);
  if (eval_fraction < 0 || eval_fraction > 0.5) throw Error("eval fraction {} must be in [0, 0.5]", eval_fraction);
  const std::uint64_t total = data.size() > 0 ? (data.size() - 1) / static_cast<std::uint64_t>(seq_len) : 0;
  eval_ = eval_fraction > 0 ? std::max<std::uint64_t>(1, static_cast<std::uint64_t>(std::llround(total * eval_fraction))) : 0;
  if (total < eval_ + 2) {
    throw Error("data '{}' has {} tokens: {} sample(s) of {} + 1 tokens, too few for training{} (use more data or a "
                "shorter --seq-len)",
                data.name(), data.size(), total, seq_len, eval_ > 0 ? " with a held-out split" : "");
  }
  train_ = total - eval_;
  shuffle_epoch();
}

void Sampler::shuffle_epoch() {
  if (order_epoch_ == pos_.epoch) return;
  order_.resize(train_);
  for (std::uint64_t i = 0; i < train_; ++i) order_[i] = i;
  std::uint64_t state = seed_ * 0x100000001b3ull + pos_.epoch;
  for (std::uint64_t i = train_ - 1; i > 0; --i) {  // Fisher-Yates
    const std::uint64_t j = splitmix(state) % (i + 1);
    std::swap(order_[i], order_[j]);
  }
  order_epoch_ = pos_.epoch;
}

void Sampler::set_position(const DataPosition& pos) {
  if (pos.index > train_) {
    throw Error("data position {} of epoch {} is past the {} training samples of '{}' (a checkpoint from other data "
                "or another --seq-len?)",
                pos.index, pos.epoch, train_, data_->name());
  }
  pos_ = pos;
  shuffle_epoch();
}

void Sampler::fill(std::uint64_t sample, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) const {
  const std::uint64_t base = sample * static_cast<std::uint64_t>(seq_);
  for (std::int64_t t = 0; t < seq_; ++t) {
    tokens[t] = static_cast<std::int32_t>(data_->at(base + t));
    targets[t] = static_cast<std::int32_t>(data_->at(base + t + 1));
  }
}

void Sampler::next_batch(std::int64_t batch, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) {
  ZINF_ASSERT(tokens.size() >= static_cast<std::size_t>(batch * seq_) && targets.size() >= tokens.size());
  for (std::int64_t b = 0; b < batch; ++b) {
    if (pos_.index >= train_) {
      ++pos_.epoch;
      pos_.index = 0;
      shuffle_epoch();
    }
    fill(order_[pos_.index++], tokens.subspan(b * seq_, seq_), targets.subspan(b * seq_, seq_));
  }
}

void Sampler::eval_sample(std::uint64_t i, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) const {
  ZINF_ASSERT(i < eval_);
  fill(train_ + i, tokens, targets);
}

}  // namespace zinf::runtime
