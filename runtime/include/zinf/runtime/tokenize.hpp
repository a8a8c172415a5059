#pragma once
// Documents to tokens for a zinf token file (`zinf data tokenize`): text files (one document each)
// or JSONL (one document per line, its text in a named field), tokenized byte by byte (documents
// separated by a blank line) or with a SentencePiece model (each document framed <bos> ... <eos>
// where the model has them).

#include <cstdint>
#include <string>
#include <vector>

namespace zinf::runtime {

struct TokenizeRequest {
  std::vector<std::string> inputs;
  std::string format = "auto";     // auto (by extension: .jsonl, .ndjson), text or jsonl
  std::string key = "text";        // the JSONL field holding the text
  std::string tokenizer = "bytes";  // bytes, or a SentencePiece model file
};

struct TokenizedCorpus {
  std::vector<std::uint32_t> tokens;
  std::uint64_t documents = 0;
  std::uint32_t vocab = 0;
  std::string tokenizer;  // "byte-level" or "SentencePiece <model>"
};

// Throws zinf::Error for an unreadable input, a JSONL line that is not an object with the text
// field (file:line), or no text at all.
TokenizedCorpus tokenize_documents(const TokenizeRequest& request);

}  // namespace zinf::runtime
