// ByteLevelBPETokenizer on a hand-made vocabulary: merge order, offsets of split characters, prefix space and
// offset trimming, added tokens, the scan and heap merge paths against a naive BPE, and errors. Parity with HF
// `tokenizers` on real text is tests/cpp/test_cpp_bpe.py.
#include <climits>
#include <map>

#include "qaengine/bpe.h"
#include "test_util.h"
#include "unicode.h"

namespace qaengine::test {
namespace {

std::string byte_chars(const std::string& raw) {  // raw bytes -> their byte-level token string
  std::string out;
  for (unsigned char b : raw) unicode::append_utf8(out, byte_level_char(b));
  return out;
}

using Merges = std::vector<std::pair<std::string, std::string>>;

/// All 256 byte characters (ids 0..255), then <s>, </s>, then one token per merge, in rank order.
ByteLevelBPETokenizer make(const Merges& merges, ByteLevelBPEOptions opt = {}) {
  std::vector<std::pair<std::string, int64_t>> vocab;
  for (int b = 0; b < 256; ++b) vocab.emplace_back(byte_chars(std::string(1, static_cast<char>(b))), b);
  vocab.emplace_back("<s>", 256);
  vocab.emplace_back("</s>", 257);
  Merges bl;
  for (const auto& [l, r] : merges) {
    bl.emplace_back(byte_chars(l), byte_chars(r));
    vocab.emplace_back(byte_chars(l + r), static_cast<int64_t>(vocab.size()));
  }
  std::vector<AddedToken> added{{"<s>", 256, false, false, false}, {"</s>", 257, false, true, false}};
  return ByteLevelBPETokenizer(vocab, bl, opt, added);
}

std::vector<std::pair<int64_t, int64_t>> offsets(const Encoding& e) {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (size_t i = 0; i < e.size(); ++i) out.emplace_back(e.starts[i], e.ends[i]);
  return out;
}

const Merges kThe{{"h", "e"}, {" ", "t"}, {" t", "he"}, {"t", "he"}};  // ids 258..261

TEST(BPE, MergesByRankAndTrimsTheLeadingSpace) {
  const auto tok = make(kThe);
  const Encoding e = tok.encode("the the");
  EXPECT_EQ(e.ids, (std::vector<int64_t>{261, 260}));                                // "the", " the"
  EXPECT_EQ(offsets(e), (std::vector<std::pair<int64_t, int64_t>>{{0, 3}, {4, 7}}));  // trimmed: not {3, 7}
  ByteLevelBPEOptions keep;
  keep.trim_offsets = false;
  EXPECT_EQ(offsets(make(kThe, keep).encode("the the")), (std::vector<std::pair<int64_t, int64_t>>{{0, 3}, {3, 7}}));
}

TEST(BPE, PrefixSpaceMapsToTheFirstCharacter) {
  ByteLevelBPEOptions opt;
  opt.add_prefix_space = opt.trim_prefix_space = true;
  const Encoding e = make(kThe, opt).encode("the");
  EXPECT_EQ(e.ids, (std::vector<int64_t>{260}));  // " the": the added space is kept in the token, not the offsets
  EXPECT_EQ(offsets(e), (std::vector<std::pair<int64_t, int64_t>>{{0, 3}}));
}

TEST(BPE, SplitCharactersKeepTheWholeCharacterOffsets) {
  const auto tok = make({});
  const Encoding e = tok.encode("a\xC3\xA9\xF0\x9F\x98\x80");  // "aé😀": 1 + 2 + 4 byte tokens
  ASSERT_EQ(e.size(), 7u);
  EXPECT_EQ(offsets(e),
            (std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {1, 2}, {1, 2}, {2, 3}, {2, 3}, {2, 3}, {2, 3}}));
  EXPECT_EQ(e.byte_starts[3], 3);
  EXPECT_EQ(e.byte_ends[3], 7);
}

TEST(BPE, RegexSplitsContractionsLettersNumbersAndSpaces) {
  const auto tok = make({});
  // 's is its own piece; digits split from letters; "  x": a lone space piece, then " x".
  const Encoding e = tok.encode("it's 42a  x");
  // trim_offsets: the space before "42" and " x" are trimmed away; the lone space piece becomes empty.
  const std::vector<std::pair<int64_t, int64_t>> want{{0, 1}, {1, 2}, {2, 3}, {3, 4},  {5, 5},   {5, 6},
                                                      {6, 7}, {7, 8}, {9, 9}, {10, 10}, {10, 11}};
  EXPECT_EQ(offsets(e), want);
}

TEST(BPE, AddedTokensSplitTheTextAndRstripTakesWhitespace) {
  const auto tok = make(kThe);
  const Encoding e = tok.encode("<s>the</s>  the");
  ASSERT_EQ(e.ids, (std::vector<int64_t>{256, 261, 257, 261}));  // </s> (rstrip) took both spaces: "the" unspaced
  EXPECT_EQ(e.starts[2], 6);
  EXPECT_EQ(e.ends[2], 10);  // trimmed back from 12 (its matched text ends in two spaces)
  EXPECT_EQ(tok.token_to_id("</s>"), 257);
  EXPECT_FALSE(tok.token_to_id("<mask>"));
}

// Naive BPE over byte strings: merge the lowest-ranked adjacent pair, leftmost first, until none applies.
std::vector<std::string> naive_bpe(const std::string& word, const Merges& merges) {
  std::map<std::pair<std::string, std::string>, int> rank;
  for (size_t r = 0; r < merges.size(); ++r) rank[merges[r]] = static_cast<int>(r);
  std::vector<std::string> s;
  for (char c : word) s.emplace_back(1, c);
  while (s.size() > 1) {
    int best = INT_MAX;
    size_t at = 0;
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      auto it = rank.find({s[i], s[i + 1]});
      if (it != rank.end() && it->second < best) best = it->second, at = i;
    }
    if (best == INT_MAX) break;
    s[at] += s[at + 1];
    s.erase(s.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
  return s;
}

TEST(BPE, ScanAndHeapPathsEqualNaiveBPE) {
  const Merges merges{{"a", "b"}, {"b", "a"}, {"a", "a"}, {"ab", "ab"}, {"aa", "a"}, {"ba", "ba"}, {"abab", "a"}};
  const auto tok = make(merges);
  std::mt19937 rng(3);
  for (size_t n : {1, 2, 3, 5, 63, 64, 65, 66, 200, 1000}) {
    for (int rep = 0; rep < 20; ++rep) {
      std::string word;
      for (size_t i = 0; i < n; ++i) word += "ab"[rng() % 2];
      const Encoding e = tok.encode(word);
      const auto want = naive_bpe(word, merges);
      ASSERT_EQ(e.size(), want.size()) << word;
      for (size_t i = 0; i < want.size(); ++i) {
        EXPECT_EQ(tok.token_to_id(byte_chars(want[i])), e.ids[i]) << word << " token " << i;
      }
    }
  }
}

TEST(BPE, InvalidInputAndVocabulariesAreErrors) {
  const auto tok = make({});
  expect_error([&] { tok.encode("ok \xFF"); }, {"not valid UTF-8"});
  std::vector<std::pair<std::string, int64_t>> small{{"a", 0}};
  expect_error([&] { ByteLevelBPETokenizer(small, {}, {}); }, {"lacks", "byte"});
  expect_error([&] { ByteLevelBPETokenizer::from_json_file("/nonexistent/tokenizer.json"); }, {"missing"});
}

}  // namespace
}  // namespace qaengine::test
