// What the two tokenizers (tokenizer.cpp: WordPiece, bpe.cpp: byte-level BPE) share: reading tokenizer.json's model
// and vocabulary, the byte offsets of an Encoding, and the public members that forward to their Impl.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "json_file.h"
#include "qaengine/error.h"
#include "qaengine/tokenizer.h"

namespace qaengine {

/// tokenizer.json at `path`, checked to hold a 'model' object; qaengine::Error naming the file otherwise.
inline nlohmann::json read_tokenizer_json(const std::string& path) {
  nlohmann::json j = read_json_file(path);
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object()) {
    throw Error(path + ": missing the 'model' object");
  }
  return j;
}

/// model.vocab of the tokenizer.json at `path` as (token, id) pairs, in file order; it must map tokens to integers.
inline std::vector<std::pair<std::string, int64_t>> read_vocab(const nlohmann::json& model, const std::string& path) {
  if (!model.contains("vocab") || !model["vocab"].is_object()) throw Error(path + ": model.vocab must be an object");
  std::vector<std::pair<std::string, int64_t>> vocab;
  vocab.reserve(model["vocab"].size());
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    if (!it.value().is_number_integer()) throw Error(path + ": model.vocab['" + it.key() + "'] must be an integer id");
    vocab.emplace_back(it.key(), it.value().get<int64_t>());
  }
  return vocab;
}

/// enc.byte_starts / byte_ends from its code-point offsets; `byte_of[i]` is the UTF-8 byte offset of code point i,
/// with one entry past the last code point.
inline void set_byte_offsets(Encoding& enc, const std::vector<int64_t>& byte_of) {
  enc.byte_starts.reserve(enc.ids.size());
  enc.byte_ends.reserve(enc.ids.size());
  for (size_t k = 0; k < enc.ids.size(); ++k) {
    enc.byte_starts.push_back(byte_of[enc.starts[k]]);
    enc.byte_ends.push_back(byte_of[enc.ends[k]]);
  }
}

}  // namespace qaengine

/// Defines the members of tokenizer class `T` (options type `Options`) that forward to its pimpl `impl_`, whose Impl
/// holds `opt` and `vocab` (token -> id): the destructor and moves (which need Impl complete), options(),
/// vocab_size() and token_to_id(). Use it once, inside namespace qaengine, after Impl's definition.
#define QAENGINE_TOKENIZER_FORWARDS(T, Options)                                    \
  T::~T() = default;                                                               \
  T::T(T&&) noexcept = default;                                                    \
  T& T::operator=(T&&) noexcept = default;                                         \
  const Options& T::options() const {                                              \
    return impl_->opt;                                                             \
  }                                                                                \
  size_t T::vocab_size() const {                                                   \
    return impl_->vocab.size();                                                    \
  }                                                                                \
  std::optional<int64_t> T::token_to_id(const std::string& token) const {          \
    auto it = impl_->vocab.find(token);                                            \
    if (it == impl_->vocab.end()) return std::nullopt;                             \
    return it->second;                                                             \
  }
