#pragma once
// Training data: token files, fixed-length samples in a seeded, resumable order, a held-out split
// for the eval loss, and the byte-level tokenizer behind `zinf data tokenize`.
//
// Token file (".tok", written by zinf): a 32-byte little-endian header, then the tokens.
//   offset 0  char[8]  "ZINFTOK\0"
//   offset 8  uint32   format version (1)
//   offset 12 uint32   bytes per token (2 = uint16, 4 = uint32)
//   offset 16 uint64   token count
//   offset 24 uint32   vocabulary size the tokens were made for (0 = not recorded)
//   offset 28 uint32   reserved (0)
// A raw file (no header: a flat array of uint16 or uint32, e.g. from numpy's tofile) is read when
// its token width is given. A Megatron-LM indexed dataset (PREFIX.bin + PREFIX.idx, uint16 or
// int32 tokens) is read as the stream of its sequences in order.

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace zinf::runtime {

inline constexpr char kTokenFileMagic[8] = {'Z', 'I', 'N', 'F', 'T', 'O', 'K', '\0'};
inline constexpr std::size_t kTokenHeaderBytes = 32;

// A memory-mapped token file (or tokens held in memory, for the embedded corpus).
class TokenData {
 public:
  // `raw_width` (2 or 4): read a headerless file with that token width; nullopt: the file must have
  // the header. Throws zinf::Error naming the file for a missing, unreadable, truncated or
  // malformed file, or a raw file whose size is not a multiple of the width.
  static TokenData open(const std::string& path, std::optional<unsigned> raw_width = std::nullopt);
  // PREFIX.bin with PREFIX.idx (open() takes either file, or the .bin, and detects the index).
  static TokenData open_megatron(const std::string& prefix);
  static TokenData from_tokens(std::vector<std::uint32_t> tokens, std::string name, std::uint32_t vocab = 0);

  TokenData() = default;
  ~TokenData();
  TokenData(TokenData&& other) noexcept;
  TokenData& operator=(TokenData&& other) noexcept;
  TokenData(const TokenData&) = delete;
  TokenData& operator=(const TokenData&) = delete;

  std::uint64_t size() const noexcept { return count_; }
  std::uint32_t at(std::uint64_t i) const noexcept {
    return width_ == 2 ? reinterpret_cast<const std::uint16_t*>(data_)[i] : reinterpret_cast<const std::uint32_t*>(data_)[i];
  }
  unsigned width() const noexcept { return width_; }
  std::uint32_t recorded_vocab() const noexcept { return vocab_; }
  const std::string& name() const noexcept { return name_; }
  // The largest token (scanned once, on first call).
  std::uint32_t max_token() const;

 private:
  static TokenData open_file(const std::string& path, std::optional<unsigned> raw_width);

  std::string name_;
  const std::byte* data_ = nullptr;
  std::uint64_t count_ = 0;
  unsigned width_ = 2;
  std::uint32_t vocab_ = 0;
  void* map_ = nullptr;
  std::size_t map_bytes_ = 0;
  std::vector<std::uint32_t> owned_;
  mutable std::optional<std::uint32_t> max_;
};

// Writes a token file with the header, atomically (a crash leaves the old file or none).
// Tokens wider than 16 bits are written as uint32, else uint16.
void write_token_file(const std::string& path, std::span<const std::uint32_t> tokens, std::uint32_t vocab);

// Byte-level tokenizer: one token per byte (vocabulary 256).
inline constexpr std::uint32_t kByteVocab = 256;
std::vector<std::uint32_t> byte_tokens(std::string_view text);

// A SentencePiece model (Debian's libsentencepiece), e.g. a Llama-2 `tokenizer.model`.
class SentencePieceTokenizer {
 public:
  // Throws zinf::Error naming the file when it is missing or not a SentencePiece model.
  explicit SentencePieceTokenizer(const std::string& model_path);
  ~SentencePieceTokenizer();
  SentencePieceTokenizer(const SentencePieceTokenizer&) = delete;
  SentencePieceTokenizer& operator=(const SentencePieceTokenizer&) = delete;
  std::vector<std::uint32_t> encode(std::string_view text) const;
  std::uint32_t vocab_size() const;
  // The end-of-sequence id, or -1 when the model has none.
  int eos_id() const;
  int bos_id() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Where the sampler is: restored from a checkpoint to continue the same order.
struct DataPosition {
  std::uint64_t epoch = 0;
  std::uint64_t index = 0;  // next sample within the epoch's order
  bool operator==(const DataPosition&) const = default;
};

// Fixed-length samples of seq_len + 1 tokens (inputs and next-token targets), back to back with a
// stride of seq_len. The last `eval` samples are held out; the rest are visited in a seeded
// permutation per epoch (the same seed and position give the same batches on any machine).
class Sampler {
 public:
  // eval_fraction in [0, 0.5]: that share of the samples (at least one when > 0) is held out.
  // Throws zinf::Error when the data holds fewer than 2 training samples of this length.
  Sampler(const TokenData& data, std::int64_t seq_len, std::uint64_t seed, double eval_fraction);

  std::uint64_t train_samples() const noexcept { return train_; }
  std::uint64_t eval_samples() const noexcept { return eval_; }
  std::int64_t seq_len() const noexcept { return seq_; }
  const DataPosition& position() const noexcept { return pos_; }
  // Throws zinf::Error for a position outside the data (a checkpoint from other data).
  void set_position(const DataPosition& pos);
  // Fills `batch` samples into tokens/targets (batch x seq_len each) and advances; an epoch ends
  // after every training sample was used once, and the next starts with a new permutation.
  void next_batch(std::int64_t batch, std::span<std::int32_t> tokens, std::span<std::int32_t> targets);
  // Eval sample i (< eval_samples()).
  void eval_sample(std::uint64_t i, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) const;
  // Fraction of the current epoch done, for progress.
  double epoch_fraction() const noexcept { return train_ ? static_cast<double>(pos_.index) / static_cast<double>(train_) : 0; }

 private:
  void fill(std::uint64_t sample, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) const;
  void shuffle_epoch();

  const TokenData* data_;
  std::int64_t seq_;
  std::uint64_t seed_;
  std::uint64_t train_ = 0, eval_ = 0;
  DataPosition pos_;
  std::vector<std::uint64_t> order_;  // the current epoch's permutation
  std::uint64_t order_epoch_ = ~0ull;
};

}  // namespace zinf::runtime
