// WordPiece tokenizer equal to HF tokenizers' BertNormalizer + BertPreTokenizer + WordPiece (see tokenizer.h).
//
// Every normalized character remembers the original code point it came from; HF's alignments reduce to exactly
// that for this pipeline (filtering drops characters, NFD / lower-casing / CJK spacing only expand one character
// into several), so a token's offsets are [origin(first char), origin(last char) + 1).
#include "qaengine/tokenizer.h"

#include <algorithm>
#include <unordered_map>

#include "qaengine/error.h"
#include "tokenizer_common.h"
#include "unicode.h"

namespace qaengine {

using json = nlohmann::json;

struct WordPieceTokenizer::Impl {
  std::unordered_map<std::string, int64_t> vocab;
  WordPieceOptions opt;
  std::vector<std::pair<std::string, int64_t>> specials;  // longest first: leftmost-longest matching
  int64_t unk_id = 0;
  size_t max_token_bytes = 0;  // longest vocabulary entry, in UTF-8 bytes

  void encode_segment(const std::vector<char32_t>& cps, int64_t a, int64_t b, std::vector<int64_t>& ids,
                      std::vector<int64_t>& starts, std::vector<int64_t>& ends) const;
  void word_piece(const std::vector<char32_t>& chars, const std::vector<int64_t>& origin, size_t a, size_t b,
                  std::vector<int64_t>& ids, std::vector<int64_t>& starts, std::vector<int64_t>& ends) const;
};

WordPieceTokenizer::WordPieceTokenizer(std::vector<std::pair<std::string, int64_t>> vocab, WordPieceOptions options,
                                       std::vector<std::pair<std::string, int64_t>> special_tokens)
    : impl_(std::make_unique<Impl>()) {
  impl_->opt = std::move(options);
  impl_->vocab.reserve(vocab.size());
  for (auto& [tok, id] : vocab) {
    impl_->max_token_bytes = std::max(impl_->max_token_bytes, tok.size());
    impl_->vocab.emplace(std::move(tok), id);
  }
  auto unk = impl_->vocab.find(impl_->opt.unk_token);
  if (unk == impl_->vocab.end())
    throw Error("tokenizer: unk_token '" + impl_->opt.unk_token + "' is not in the vocabulary");
  impl_->unk_id = unk->second;
  for (auto& s : special_tokens)
    if (!s.first.empty()) impl_->specials.push_back(std::move(s));
  std::stable_sort(impl_->specials.begin(), impl_->specials.end(),
                   [](const auto& x, const auto& y) { return x.first.size() > y.first.size(); });
}

QAENGINE_TOKENIZER_FORWARDS(WordPieceTokenizer, WordPieceOptions)

WordPieceTokenizer WordPieceTokenizer::from_json_file(const std::string& path, std::optional<bool> lowercase,
                                                      std::optional<bool> strip_accents) {
  const json j = read_tokenizer_json(path);
  auto fail = [&](const std::string& msg) { return Error(path + ": " + msg); };
  const json& model = j["model"];
  const std::string type = model.value("type", "");
  if (type != "WordPiece") {
    throw fail("model type '" + type +
               "' is not supported by the C++ tokenizer (WordPiece only; RoBERTa's "
               "byte-level BPE is ByteLevelBPETokenizer, qaengine/bpe.h)");
  }
  WordPieceOptions opt;
  if (model.contains("unk_token") && model["unk_token"].is_string()) opt.unk_token = model["unk_token"];
  if (model.contains("continuing_subword_prefix") && model["continuing_subword_prefix"].is_string())
    opt.continuing_subword_prefix = model["continuing_subword_prefix"];
  if (model.contains("max_input_chars_per_word") && model["max_input_chars_per_word"].is_number_unsigned())
    opt.max_input_chars_per_word = model["max_input_chars_per_word"];

  const json norm = j.value("normalizer", json());
  if (norm.is_null()) {
    opt.clean_text = opt.handle_chinese_chars = opt.lowercase = opt.strip_accents = false;
  } else if (norm.is_object() && norm.value("type", "") == "BertNormalizer") {
    opt.clean_text = norm.value("clean_text", true);
    opt.handle_chinese_chars = norm.value("handle_chinese_chars", true);
    opt.lowercase = norm.value("lowercase", true);
    const json sa = norm.value("strip_accents", json());
    opt.strip_accents = sa.is_boolean() ? sa.get<bool>() : opt.lowercase;
  } else {
    throw fail("normalizer " + norm.dump().substr(0, 80) + " is not supported (BertNormalizer only)");
  }
  if (lowercase) opt.lowercase = *lowercase;
  if (strip_accents) opt.strip_accents = *strip_accents;
  const json pre = j.value("pre_tokenizer", json());
  if (!pre.is_object() || pre.value("type", "") != "BertPreTokenizer") {
    throw fail("pre_tokenizer " + pre.dump().substr(0, 80) + " is not supported (BertPreTokenizer only)");
  }

  std::vector<std::pair<std::string, int64_t>> vocab = read_vocab(model, path);
  std::vector<std::pair<std::string, int64_t>> specials;
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const json& t : j["added_tokens"]) {
      // Non-normalized added tokens are matched in the raw text before normalization, as HF does.
      if (t.is_object() && t.value("normalized", true) == false && t.contains("content") && t.contains("id")) {
        specials.emplace_back(t["content"].get<std::string>(), t["id"].get<int64_t>());
      }
    }
  }
  return WordPieceTokenizer(std::move(vocab), opt, std::move(specials));
}

Encoding WordPieceTokenizer::encode(std::string_view text) const {
  std::vector<char32_t> cps;
  std::vector<int64_t> byte_of;
  unicode::decode_utf8(text, cps, byte_of);
  Encoding enc;
  std::vector<int64_t> starts, ends;
  const int64_t n = static_cast<int64_t>(cps.size());
  int64_t seg = 0;  // start (code point) of the text not yet tokenized
  // Split around special tokens (leftmost-longest). Specials are matched on bytes; valid UTF-8 guarantees every
  // match starts and ends on a code point boundary.
  int64_t i = 0;
  while (i < n && !impl_->specials.empty()) {
    const int64_t bi = byte_of[i];
    const std::pair<std::string, int64_t>* hit = nullptr;
    for (const auto& s : impl_->specials) {
      if (text.compare(static_cast<size_t>(bi), s.first.size(), s.first) == 0) {
        hit = &s;
        break;
      }
    }
    if (!hit) {
      ++i;
      continue;
    }
    impl_->encode_segment(cps, seg, i, enc.ids, starts, ends);
    int64_t j = i;
    while (byte_of[j] < bi + static_cast<int64_t>(hit->first.size())) ++j;
    enc.ids.push_back(hit->second);
    starts.push_back(i);
    ends.push_back(j);
    i = seg = j;
  }
  impl_->encode_segment(cps, seg, n, enc.ids, starts, ends);
  enc.starts = std::move(starts);
  enc.ends = std::move(ends);
  set_byte_offsets(enc, byte_of);
  return enc;
}

void WordPieceTokenizer::Impl::encode_segment(const std::vector<char32_t>& cps, int64_t a, int64_t b,
                                              std::vector<int64_t>& ids, std::vector<int64_t>& starts,
                                              std::vector<int64_t>& ends) const {
  if (a >= b) return;
  // Normalize (BertNormalizer order: clean text, CJK spacing, strip accents, lower-case).
  std::vector<char32_t> chars;
  std::vector<int64_t> origin;
  chars.reserve(static_cast<size_t>(b - a));
  origin.reserve(static_cast<size_t>(b - a));
  char32_t buf[32];
  for (int64_t i = a; i < b; ++i) {
    char32_t c = cps[i];
    if (opt.clean_text) {
      if (c == 0 || c == 0xFFFD || unicode::is_control(c)) continue;
      if (unicode::is_whitespace(c)) c = ' ';
    }
    char32_t spaced[3] = {c, 0, 0};
    int m = 1;
    if (opt.handle_chinese_chars && unicode::is_chinese_char(c)) {
      spaced[0] = ' ';
      spaced[1] = c;
      spaced[2] = ' ';
      m = 3;
    }
    int n = 0;
    for (int k = 0; k < m; ++k) {
      if (opt.strip_accents) {  // NFD applies to every character, CJK compatibility ideographs included
        char32_t dec[32];
        const int nd = unicode::decompose(spaced[k], dec, 32);
        for (int q = 0; q < nd && n < 32; ++q)
          if (!unicode::is_nonspacing_mark(dec[q])) buf[n++] = dec[q];
      } else {
        buf[n++] = spaced[k];
      }
    }
    for (int k = 0; k < n; ++k) {
      if (opt.lowercase) {
        char32_t low[3];
        const int m = unicode::to_lower(buf[k], low);
        for (int q = 0; q < m; ++q) {
          chars.push_back(low[q]);
          origin.push_back(i);
        }
      } else {
        chars.push_back(buf[k]);
        origin.push_back(i);
      }
    }
  }
  // Pre-tokenize: whitespace separates words, each punctuation character is a word of its own.
  size_t w = 0;
  for (size_t k = 0; k <= chars.size(); ++k) {
    const bool end = k == chars.size();
    if (end || unicode::is_whitespace(chars[k])) {
      word_piece(chars, origin, w, k, ids, starts, ends);
      w = k + 1;
    } else if (unicode::is_punctuation(chars[k])) {
      word_piece(chars, origin, w, k, ids, starts, ends);
      word_piece(chars, origin, k, k + 1, ids, starts, ends);
      w = k + 1;
    }
  }
}

void WordPieceTokenizer::Impl::word_piece(const std::vector<char32_t>& chars, const std::vector<int64_t>& origin,
                                          size_t a, size_t b, std::vector<int64_t>& ids, std::vector<int64_t>& starts,
                                          std::vector<int64_t>& ends) const {
  if (a >= b) return;
  if (b - a > opt.max_input_chars_per_word) {
    ids.push_back(unk_id);
    starts.push_back(origin[a]);
    ends.push_back(origin[b - 1] + 1);
    return;
  }
  std::string word;
  std::vector<size_t> at;  // byte offset of each char within `word`, plus the end
  for (size_t k = a; k < b; ++k) {
    at.push_back(word.size());
    unicode::append_utf8(word, chars[k]);
  }
  at.push_back(word.size());
  const size_t mark = ids.size();
  const size_t n = b - a;
  std::string key;
  for (size_t s = 0; s < n;) {
    const std::string& prefix = s > 0 ? opt.continuing_subword_prefix : std::string();
    size_t found_end = 0;
    int64_t found_id = 0;
    for (size_t e = n; e > s; --e) {
      const size_t len = at[e] - at[s];
      if (len + prefix.size() > max_token_bytes) continue;
      key.assign(prefix);
      key.append(word, at[s], len);
      auto it = vocab.find(key);
      if (it != vocab.end()) {
        found_end = e;
        found_id = it->second;
        break;
      }
    }
    if (found_end == 0) {  // no piece matches: the whole word is unknown
      ids.resize(mark);
      starts.resize(mark);
      ends.resize(mark);
      ids.push_back(unk_id);
      starts.push_back(origin[a]);
      ends.push_back(origin[b - 1] + 1);
      return;
    }
    ids.push_back(found_id);
    starts.push_back(origin[a + s]);
    ends.push_back(origin[a + found_end - 1] + 1);
    s = found_end;
  }
}

}  // namespace qaengine
