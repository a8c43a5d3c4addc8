// WordPiece tokenizer rules on a small vocabulary (HF parity on real data is tested from Python, where HF runs).
#include "qaengine/tokenizer.h"
#include "test_util.h"
#include "windows.h"

namespace qaengine::test {
namespace {

WordPieceTokenizer make(bool lower = true, bool strip = true) {
  std::vector<std::string> words = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "un",  "##aff", "##able", "want",
                                    "##ed",  "runn",  "##ing", ",",     ".",   "e",     "a",      "東",
                                    "京",    "hello", "##s",   "caf",   "##e", "Café",  "i",      "##̇"};
  std::vector<std::pair<std::string, int64_t>> vocab;
  for (size_t i = 0; i < words.size(); ++i) vocab.emplace_back(words[i], static_cast<int64_t>(i));
  WordPieceOptions opt;
  opt.lowercase = lower;
  opt.strip_accents = strip;
  return WordPieceTokenizer(vocab, opt, {{"[SEP]", 3}, {"[CLS]", 2}});
}

std::vector<int64_t> ids(const WordPieceTokenizer& t, const std::string& s) {
  return t.encode(s).ids;
}

TEST(Tokenizer, GreedyLongestMatchWithContinuations) {
  const auto t = make();
  EXPECT_EQ(ids(t, "unaffable"), (std::vector<int64_t>{4, 5, 6}));
  EXPECT_EQ(ids(t, "Wanted, running."), (std::vector<int64_t>{7, 8, 11, 9, 10, 12}));
  EXPECT_EQ(ids(t, "unknownword"), (std::vector<int64_t>{1}));  // no piece matches: the whole word is [UNK]
  EXPECT_EQ(ids(t, std::string(100, 'a')), (std::vector<int64_t>{1}));
  EXPECT_EQ(ids(t, std::string(101, 'a')), (std::vector<int64_t>{1}));  // over max_input_chars_per_word
  EXPECT_TRUE(ids(t, " \t\n ").empty());
}

TEST(Tokenizer, OffsetsInCodePointsAndBytes) {
  const auto t = make();
  const std::string s = "Café hellos";  // é is 2 bytes
  const Encoding e = t.encode(s);
  ASSERT_EQ(e.ids, (std::vector<int64_t>{19, 20, 17, 18}));  // caf ##e (accent stripped) hello ##s
  EXPECT_EQ(e.starts, (std::vector<int64_t>{0, 3, 5, 10}));
  EXPECT_EQ(e.ends, (std::vector<int64_t>{3, 4, 10, 11}));
  EXPECT_EQ(e.byte_starts, (std::vector<int64_t>{0, 3, 6, 11}));
  EXPECT_EQ(e.byte_ends, (std::vector<int64_t>{3, 5, 11, 12}));
}

TEST(Tokenizer, NormalizationSteps) {
  const auto t = make();
  // CJK characters are split off; control characters vanish; NBSP is whitespace.
  const Encoding e = t.encode(
      "a東京\x01"
      "e\xC2\xA0"
      "e");
  EXPECT_EQ(e.ids, (std::vector<int64_t>{14, 15, 16, 13, 13}));
  EXPECT_EQ(e.starts, (std::vector<int64_t>{0, 1, 2, 4, 6}));
  // Combining accent (NFD + Mn removal), upper case.
  EXPECT_EQ(ids(t, "E\xCC\x81"), (std::vector<int64_t>{13}));
  // Cased tokenizer keeps case and accents.
  const auto cased = make(false, false);
  EXPECT_EQ(ids(cased, "Café"), (std::vector<int64_t>{21}));
  // Lower-casing İ gives i + combining dot (two pieces) that both map back to İ.
  const auto lower_only = make(true, false);
  const Encoding dot = lower_only.encode("\xC4\xB0");
  EXPECT_EQ(dot.ids, (std::vector<int64_t>{22, 23}));
  EXPECT_EQ(dot.starts, (std::vector<int64_t>{0, 0}));
  EXPECT_EQ(dot.ends, (std::vector<int64_t>{1, 1}));
}

TEST(Tokenizer, SpecialTokensInTextAndInvalidUtf8) {
  const auto t = make();
  const Encoding e = t.encode("hello[SEP]hellos");
  EXPECT_EQ(e.ids, (std::vector<int64_t>{17, 3, 17, 18}));
  EXPECT_EQ(e.starts, (std::vector<int64_t>{0, 5, 10, 15}));
  expect_error([&] { t.encode("ab\xC3"); }, {"not valid UTF-8", "byte 2"});
  expect_error([&] { t.encode("\xED\xA0\x80"); }, {"not valid UTF-8"});  // a surrogate
}

TEST(Tokenizer, LoadsTokenizerJson) {
  REQUIRE_ARTIFACT(art, "tiny_bert");
  const auto t = WordPieceTokenizer::from_json_file(art + "/tokenizer.json");
  EXPECT_TRUE(t.options().lowercase);
  EXPECT_TRUE(t.token_to_id("[CLS]").has_value());
  EXPECT_FALSE(t.encode("Paris is the capital.").ids.empty());
  expect_error([&] { WordPieceTokenizer::from_json_file(art + "/engine.json"); }, {"model"});
}

TEST(Windows, DocStrideLayout) {
  const std::vector<int64_t> q{10, 11, 12};
  std::vector<int64_t> c(50);
  for (int i = 0; i < 50; ++i) c[i] = 100 + i;
  const WindowSettings s{20, 4, 8};  // room = 20 - 3 - 3 = 14 context tokens, step 10
  const auto ws = make_windows(q, c, s, Architecture::Bert, 1, 2);
  ASSERT_EQ(ws.size(), 5u);  // starts 0, 10, 20, 30, 40
  EXPECT_EQ(ws[0].input_ids.front(), 1);
  EXPECT_EQ(ws[0].input_ids[4], 2);
  EXPECT_EQ(ws[0].context_start, 5);
  EXPECT_EQ(ws[0].context_count, 14);
  EXPECT_EQ(ws[1].context_first, 10);
  EXPECT_EQ(ws[4].context_first, 40);
  EXPECT_EQ(ws[4].context_count, 10);
  EXPECT_EQ(ws[0].token_type_ids, (std::vector<int64_t>{0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}));
  const auto rb = make_windows(q, c, s, Architecture::Roberta, 0, 2);
  EXPECT_EQ(rb[0].context_start, 6);  // <s> q </s></s>
  EXPECT_EQ(rb[0].context_count, 13);
  EXPECT_EQ(rb[0].token_type_ids, std::vector<int64_t>(20, 0));
}

TEST(Windows, BestSpanAndNullScore) {
  const std::vector<int64_t> q{7};
  const std::vector<int64_t> c{20, 21, 22, 23};
  const WindowSettings s{8, 1, 4};  // room 4: one window [CLS] q [SEP] c0..c3 [SEP]
  const auto ws = make_windows(q, c, s, Architecture::Bert, 1, 2);
  ASSERT_EQ(ws.size(), 1u);
  std::vector<float> start{1.f, 0, 0, 0.5f, 3.f, 0, 0, 0}, end{0.5f, 0, 0, 0, 0, 0, 4.f, 0};
  const std::vector<int32_t> cu{0, 8};
  auto best = best_span(ws, start.data(), end.data(), cu, 30);
  EXPECT_TRUE(best.found);
  EXPECT_EQ(best.start_token, 1);  // window token 4 = context token 1
  EXPECT_EQ(best.end_token, 3);
  EXPECT_DOUBLE_EQ(best.score, 7.0);
  EXPECT_DOUBLE_EQ(best.null_score, 1.5);
  best = best_span(ws, start.data(), end.data(), cu, 2);  // spans of 3 tokens are no longer allowed
  EXPECT_EQ(best.start_token, 2);
  EXPECT_EQ(best.end_token, 3);
  EXPECT_DOUBLE_EQ(best.score, 4.0);
}

}  // namespace
}  // namespace qaengine::test
