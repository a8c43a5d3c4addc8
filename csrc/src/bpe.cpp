// Byte-level BPE tokenizer equal to HF tokenizers' added tokens + ByteLevel + BPE + offset trimming (see bpe.h).
//
// Offsets: HF maps every byte-level character back to the original character it came from (the prefix space to the
// segment's first character), and a token's offsets run from its first byte's character to its last byte's. So each
// piece carries, per UTF-8 byte, the index of its original code point.
#include "qaengine/bpe.h"

#include <algorithm>
#include <climits>
#include <queue>
#include <unordered_map>

#include "check.h"
#include "tokenizer_common.h"
#include "unicode.h"

namespace qaengine {
namespace {

using unicode::RegexClass;

struct ByteMap {  // GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the rest for 256 + n
  char32_t to_char[256];
  std::unordered_map<char32_t, uint8_t> to_byte;
  ByteMap() {
    char32_t n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      to_char[b] = printable ? static_cast<char32_t>(b) : 256 + n++;
      to_byte[to_char[b]] = static_cast<uint8_t>(b);
    }
  }
};

const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

/// The raw bytes a byte-level token string stands for; false if it has a character outside the alphabet.
bool token_bytes(const std::string& token, std::string& out) {
  std::vector<char32_t> cps;
  std::vector<int64_t> offs;
  unicode::decode_utf8(token, cps, offs);
  out.clear();
  for (char32_t c : cps) {
    auto it = byte_map().to_byte.find(c);
    if (it == byte_map().to_byte.end()) return false;
    out.push_back(static_cast<char>(it->second));
  }
  return true;
}

using SpaceRuns = std::pair<int32_t, int32_t>;

/// Leading and trailing characters of a token's string that trim_offsets removes from its offsets: 'Ġ' (the byte-level
/// space) or Unicode whitespace.
SpaceRuns space_runs(const char32_t* first, const char32_t* last) {
  auto space = [](char32_t c) { return c == 0x120 || unicode::is_whitespace(c); };
  const auto lead = std::find_if_not(first, last, space) - first;
  if (lead == last - first) return {static_cast<int32_t>(lead), static_cast<int32_t>(lead)};
  const auto trail = std::find_if_not(std::make_reverse_iterator(last), std::make_reverse_iterator(first), space) -
                     std::make_reverse_iterator(last);
  return {static_cast<int32_t>(lead), static_cast<int32_t>(trail)};
}

SpaceRuns space_runs(const std::string& token) {
  std::vector<char32_t> cps;
  std::vector<int64_t> offs;
  unicode::decode_utf8(token, cps, offs);
  return space_runs(cps.data(), cps.data() + cps.size());
}

struct Merge {
  int32_t rank = 0;
  int64_t id = 0;
};

uint64_t pair_key(int64_t a, int64_t b) {
  return (static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b);
}

/// A BPE symbol: a vocabulary id over bytes [start, start + len) of its piece.
struct Symbol {
  int64_t id;
  int32_t start, len;
  int32_t prev, next;  // neighbours in the heap variant (-1: none)
};

/// Ids, code-point offsets and the space runs of each token's string, collected over the whole text in order.
struct Tokens {
  std::vector<int64_t> ids, starts, ends;
  std::vector<SpaceRuns> spaces;
};

}  // namespace

char32_t byte_level_char(uint8_t b) {
  return byte_map().to_char[b];
}

struct ByteLevelBPETokenizer::Impl {
  ByteLevelBPEOptions opt;
  std::unordered_map<std::string, int64_t> vocab;        // token strings (and added tokens) -> id
  std::unordered_map<std::string, int64_t> vocab_bytes;  // raw bytes -> id (ignore_merges only)
  std::unordered_map<uint64_t, Merge> merges;            // (left id, right id) -> rank, merged id
  std::vector<SpaceRuns> spaces;  // id -> space runs of its vocabulary string
  int64_t byte_id[256];
  int64_t unk_id = -1;
  std::vector<AddedToken> added[2];  // [0]: matched in the raw text, [1]: normalized (after the first pass)
  bool first_byte[2][256] = {};      // bytes an added token of each pass can start with

  const Merge* find_merge(int64_t a, int64_t b) const {
    auto it = merges.find(pair_key(a, b));
    return it == merges.end() ? nullptr : &it->second;
  }
  void split_added(std::string_view text, const std::vector<int64_t>& byte_of, const std::vector<char32_t>& cps,
                   int64_t a, int64_t b, int pass, Tokens& out) const;
  void encode_segment(const std::vector<char32_t>& cps, int64_t a, int64_t b, Tokens& out) const;
  void encode_piece(const char32_t* seq, const int64_t* origin, size_t n, Tokens& out) const;
  void merge_word(std::vector<Symbol>& syms) const;
};

ByteLevelBPETokenizer::ByteLevelBPETokenizer(std::vector<std::pair<std::string, int64_t>> vocab,
                                             const std::vector<std::pair<std::string, std::string>>& merges,
                                             ByteLevelBPEOptions options, std::vector<AddedToken> added_tokens)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.opt = std::move(options);
  m.vocab.reserve(vocab.size() + added_tokens.size());
  std::string bytes;
  for (auto& [tok, id] : vocab) {
    QAENGINE_CHECK(id >= 0 && id < (int64_t{1} << 24), "tokenizer: vocabulary id " + std::to_string(id) + " of '" +
                                                            tok + "' is out of range [0, 2^24)");
    if (m.opt.ignore_merges && token_bytes(tok, bytes)) m.vocab_bytes.emplace(bytes, id);
    m.vocab.emplace(std::move(tok), id);
  }
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    unicode::append_utf8(ch, byte_map().to_char[b]);
    auto it = m.vocab.find(ch);
    m.byte_id[b] = it == m.vocab.end() ? -1 : it->second;
    QAENGINE_CHECK(m.byte_id[b] >= 0 || m.opt.unk_token,
                   "tokenizer: the vocabulary lacks '" + ch + "', the byte-level character of byte " +
                       std::to_string(b) + ", and has no unk_token (a byte-level BPE vocabulary holds all 256)");
  }
  if (m.opt.unk_token) {
    auto it = m.vocab.find(*m.opt.unk_token);
    QAENGINE_CHECK(it != m.vocab.end(), "tokenizer: unk_token '" + *m.opt.unk_token + "' is not in the vocabulary");
    m.unk_id = it->second;
  }
  m.merges.reserve(merges.size());
  for (size_t r = 0; r < merges.size(); ++r) {
    const auto& [left, right] = merges[r];
    auto l = m.vocab.find(left), rr = m.vocab.find(right), merged = m.vocab.find(left + right);
    QAENGINE_CHECK(l != m.vocab.end() && rr != m.vocab.end() && merged != m.vocab.end(),
                   "tokenizer: merge " + std::to_string(r) + " ('" + left + "', '" + right +
                       "') names a token missing from the vocabulary");
    m.merges.emplace(pair_key(l->second, rr->second), Merge{static_cast<int32_t>(r), merged->second});
  }
  for (const auto& [tok, id] : m.vocab) {
    if (static_cast<size_t>(id) >= m.spaces.size()) m.spaces.resize(static_cast<size_t>(id) + 1);
    m.spaces[static_cast<size_t>(id)] = space_runs(tok);
  }
  for (auto& t : added_tokens) {
    if (t.content.empty()) continue;
    m.vocab[t.content] = t.id;
    const int pass = t.normalized ? 1 : 0;
    m.first_byte[pass][static_cast<uint8_t>(t.content[0])] = true;
    m.added[pass].push_back(std::move(t));
  }
  for (auto& list : m.added) {  // longest first: the first hit at a position is the leftmost-longest match
    std::stable_sort(list.begin(), list.end(),
                     [](const AddedToken& x, const AddedToken& y) { return x.content.size() > y.content.size(); });
  }
}

QAENGINE_TOKENIZER_FORWARDS(ByteLevelBPETokenizer, ByteLevelBPEOptions)

Encoding ByteLevelBPETokenizer::encode(std::string_view text) const {
  std::vector<char32_t> cps;
  std::vector<int64_t> byte_of;
  unicode::decode_utf8(text, cps, byte_of);
  Tokens t;
  impl_->split_added(text, byte_of, cps, 0, static_cast<int64_t>(cps.size()), 0, t);
  Encoding enc;
  enc.ids = std::move(t.ids);
  enc.starts = std::move(t.starts);
  enc.ends = std::move(t.ends);
  if (impl_->opt.trim_offsets) {  // HF's process_offsets, on code-point offsets
    for (size_t i = 0; i < enc.ids.size(); ++i) {
      auto [lead, trail] = t.spaces[i];
      int64_t& s = enc.starts[i];
      int64_t& e = enc.ends[i];
      if (lead > 0) {
        if ((i == 0 || s == 0) && impl_->opt.trim_prefix_space && lead == 1) lead = 0;  // the space it added
        s = std::min(s + lead, e);
      }
      if (trail > 0 && e >= trail) e = std::max(e - trail, s);
    }
  }
  set_byte_offsets(enc, byte_of);
  return enc;
}

// Added tokens of `pass` split chars [a, b): matches become tokens, the text between goes to the next pass (or to
// pre-tokenization). As HF: leftmost-longest; lstrip takes the whitespace before the match (not past the previous
// match), rstrip the whitespace after it (a following match may still start inside it, and then overlaps).
void ByteLevelBPETokenizer::Impl::split_added(std::string_view text, const std::vector<int64_t>& byte_of,
                                              const std::vector<char32_t>& cps, int64_t a, int64_t b, int pass,
                                              Tokens& out) const {
  auto rest = [&](int64_t x, int64_t y) {
    if (x >= y) return;
    if (pass == 0) {
      split_added(text, byte_of, cps, x, y, 1, out);
    } else {
      encode_segment(cps, x, y, out);
    }
  };
  int64_t seg = a;
  const auto& tokens = added[pass];
  for (int64_t i = a; i < b && !tokens.empty();) {
    const size_t bi = static_cast<size_t>(byte_of[i]);
    const AddedToken* hit = nullptr;
    if (first_byte[pass][static_cast<uint8_t>(text[bi])]) {
      const size_t limit = static_cast<size_t>(byte_of[b]);
      for (const auto& t : tokens) {
        if (bi + t.content.size() <= limit && text.compare(bi, t.content.size(), t.content) == 0) {
          hit = &t;
          break;
        }
      }
    }
    if (!hit) {
      ++i;
      continue;
    }
    int64_t end = i;
    while (byte_of[end] < static_cast<int64_t>(bi + hit->content.size())) ++end;
    int64_t start = i, stop = end;
    if (hit->lstrip)
      while (start > seg && unicode::is_whitespace(cps[start - 1])) --start;
    if (hit->rstrip)
      while (stop < b && unicode::is_whitespace(cps[stop])) ++stop;
    rest(seg, start);  // nothing when this match starts inside the whitespace the previous one took
    out.ids.push_back(hit->id);
    out.starts.push_back(start);
    out.ends.push_back(stop);
    out.spaces.push_back(space_runs(cps.data() + start, cps.data() + stop));  // HF's token string: the matched text
    seg = stop;
    i = end;  // as HF's matcher: the search goes on after the match itself, not after what rstrip took
  }
  rest(seg, b);
}

// One segment without added tokens: optional prefix space, GPT-2 regex split, BPE per piece.
void ByteLevelBPETokenizer::Impl::encode_segment(const std::vector<char32_t>& cps, int64_t a, int64_t b,
                                                 Tokens& out) const {
  const bool prefix = opt.add_prefix_space && cps[a] != U' ';
  const size_t n = static_cast<size_t>(b - a) + (prefix ? 1 : 0);
  std::vector<char32_t> seq;
  std::vector<int64_t> origin(n);  // original code point of each sequence position
  const char32_t* s = cps.data() + a;
  if (prefix) {  // HF aligns the added space with the segment's first character
    seq.reserve(n);
    seq.push_back(U' ');
    seq.insert(seq.end(), cps.begin() + a, cps.begin() + b);
    s = seq.data();
  }
  for (size_t k = 0; k < n; ++k) origin[k] = a + static_cast<int64_t>(prefix && k > 0 ? k - 1 : k);
  if (!opt.use_regex) {
    encode_piece(s, origin.data(), n, out);
    return;
  }
  std::vector<RegexClass> cls(n);
  for (size_t k = 0; k < n; ++k) cls[k] = unicode::regex_class(s[k]);
  // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ , alternative by alternative.
  for (size_t k = 0; k < n;) {
    size_t e = k;
    const char32_t c = s[k];
    if (c == U'\'' && k + 1 < n) {
      const char32_t c1 = s[k + 1], c2 = k + 2 < n ? s[k + 2] : 0;
      if (c1 == U's' || c1 == U't' || c1 == U'm' || c1 == U'd') {
        e = k + 2;
      } else if ((c1 == U'r' && c2 == U'e') || (c1 == U'v' && c2 == U'e') || (c1 == U'l' && c2 == U'l')) {
        e = k + 3;
      }
    }
    if (e == k) {
      const size_t body = c == U' ' && k + 1 < n ? k + 1 : k;  // ` ?`: the optional leading space
      if (cls[body] != RegexClass::Space) {
        const RegexClass want = cls[body];
        e = body + 1;
        while (e < n && cls[e] == want) ++e;
      } else {  // whitespace run: all of it at the end, else all but its last character (or one character)
        e = k + 1;
        while (e < n && cls[e] == RegexClass::Space) ++e;
        if (e < n && e - k >= 2) --e;
      }
    }
    encode_piece(s + k, origin.data() + k, e - k, out);
    k = e;
  }
}

// BPE of one piece of `n` code points: its UTF-8 bytes start as byte-level symbols and merge by rank.
void ByteLevelBPETokenizer::Impl::encode_piece(const char32_t* seq, const int64_t* origin, size_t n,
                                               Tokens& out) const {
  std::string bytes;
  std::vector<int64_t> from;  // original code point of each byte
  for (size_t k = 0; k < n; ++k) {
    unicode::append_utf8(bytes, seq[k]);
    from.resize(bytes.size(), origin[k]);
  }
  auto emit = [&](int64_t id, size_t start, size_t len) {
    out.spaces.push_back(spaces[static_cast<size_t>(id)]);
    out.ids.push_back(id);
    out.starts.push_back(from[start]);
    out.ends.push_back(from[start + len - 1] + 1);
  };
  if (opt.ignore_merges) {
    auto it = vocab_bytes.find(bytes);
    if (it != vocab_bytes.end()) {
      emit(it->second, 0, bytes.size());
      return;
    }
  }
  std::vector<Symbol> syms;
  syms.reserve(bytes.size());
  for (size_t k = 0; k < bytes.size(); ++k) {
    const int64_t id = byte_id[static_cast<uint8_t>(bytes[k])];
    if (id >= 0) {
      syms.push_back(Symbol{id, static_cast<int32_t>(k), 1, -1, -1});
    } else if (opt.fuse_unk && !syms.empty() && syms.back().id == unk_id &&
               syms.back().start + syms.back().len == static_cast<int32_t>(k)) {
      ++syms.back().len;
    } else {
      syms.push_back(Symbol{unk_id, static_cast<int32_t>(k), 1, -1, -1});
    }
  }
  merge_word(syms);
  for (const Symbol& sym : syms) emit(sym.id, static_cast<size_t>(sym.start), static_cast<size_t>(sym.len));
}

// Merges the lowest-ranked adjacent pair (leftmost on ties) until none is in the merge table; leaves the final
// symbols in order. Short words scan; long ones use a heap (HF's algorithm), which gives the same result.
void ByteLevelBPETokenizer::Impl::merge_word(std::vector<Symbol>& syms) const {
  constexpr size_t kScanMax = 64;
  const size_t n = syms.size();
  if (n < 2) return;
  if (n <= kScanMax) {
    int32_t rank[kScanMax];
    int64_t merged[kScanMax];
    auto look = [&](size_t i) {
      const Merge* m = find_merge(syms[i].id, syms[i + 1].id);
      rank[i] = m ? m->rank : INT32_MAX;
      merged[i] = m ? m->id : -1;
    };
    size_t len = n;
    for (size_t i = 0; i + 1 < len; ++i) look(i);
    while (len > 1) {
      size_t best = 0;
      for (size_t i = 1; i + 1 < len; ++i)
        if (rank[i] < rank[best]) best = i;
      if (rank[best] == INT32_MAX) break;
      syms[best].id = merged[best];
      syms[best].len += syms[best + 1].len;
      for (size_t i = best + 1; i + 1 < len; ++i) {
        syms[i] = syms[i + 1];
        rank[i] = rank[i + 1];
        merged[i] = merged[i + 1];
      }
      --len;
      if (best > 0) look(best - 1);
      if (best + 1 < len) look(best);
    }
    syms.resize(len);
    return;
  }
  struct Entry {
    int32_t rank, pos;
    int64_t id;
    bool operator>(const Entry& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  for (size_t i = 0; i < n; ++i) {
    syms[i].prev = static_cast<int32_t>(i) - 1;
    syms[i].next = i + 1 < n ? static_cast<int32_t>(i + 1) : -1;
  }
  auto push = [&](int32_t pos) {
    if (const Merge* m = find_merge(syms[pos].id, syms[syms[pos].next].id)) heap.push(Entry{m->rank, pos, m->id});
  };
  for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int32_t>(i));
  while (!heap.empty()) {
    const Entry top = heap.top();
    heap.pop();
    Symbol& cur = syms[top.pos];
    if (cur.len == 0 || cur.next < 0) continue;
    const Merge* m = find_merge(cur.id, syms[cur.next].id);
    if (!m || m->id != top.id) continue;  // stale: a neighbour merged since this entry was pushed
    Symbol& right = syms[cur.next];
    cur.id = top.id;
    cur.len += right.len;
    right.len = 0;
    cur.next = right.next;
    if (cur.next >= 0) syms[cur.next].prev = top.pos;
    if (cur.prev >= 0) push(cur.prev);
    if (cur.next >= 0) push(top.pos);
  }
  size_t w = 0;
  for (size_t i = 0; i < n; ++i)
    if (syms[i].len > 0) syms[w++] = syms[i];
  syms.resize(w);
}

}  // namespace qaengine
