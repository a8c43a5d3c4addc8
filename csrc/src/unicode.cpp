#include "unicode.h"

#include <utf8proc.h>

#include "qaengine/error.h"

namespace qaengine::unicode {
namespace {

struct CodeRange {
  char32_t first, last;
};

// kControl, kPunct, kNonspacingMark, kLetter, kNumber, kSpace: the classes HF tokenizers applies (its Unicode tables
// are older than utf8proc's), probed from the pinned tokenizers package by csrc/tools/gen_unicode_tables.py.
#include "unicode_tables.inc"

template <size_t N>
bool in_table(const CodeRange (&table)[N], char32_t c) {
  size_t lo = 0, hi = N;
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (table[mid].last < c) {
      lo = mid + 1;
    } else if (table[mid].first > c) {
      hi = mid;
    } else {
      return true;
    }
  }
  return false;
}

}  // namespace

void decode_utf8(std::string_view s, std::vector<char32_t>& cps, std::vector<int64_t>& byte_offsets) {
  cps.clear();
  byte_offsets.clear();
  cps.reserve(s.size());
  byte_offsets.reserve(s.size() + 1);
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  const auto n = static_cast<utf8proc_ssize_t>(s.size());
  utf8proc_ssize_t i = 0;
  while (i < n) {
    utf8proc_int32_t c;
    const utf8proc_ssize_t len = utf8proc_iterate(p + i, n - i, &c);
    if (len <= 0 || c < 0) throw Error("text is not valid UTF-8 (at byte " + std::to_string(i) + ")");
    cps.push_back(static_cast<char32_t>(c));
    byte_offsets.push_back(i);
    i += len;
  }
  byte_offsets.push_back(n);
}

void append_utf8(std::string& out, char32_t c) {
  utf8proc_uint8_t buf[4];
  const auto len = utf8proc_encode_char(static_cast<utf8proc_int32_t>(c), buf);
  out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(len));
}

bool is_whitespace(char32_t c) {
  switch (c) {
    case 0x09:
    case 0x0A:
    case 0x0B:
    case 0x0C:
    case 0x0D:
    case 0x20:
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000: return true;
    default: return c >= 0x2000 && c <= 0x200A;
  }
}

bool is_control(char32_t c) {
  return in_table(kControl, c);
}

bool is_punctuation(char32_t c) {
  return in_table(kPunct, c);
}

bool is_chinese_char(char32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
         (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

bool is_nonspacing_mark(char32_t c) {
  return in_table(kNonspacingMark, c);
}

int decompose(char32_t c, char32_t* out, int capacity) {
  utf8proc_int32_t buf[32];
  int last_boundclass = 0;
  const utf8proc_ssize_t n =
      utf8proc_decompose_char(static_cast<utf8proc_int32_t>(c), buf, 32, UTF8PROC_DECOMPOSE, &last_boundclass);
  if (n <= 0 || n > capacity || n > 32) {
    out[0] = c;
    return 1;
  }
  for (utf8proc_ssize_t i = 0; i < n; ++i) out[i] = static_cast<char32_t>(buf[i]);
  return static_cast<int>(n);
}

int combining_class(char32_t c) {
  return utf8proc_get_property(static_cast<utf8proc_int32_t>(c))->combining_class;
}

int to_lower(char32_t c, char32_t* out) {
  if (c == 0x130) {  // the one unconditional multi-char lower-case mapping (SpecialCasing.txt)
    out[0] = 0x69;
    out[1] = 0x307;
    return 2;
  }
  out[0] = static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c)));
  return 1;
}

RegexClass regex_class(char32_t c) {
  if (c < 0x80) {  // the common case: no table search
    if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') return RegexClass::Letter;
    if (c >= '0' && c <= '9') return RegexClass::Number;
    if (c == ' ' || (c >= 0x09 && c <= 0x0D)) return RegexClass::Space;
    return RegexClass::Other;
  }
  if (in_table(kLetter, c)) return RegexClass::Letter;
  if (in_table(kNumber, c)) return RegexClass::Number;
  if (in_table(kSpace, c)) return RegexClass::Space;
  return RegexClass::Other;
}

}  // namespace qaengine::unicode
