// `zinf data`: training data tools (tokenize).
#include <filesystem>
#include <iostream>

#include <fmt/format.h>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/runtime/data.hpp"
#include "zinf/runtime/tokenize.hpp"

namespace zinf::tools {
namespace {

struct TokenizeOptions {
  runtime::TokenizeRequest request;
  std::string output;
};

int run_tokenize(const TokenizeOptions& o) {
  for (const auto& in : o.request.inputs) {
    std::error_code ec;
    if (std::filesystem::equivalent(in, o.output, ec)) {
      throw Error("-o {} is the input file {}: writing it would destroy the text; choose another output", o.output, in);
    }
  }
  const runtime::TokenizedCorpus c = runtime::tokenize_documents(o.request);
  runtime::write_token_file(o.output, c.tokens, c.vocab);
  std::cout << fmt::format("wrote {}: {} tokens from {} document(s), {} (vocabulary {})\n", o.output, c.tokens.size(),
                           c.documents, c.tokenizer, c.vocab);
  return kExitOk;
}

}  // namespace

void add_data_commands(CLI::App& app, Action& action) {
  CLI::App* data = app.add_subcommand("data", "training data tools");
  data->require_subcommand(1);
  auto t = std::make_shared<TokenizeOptions>();
  CLI::App* tok = data->add_subcommand("tokenize", "text or JSONL files to a zinf token file");
  tok->add_option("inputs", t->request.inputs, "text (.txt, any) or JSONL (.jsonl) files")->required()->check(CLI::ExistingFile);
  tok->add_option("-o,--output", t->output, "token file to write")->required();
  tok->add_option("--format", t->request.format, "auto (by extension), text or jsonl")->check(CLI::IsMember({"auto", "text", "jsonl"}));
  tok->add_option("--jsonl-key", t->request.key, "JSONL field holding the text (default text)");
  tok->add_option("--tokenizer", t->request.tokenizer,
                  "bytes (one token per byte, vocabulary 256; the default) or a SentencePiece model file "
                  "(e.g. a Llama tokenizer.model)");
  tok->callback([t, &action] { action = [t] { return run_tokenize(*t); }; });
}

}  // namespace zinf::tools
