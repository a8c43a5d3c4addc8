// Byte-level BPE tokenizer for RoBERTa and GPT-2 vocabularies, equal to HF `tokenizers` (added tokens, ByteLevel
// pre-tokenizer, BPE model, RobertaProcessing / ByteLevel offset trimming) in ids and offsets.
//
// Pipeline, as HF runs it for `Tokenizer.encode(text, add_special_tokens=False)`:
//   1. added tokens ("<s>", "<mask>", ...) that occur literally in the text become their own tokens (leftmost-longest;
//      lstrip / rstrip widen the match over neighbouring whitespace);
//   2. each remaining segment gets a leading ' ' when add_prefix_space is set and it does not start with one, and is
//      split by the GPT-2 regex  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      (character classes from HF's own tables, csrc/src/unicode_tables.inc);
//   3. each piece's UTF-8 bytes are merged by BPE rank (lowest rank first, leftmost on ties);
//   4. with trim_offsets, offsets drop the leading / trailing spaces ('Ġ') of each token.
// A token that covers part of a multi-byte character gets that whole character's offsets, as in HF. Offsets are
// reported in code points and UTF-8 bytes of the original text, like WordPieceTokenizer (qaengine/tokenizer.h).
// Limits: no normalizer, no BPE dropout, byte_fallback, subword prefixes/suffixes or single_word added tokens (the
// loader names the field and refuses); input must be valid UTF-8.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "qaengine/tokenizer.h"

namespace qaengine {

/// Pre-tokenizer, model and post-processor settings; `from_json_file` takes each from its own block of tokenizer.json.
struct ByteLevelBPEOptions {
  bool add_prefix_space = false;     // pre_tokenizer: prepend ' ' to each segment that does not start with one
  bool use_regex = true;             // pre_tokenizer: split with the GPT-2 regex (else one piece per segment)
  bool trim_offsets = true;          // post_processor: drop leading/trailing spaces from token offsets
  bool trim_prefix_space = false;    // post_processor's add_prefix_space: keep the first token's one leading space
  bool ignore_merges = false;        // model: a piece that is itself in the vocabulary is one token
  std::optional<std::string> unk_token;  // model: bytes missing from the vocabulary map here (else they are dropped)
  bool fuse_unk = false;             // model: consecutive unknown bytes give one unk token
};

/// An entry of tokenizer.json's `added_tokens`.
struct AddedToken {
  std::string content;
  int64_t id = 0;
  bool lstrip = false, rstrip = false;  // the match also takes the whitespace before / after it
  bool normalized = false;              // matched after normalization (no difference here: there is no normalizer)
};

class ByteLevelBPETokenizer {
 public:
  /// Reads model.vocab, model.merges ("a b" strings or [a, b] pairs), added_tokens, the ByteLevel pre-tokenizer and
  /// the RobertaProcessing / ByteLevel post-processor of an HF tokenizer.json. Throws qaengine::Error naming the
  /// unsupported field.
  static ByteLevelBPETokenizer from_json_file(const std::string& path);
  /// `vocab`: byte-level token strings (GPT-2's byte-to-unicode alphabet) and ids; `merges` in rank order.
  ByteLevelBPETokenizer(std::vector<std::pair<std::string, int64_t>> vocab,
                        const std::vector<std::pair<std::string, std::string>>& merges, ByteLevelBPEOptions options,
                        std::vector<AddedToken> added_tokens = {});
  ~ByteLevelBPETokenizer();
  ByteLevelBPETokenizer(ByteLevelBPETokenizer&&) noexcept;
  ByteLevelBPETokenizer& operator=(ByteLevelBPETokenizer&&) noexcept;

  /// Tokens of `utf8` without <s>/</s>. Thread-safe. Throws qaengine::Error on invalid UTF-8.
  Encoding encode(std::string_view utf8) const;
  /// Id of a vocabulary entry or added token, or nullopt.
  std::optional<int64_t> token_to_id(const std::string& token) const;
  const ByteLevelBPEOptions& options() const;
  size_t vocab_size() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// GPT-2's byte-to-unicode map: the character that stands for byte `b` in byte-level vocabularies ('Ġ' for ' ').
char32_t byte_level_char(uint8_t b);

}  // namespace qaengine
