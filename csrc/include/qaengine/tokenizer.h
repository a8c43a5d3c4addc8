// WordPiece tokenizer for BERT vocabularies, equal to HF `tokenizers` (BertNormalizer + BertPreTokenizer +
// WordPiece) in ids and offsets.
//
// Offsets are reported twice: in Unicode code points (equal to Python `str` indices, as HF returns them) and in
// UTF-8 bytes of the input. Both are half-open [start, end) into the ORIGINAL text, before normalization.
// Limits: input must be valid UTF-8 (Error otherwise); special tokens of the vocabulary that appear literally in
// the text (e.g. "[SEP]") are matched before normalization, as HF does for its non-normalized added tokens.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace qaengine {

/// Token ids of one text with, per token, code-point and UTF-8 byte offsets into that text.
struct Encoding {
  std::vector<int64_t> ids;
  std::vector<int64_t> starts, ends;            // code points, [start, end)
  std::vector<int64_t> byte_starts, byte_ends;  // UTF-8 bytes, [start, end)
  size_t size() const { return ids.size(); }
};

/// Normalizer and model settings; `from_json` fills them from tokenizer.json.
struct WordPieceOptions {
  bool clean_text = true;            // drop control chars, map whitespace to ' '
  bool handle_chinese_chars = true;  // put spaces around CJK ideographs
  bool lowercase = true;
  bool strip_accents = true;  // NFD, then drop nonspacing marks (Mn)
  std::string unk_token = "[UNK]";
  std::string continuing_subword_prefix = "##";
  size_t max_input_chars_per_word = 100;
};

class WordPieceTokenizer {
 public:
  /// Reads `model.vocab` and the normalizer/pre-tokenizer/model settings of an HF tokenizer.json. `lowercase` and
  /// `strip_accents`, when given (the artifact manifest's flags), override the file's normalizer flags.
  static WordPieceTokenizer from_json_file(const std::string& path, std::optional<bool> lowercase = std::nullopt,
                                           std::optional<bool> strip_accents = std::nullopt);
  WordPieceTokenizer(std::vector<std::pair<std::string, int64_t>> vocab, WordPieceOptions options,
                     std::vector<std::pair<std::string, int64_t>> special_tokens = {});
  ~WordPieceTokenizer();
  WordPieceTokenizer(WordPieceTokenizer&&) noexcept;
  WordPieceTokenizer& operator=(WordPieceTokenizer&&) noexcept;

  /// Tokens of `utf8` without [CLS]/[SEP]. Thread-safe. Throws qaengine::Error on invalid UTF-8.
  Encoding encode(std::string_view utf8) const;
  /// Id of a vocabulary entry, or nullopt.
  std::optional<int64_t> token_to_id(const std::string& token) const;
  const WordPieceOptions& options() const;
  size_t vocab_size() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qaengine
