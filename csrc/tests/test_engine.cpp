// Engine: fp32 parity with the Python reference logits, answers equal to the Python QAEngine, and clear errors for
// bad inputs (broken artifacts: test_broken_artifact.cpp).
#include <ATen/ops/from_blob.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "qaengine/aten.h"
#include "qaengine/engine.h"
#include "linear.h"
#include "safetensors.h"
#include "test_util.h"

namespace qaengine::test {
namespace {

struct Reference {
  std::vector<int64_t> ids, types;
  std::vector<int32_t> cu;
  std::vector<float> start, end;
  std::vector<float> start_fp32, end_fp32;  // bf16 / int8 artifacts: the fp32 model they approximate
  std::vector<float> noise_floor;           // bf16 / int8: see make_test_artifacts.py noise_floor
};

Reference load_reference(const std::string& art) {
  // reference.safetensors holds I64 / I32 inputs that SafetensorsFile does not convert; parse them directly.
  const std::string bytes = read_file(fs::path(art) / "reference.safetensors");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  const auto header = nlohmann::json::parse(bytes.substr(8, n));
  const char* data = bytes.data() + 8 + n;
  auto take = [&](const std::string& name, auto& vec) {
    const auto& off = header.at(name).at("data_offsets");
    const size_t b = off[0], e = off[1];
    vec.resize((e - b) / sizeof(vec[0]));
    std::memcpy(vec.data(), data + b, e - b);
  };
  Reference r;
  take("input_ids", r.ids);
  take("token_type_ids", r.types);
  take("cu_seqlens", r.cu);
  take("start", r.start);
  take("end", r.end);
  if (header.contains("start_fp32")) {
    take("start_fp32", r.start_fp32);
    take("end_fp32", r.end_fp32);
    take("noise_floor", r.noise_floor);
  }
  return r;
}

double l2_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) s += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
  return std::sqrt(s);
}

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  float m = 0.f;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}


class Parity : public ::testing::TestWithParam<std::string> {};

TEST_P(Parity, LogitsMatchPythonReference) {
  REQUIRE_ARTIFACT(art, GetParam());
  if (GetParam().find("int8") != std::string::npos) REQUIRE_INT8_KERNELS();
  if (GetParam().find("bf16") != std::string::npos && !qaengine::onednn_bf16_available())
    GTEST_SKIP() << "oneDNN cannot run bf16 GEMMs on this CPU (needs AVX-512 BF16 or AVX512BW/VL/DQ)";
  const Engine engine = Engine::load(art);
  const Reference r = load_reference(art);
  int64_t longest = 0;
  for (size_t b = 0; b + 1 < r.cu.size(); ++b) longest = std::max<int64_t>(longest, r.cu[b + 1] - r.cu[b]);
  const Logits out = engine.forward_packed(r.ids.data(), r.types.data(), static_cast<int64_t>(r.ids.size()),
                                           r.cu.data(), static_cast<int64_t>(r.cu.size()) - 1, longest);
  if (r.start_fp32.empty()) {  // fp32 compute on both sides
    EXPECT_LT(max_abs_diff(out.start, r.start), 1e-4f);
    EXPECT_LT(max_abs_diff(out.end, r.end), 1e-4f);
  } else {
    // bf16 / int8: the reference is the torch backend running the same scheme (same quantization arithmetic, same
    // oneDNN GEMM; test_quant.cpp checks the codes bit for bit). The two differ by fp32 rounding in the other ops
    // (~1e-7 relative), which the reduced precision amplifies: a value that close to a rounding boundary rounds the
    // other way, a full step, and that moves later inputs enough to flip more roundings. make_test_artifacts.py
    // measures this floor on the torch model itself (relative noise 1e-6 on its embeddings, the largest distance
    // over 3 seeds); the engine must stay within twice that floor (a different perturbation of the same size) plus
    // fp32 noise, and closer to the torch numerics than the precision's own error (against the fp32 model).
    ASSERT_EQ(r.noise_floor.size(), 1u);
    const double floor = r.noise_floor[0];
    const double own = l2_diff(r.start, r.start_fp32) + l2_diff(r.end, r.end_fp32);
    const double got = l2_diff(out.start, r.start) + l2_diff(out.end, r.end);
    const std::vector<float> zeros(r.start.size(), 0.f);
    const double scale = l2_diff(r.start, zeros) + l2_diff(r.end, zeros);
    EXPECT_GT(own, 0.0);  // the precision is really reduced
    EXPECT_LE(got, 2 * floor + 1e-6 * scale) << "distance to the torch numerics " << got << ", noise floor " << floor;
    EXPECT_LT(got, own) << "distance to the torch numerics " << got << ", precision's own error " << own;
    EXPECT_EQ(std::string(engine.precision()), GetParam() == "tiny_bert_bf16"   ? "bfloat16"
                                               : GetParam() == "tiny_bert_int8" ? "int8_dynamic_per_token"
                                                                                : "int8_static_per_input_channel");
  }

  // The ATen entry point gives the same numbers.
  auto ids = at::from_blob(const_cast<int64_t*>(r.ids.data()), {static_cast<int64_t>(r.ids.size())}, at::kLong);
  auto types = at::from_blob(const_cast<int64_t*>(r.types.data()), {static_cast<int64_t>(r.types.size())}, at::kLong);
  auto cu = at::from_blob(const_cast<int32_t*>(r.cu.data()), {static_cast<int64_t>(r.cu.size())}, at::kInt);
  auto [s, e] = forward_packed(engine, ids, types, cu, longest + 5);
  ASSERT_EQ(s.numel(), static_cast<int64_t>(r.start.size()));
  EXPECT_EQ(std::vector<float>(s.data_ptr<float>(), s.data_ptr<float>() + s.numel()), out.start);
}

INSTANTIATE_TEST_SUITE_P(Artifacts, Parity,
                         ::testing::Values("tiny_bert", "tiny_bert_bf16", "tiny_bert_fp16", "tiny_bert_fp16_embq",
                                           "tiny_bert_int8", "tiny_bert_int8s", "tiny_hd24", "tiny_roberta"));

TEST(Engine, PrecisionAndKernels) {
  REQUIRE_ARTIFACT(art, "tiny_bert_fp16");
  REQUIRE_INT8_KERNELS();
  EXPECT_EQ(std::string(Engine::load(art).precision()), "float32");  // fp16 artifacts are upcast
  const auto cpu = supported_kernels("cpu");
  EXPECT_EQ(cpu, (std::vector<std::string>{"int8_gemm_per_token", "int8_gemm_static"}));
  EXPECT_TRUE(supported_kernels("cuda").empty());
  expect_error([] { supported_kernels("tpu"); }, {"device 'tpu'"});
}

TEST(Engine, Int8ArtifactsAreRefusedOnCuda) {
  // Checked before any weight moves to the device, so this runs without a GPU.
  for (const char* name : {"tiny_bert_int8", "tiny_bert_int8s"}) {
    REQUIRE_ARTIFACT(art, name);
    expect_error([&] { Engine::load(art, "cuda"); },
                 {"needs kernel(s) ['int8_gemm_", "does not provide on cuda", "CPU only"});
  }
}

TEST(Engine, Int8AnswersEndToEnd) {
  REQUIRE_ARTIFACT(art, "tiny_bert_int8");
  REQUIRE_INT8_KERNELS();
  const Engine engine = Engine::load(art);
  const std::string context = read_file(fs::path(artifacts_dir()) / "context.txt");
  const Answer a = engine.answer("What is the capital of France?", context, 8, 1e9);
  EXPECT_FALSE(a.no_answer);
  EXPECT_EQ(context.substr(a.start_byte, a.end_byte - a.start_byte), a.text);
}

class AnswersMatchPythonQAEngine : public ::testing::TestWithParam<std::string> {};

TEST_P(AnswersMatchPythonQAEngine, OnEveryQuestionAndThreshold) {
  REQUIRE_ARTIFACT(art, GetParam());
  const Engine engine = Engine::load(art);
  const auto j = nlohmann::json::parse(read_file(fs::path(art) / "answers.json"));
  const std::string context = j["context"];
  for (const auto& want : j["answers"]) {
    std::optional<double> threshold;
    if (!want["null_threshold"].is_null()) threshold = want["null_threshold"].get<double>();
    const Answer a = engine.answer(want["question"].get<std::string>(), context, 8, threshold);
    EXPECT_EQ(a.text, want["text"].get<std::string>());
    EXPECT_EQ(a.start, want["start"].get<int64_t>());
    EXPECT_EQ(a.end, want["end"].get<int64_t>());
    EXPECT_EQ(a.no_answer, want["no_answer"].get<bool>());
    EXPECT_NEAR(a.score, want["score"].get<double>(), 1e-4);
    EXPECT_NEAR(a.null_score_diff, want["null_score_diff"].get<double>(), 1e-4);
    if (!a.no_answer) EXPECT_EQ(context.substr(a.start_byte, a.end_byte - a.start_byte), a.text);
  }
}

// BERT (WordPiece) and RoBERTa (byte-level BPE, <s> q </s></s> c </s>, position offset 2).
INSTANTIATE_TEST_SUITE_P(Engine, AnswersMatchPythonQAEngine, ::testing::Values("tiny_bert", "tiny_roberta"));

TEST(Engine, AnswerOffsetsOnNonAsciiContext) {
  REQUIRE_ARTIFACT(art, "tiny_bert");
  const Engine engine = Engine::load(art);
  // Multi-byte characters before the answer make code-point and byte offsets differ.
  const std::string context = "東京 é é. Paris is the capital of France, on the river Seine.";
  const Answer a = engine.answer("What is the capital?", context, 30, 1e9);  // force an answer
  ASSERT_FALSE(a.no_answer);
  EXPECT_EQ(context.substr(a.start_byte, a.end_byte - a.start_byte), a.text);
  EXPECT_GT(a.start_byte, a.start);  // 東京 and é are multi-byte
}

TEST(Engine, LongContextMakesSeveralWindows) {
  REQUIRE_ARTIFACT(art, "tiny_bert");
  const Engine engine = Engine::load(art);
  std::string context;
  for (int i = 0; i < 40; ++i) context += "The tower was built in the first century by the king. ";
  const Answer a = engine.answer("Who built the tower?", context, 30, 1e9);
  EXPECT_FALSE(a.no_answer);
  EXPECT_EQ(context.substr(a.start_byte, a.end_byte - a.start_byte), a.text);
}

TEST(Engine, RobertaTokenizesTextAndRunsIds) {
  REQUIRE_ARTIFACT(art, "tiny_roberta");
  const Engine engine = Engine::load(art);
  const Encoding enc = engine.tokenize("Paris is the capital.");
  ASSERT_FALSE(enc.ids.empty());
  EXPECT_EQ(enc.starts.front(), 0);
  EXPECT_EQ(enc.ends.back(), 21);
  const std::vector<int64_t> ids{0, 5, 6, 2}, types(4, 0);
  const std::vector<int32_t> cu{0, 4};
  EXPECT_EQ(engine.forward_packed(ids.data(), types.data(), 4, cu.data(), 1, 4).start.size(), 4u);
}

TEST(Engine, RobertaWithoutUsableTokenizerStillRunsIds) {
  REQUIRE_ARTIFACT(art, "tiny_roberta");
  TempDir dir;
  copy_dir(art, dir.path() / "a");
  fs::copy_file(artifacts_dir() + "/tokenizer/tokenizer.json", dir.path() / "a" / "tokenizer.json",
                fs::copy_options::overwrite_existing);  // WordPiece, without <s> / </s>
  const Engine engine = Engine::load((dir.path() / "a").string());
  const std::vector<int64_t> ids{0, 5, 6, 2}, types(4, 0);
  const std::vector<int32_t> cu{0, 4};
  EXPECT_EQ(engine.forward_packed(ids.data(), types.data(), 4, cu.data(), 1, 4).start.size(), 4u);
  expect_error([&] { engine.answer("who?", "someone"); }, {"lacks <s> or </s>", "forward_packed"});
}

TEST(Engine, BadInputsRaise) {
  REQUIRE_ARTIFACT(art, "tiny_bert");
  const Engine engine = Engine::load(art);
  const std::vector<int64_t> ids{2, 5, 6, 3}, types{0, 0, 1, 1};
  auto run = [&](std::vector<int32_t> cu, std::vector<int64_t> i, std::vector<int64_t> t, int64_t max_seqlen) {
    engine.forward_packed(i.data(), t.data(), static_cast<int64_t>(i.size()), cu.data(),
                          static_cast<int64_t>(cu.size()) - 1, max_seqlen);
  };
  expect_error([&] { run({0, 3}, ids, types, 4); }, {"cu_seqlens must end at the token count 4"});
  expect_error([&] { run({1, 4}, ids, types, 4); }, {"cu_seqlens[0] must be 0"});
  expect_error([&] { run({0, 3, 2, 4}, ids, types, 4); }, {"non-decreasing"});
  expect_error([&] { run({0, 4}, ids, types, 3); }, {"max_seqlen 3"});
  expect_error([&] { run({0, 4}, {2, 5, 100000, 3}, types, 4); }, {"input_ids[2] = 100000", "vocabulary"});
  expect_error([&] { run({0, 4}, ids, {0, 0, 2, 1}, 4); }, {"token_type_ids[2] = 2"});
  expect_error([&] { run({0, 4}, ids, {0, 0, -1, 1}, 4); }, {"token_type_ids[2] = -1"});
  std::vector<int64_t> long_ids(400, 5), long_types(400, 0);
  expect_error([&] { run({0, 400}, long_ids, long_types, 400); }, {"exceeds the model's 320 positions"});
  expect_error([&] { engine.answer("   ", "context"); }, {"question is empty"});
  expect_error([&] { engine.answer("who?", ""); }, {"context is empty"});
  expect_error([&] { engine.answer("who?", "ok", 0); }, {"max_answer_length"});
  expect_error([&] { engine.answer(std::string("who\xff?"), "ok"); }, {"not valid UTF-8"});
  // An empty batch is fine.
  const std::vector<int32_t> cu0{0};
  EXPECT_TRUE(engine.forward_packed(nullptr, nullptr, 0, cu0.data(), 0, 0).start.empty());
}


TEST(Engine, UnknownDevice) {
  REQUIRE_ARTIFACT(art, "tiny_bert");
  expect_error([&] { Engine::load(art, "tpu"); }, {"device 'tpu'"});
}

TEST(Engine, MiniLMAnswersEndToEnd) {
  REQUIRE_ARTIFACT(art, "minilm");
  const Engine engine = Engine::load(art);
  const std::string context = read_file(fs::path(artifacts_dir()) / "context.txt");
  const Answer a = engine.answer("What is the capital of France?", context, 30, 1e9);
  EXPECT_FALSE(a.text.empty());
  EXPECT_LE(a.end - a.start, static_cast<int64_t>(a.text.size()));
  EXPECT_EQ(context.substr(a.start_byte, a.end_byte - a.start_byte), a.text);
  EXPECT_TRUE(std::isfinite(a.score));
}

}  // namespace
}  // namespace qaengine::test
