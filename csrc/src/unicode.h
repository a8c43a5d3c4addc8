// UTF-8 decoding and the character classes of HF tokenizers' BertNormalizer / BertPreTokenizer (via utf8proc) and
// of its ByteLevel pre-tokenizer's regex.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace qaengine::unicode {

/// Decodes `s` into code points; `byte_offsets[i]` is where code point i starts (plus a final entry = s.size()).
/// Throws qaengine::Error naming the byte offset of the first invalid sequence.
void decode_utf8(std::string_view s, std::vector<char32_t>& cps, std::vector<int64_t>& byte_offsets);
void append_utf8(std::string& out, char32_t c);

/// Rust char::is_whitespace (Unicode White_Space), plus \t \n \r.
bool is_whitespace(char32_t c);
/// Removed by clean_text (U+0000, U+FFFD, Cc/Cf/Co except \t \n \r), as HF's own Unicode tables say.
bool is_control(char32_t c);
/// BertPreTokenizer punctuation (ASCII punctuation or P* in HF's tables).
bool is_punctuation(char32_t c);
/// CJK ideograph blocks that BertNormalizer surrounds with spaces.
bool is_chinese_char(char32_t c);
/// Category Mn in HF's tables (dropped by strip_accents).
bool is_nonspacing_mark(char32_t c);
/// Canonical decomposition of one code point (fully recursive, not reordered); returns the count written.
int decompose(char32_t c, char32_t* out, int capacity);
/// Canonical combining class.
int combining_class(char32_t c);
/// Full lower-case mapping of one code point (Rust char::to_lowercase); returns the count written (1..3).
int to_lower(char32_t c, char32_t* out);

/// Class of a code point in the GPT-2 pre-tokenization regex: \p{L}, \p{N}, \s or none of them (HF's tables).
enum class RegexClass : uint8_t { Letter, Number, Space, Other };
RegexClass regex_class(char32_t c);

}  // namespace qaengine::unicode
