// Documents to tokens: see tokenize.hpp.
#include "zinf/runtime/tokenize.hpp"

#include <cerrno>
#include <fstream>
#include <iterator>
#include <memory>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "zinf/common/error.hpp"
#include "zinf/runtime/data.hpp"

namespace zinf::runtime {

TokenizedCorpus tokenize_documents(const TokenizeRequest& o) {
  std::unique_ptr<SentencePieceTokenizer> spm;
  if (o.tokenizer != "bytes") spm = std::make_unique<SentencePieceTokenizer>(o.tokenizer);
  TokenizedCorpus c;
  auto add = [&](const std::string& text) {
    if (spm) {
      if (spm->bos_id() >= 0) c.tokens.push_back(static_cast<std::uint32_t>(spm->bos_id()));
      const auto t = spm->encode(text);
      c.tokens.insert(c.tokens.end(), t.begin(), t.end());
      if (spm->eos_id() >= 0) c.tokens.push_back(static_cast<std::uint32_t>(spm->eos_id()));
    } else {
      const auto t = byte_tokens(text);
      c.tokens.insert(c.tokens.end(), t.begin(), t.end());
    }
    ++c.documents;
  };
  for (const auto& in : o.inputs) {
    std::ifstream f(in, std::ios::binary);
    if (!f) throw Error("cannot read '{}': {}", in, errno_text(errno));
    const bool jsonl = o.format == "jsonl" || (o.format == "auto" && (in.ends_with(".jsonl") || in.ends_with(".ndjson")));
    if (!jsonl) {
      add(std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>()));
      continue;
    }
    std::string line;
    std::uint64_t lineno = 0;
    while (std::getline(f, line)) {
      ++lineno;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        throw Error("{}:{}: not a JSON object: {}", in, lineno, e.what());
      }
      if (!j.is_object() || !j.contains(o.key) || !j[o.key].is_string()) {
        throw Error("{}:{}: no string field \"{}\" (choose the field with --jsonl-key)", in, lineno, o.key);
      }
      // Bytes: documents separated by a blank line.
      add(spm ? j[o.key].get<std::string>() : j[o.key].get<std::string>() + "\n\n");
    }
  }
  if (c.tokens.empty()) throw Error("no text in {}", fmt::join(o.inputs, ", "));
  c.vocab = spm ? spm->vocab_size() : kByteVocab;
  c.tokenizer = spm ? "SentencePiece " + o.tokenizer : std::string("byte-level");
  return c;
}

}  // namespace zinf::runtime
