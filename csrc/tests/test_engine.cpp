// Engine: fp32 parity with the Python reference logits, answers equal to the Python QAEngine, and clear errors for
// broken artifacts and bad inputs.
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

// Int8 artifacts need torch's oneDNN int8 linear; a torch without it makes the engine refuse them (by kernel name).
#define REQUIRE_INT8_KERNELS() \
  if (supported_kernels("cpu").empty()) GTEST_SKIP() << "this torch build has no oneDNN int8 linear"

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

// ---- broken artifacts --------------------------------------------------------------------------------------------

class BrokenArtifact : public ::testing::Test {
 protected:
  void SetUp() override {
    if (artifacts_dir().empty() || !fs::is_directory(artifacts_dir() + "/tiny_bert")) {
      GTEST_SKIP() << "no test artifacts";
    }
    copy_dir(artifacts_dir() + "/tiny_bert", dir_.path() / "a");
    art_ = (dir_.path() / "a").string();
  }
  nlohmann::json manifest() const { return nlohmann::json::parse(read_file(art_ + "/engine.json")); }
  void set_manifest(const nlohmann::json& m) { write_file(art_ + "/engine.json", m.dump()); }
  TempDir dir_;
  std::string art_;
};

TEST_F(BrokenArtifact, Manifest) {
  expect_error([&] { Engine::load(art_ + "/nope"); }, {"engine.json is missing"});
  auto m = manifest();
  m["format_version"] = 2;  // a float artifact labelled as int8
  set_manifest(m);
  expect_error([&] { Engine::load(art_); },
               {"format_version 2 is for int8 artifacts, but dtype is 'float32'", "format_version 1"});
  m["format_version"] = 4;
  set_manifest(m);
  expect_error([&] { Engine::load(art_); }, {"format_version 4", "newer"});
  m = manifest();
  m["format_version"] = 1;
  m["extra"] = 1;
  set_manifest(m);
  expect_error([&] { Engine::load(art_); }, {"unknown field(s)", "'extra'"});
  m.erase("extra");
  m.erase("null_threshold");
  set_manifest(m);
  expect_error([&] { Engine::load(art_); }, {"missing field(s)", "'null_threshold'"});
  m["null_threshold"] = 0.0;
  m["dtype"] = "int8";
  set_manifest(m);
  expect_error([&] { Engine::load(art_); }, {"dtype 'int8' needs format_version 2", "'quantization' block"});
  m["dtype"] = "float64";
  set_manifest(m);
  expect_error([&] { Engine::load(art_); }, {"'dtype' is 'float64'", "'int8'"});
  m["dtype"] = "float32";
  m["config"]["activation"] = "swish";
  set_manifest(m);
  expect_error([&] { Engine::load(art_); }, {"unknown activation 'swish'"});
  m["config"]["activation"] = "gelu";
  m["config"]["heads"] = {3, 0, 1};
  set_manifest(m);
  expect_error([&] { Engine::load(art_); }, {"3 per-layer head counts but 4 FFN widths"});
  m["config"]["heads"] = {3, 0, 1, 2};
  m["tokenizer"]["max_seq_length"] = 10000;
  set_manifest(m);
  expect_error([&] { Engine::load(art_); }, {"max_seq_length 10000 exceeds"});
  write_file(art_ + "/engine.json", "{\"format\": ");
  expect_error([&] { Engine::load(art_); }, {"not valid JSON"});
}

TEST_F(BrokenArtifact, WeightsDisagreeWithManifest) {
  auto m = manifest();
  m["config"]["ffn"][0] = 51;
  set_manifest(m);
  expect_error([&] { Engine::load(art_); }, {"weights.safetensors", "'layers.0.ffn_in.weight'", "expected (51, 96)"});
  m["config"]["ffn"][0] = 50;
  m["dtype"] = "bfloat16";
  set_manifest(m);
  expect_error([&] { Engine::load(art_); }, {"has dtype F32, expected BF16"});
}

TEST_F(BrokenArtifact, TensorNamesAndValues) {
  std::string w = read_file(art_ + "/weights.safetensors");
  const size_t pos = w.find("\"qa.bias\"");
  ASSERT_NE(pos, std::string::npos);
  std::string renamed = w;
  renamed.replace(pos, 9, "\"qa.biaz\"");  // same length: the file stays consistent
  write_file(art_ + "/weights.safetensors", renamed);
  expect_error([&] { Engine::load(art_); }, {"tensor 'qa.bias' is missing"});

  // NaN inside qa.weight's data
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(w[i]);
  const auto header = nlohmann::json::parse(w.substr(8, n));
  const size_t begin = header["qa.weight"]["data_offsets"][0];
  const float nan = std::nanf("");
  std::memcpy(&w[8 + n + begin], &nan, 4);
  write_file(art_ + "/weights.safetensors", w);
  expect_error([&] { Engine::load(art_); }, {"'qa.weight' contains NaN or inf"});

  fs::remove(art_ + "/weights.safetensors");
  expect_error([&] { Engine::load(art_); }, {"weights.safetensors", "missing"});
}

TEST_F(BrokenArtifact, TruncatedWeightsAndMissingTokenizer) {
  const std::string w = read_file(art_ + "/weights.safetensors");
  write_file(art_ + "/weights.safetensors", w.substr(0, w.size() / 2));
  expect_error([&] { Engine::load(art_); }, {"weights.safetensors", "truncated"});
  fs::remove(art_ + "/tokenizer.json");
  expect_error([&] { Engine::load(art_); }, {"tokenizer.json", "missing"});
}

// ---- broken int8 artifacts -------------------------------------------------------------------------------------

class BrokenInt8Artifact : public BrokenArtifact {
 protected:
  void SetUp() override {
    REQUIRE_INT8_KERNELS();  // the engine checks its kernels before the weights
    BrokenArtifact::SetUp();
  }
  void use(const std::string& name) {
    if (!fs::is_directory(artifacts_dir() + "/" + name)) ADD_FAILURE() << "no test artifact " << name;
    fs::remove_all(dir_.path() / "a");
    copy_dir(artifacts_dir() + "/" + name, dir_.path() / "a");
  }
  // Overwrites `bytes` at the start of tensor `name`'s data in weights.safetensors.
  void poke(const std::string& name, const void* bytes, size_t n) {
    std::string w = read_file(art_ + "/weights.safetensors");
    uint64_t len = 0;
    for (int i = 7; i >= 0; --i) len = (len << 8) | static_cast<uint8_t>(w[i]);
    const auto header = nlohmann::json::parse(w.substr(8, len));
    const size_t begin = header.at(name).at("data_offsets")[0];
    std::memcpy(&w[8 + len + begin], bytes, n);
    write_file(art_ + "/weights.safetensors", w);
  }
  // Renames tensor `from` to `to` (same length) in the header: the file stays consistent.
  void rename(const std::string& from, const std::string& to) {
    ASSERT_EQ(from.size(), to.size());
    std::string w = read_file(art_ + "/weights.safetensors");
    const size_t pos = w.find("\"" + from + "\"");
    ASSERT_NE(pos, std::string::npos);
    w.replace(pos + 1, from.size(), to);
    write_file(art_ + "/weights.safetensors", w);
  }
};

TEST_F(BrokenInt8Artifact, Manifest) {
  use("tiny_bert_int8");
  const auto good = manifest();
  EXPECT_NO_THROW(Engine::load(art_));
  auto broken = [&](auto edit, std::initializer_list<std::string> parts) {
    auto m = good;
    edit(m);
    set_manifest(m);
    expect_error([&] { Engine::load(art_); }, parts);
  };
  using J = nlohmann::json;
  broken([](J& m) { m.erase("quantization"); }, {"missing field(s) ['quantization']"});
  broken([](J& m) { m["quantization"] = 5; }, {"field 'quantization' must be an object"});
  broken([](J& m) { m["quantization"]["activations"] = "per_tensor"; },
         {"activations is 'per_tensor'", "expected one of ['dynamic_per_token', 'static_per_input_channel']"});
  broken([](J& m) { m["quantization"]["kernels"] = J::array({"int8_gemm_static"}); },
         {"activations 'dynamic_per_token' need kernels ['int8_gemm_per_token']",
          "the manifest lists ['int8_gemm_static']"});
  broken([](J& m) { m["quantization"]["kernels"] = J::array({"int4_gemm"}); },
         {"requires kernel(s) ['int4_gemm'] that this SparseQA does not know", "upgrade SparseQA"});
  broken([](J& m) { m["quantization"]["kernels"] = "int8_gemm_per_token"; }, {"kernels must be a list"});
  broken([](J& m) { m["quantization"]["weights"] = "int4_groupwise"; }, {"weights is 'int4_groupwise'"});
  broken(
      [](J& m) {
        m["quantization"]["linears"] = J::array({"qkv", "o"});
      },
      {"linears must be ['qkv', 'o', 'ffn_in'"});
  broken([](J& m) { m["quantization"]["float_dtype"] = "bfloat16"; }, {"float_dtype must be 'float32'"});
  broken([](J& m) { m["quantization"]["extra"] = 1; }, {"unknown key(s) ['extra']"});
  broken([](J& m) { m["quantization"].erase("calibration"); }, {"missing key(s) ['calibration']"});
  broken([](J& m) { m["quantization"]["calibration"] = J::object(); },
         {"calibration must be null for 'dynamic_per_token' activations"});
  broken([](J& m) { m["dtype"] = "float32"; }, {"format_version 2 is for int8 artifacts, but dtype is 'float32'"});
  broken([](J& m) { m["format_version"] = 1; }, {"dtype 'int8' needs format_version 2"});
  broken(
      [](J& m) {
        m["format_version"] = 1;
        m.erase("quantization");
      },
      {"dtype 'int8' needs format_version 2"});
  // A static manifest over dynamic weights: the input scales are missing.
  broken(
      [](J& m) {
        m["quantization"]["activations"] = "static_per_input_channel";
        m["quantization"]["kernels"] = J::array({"int8_gemm_static"});
        m["quantization"]["calibration"] = J::object();
      },
      {"tensor 'layers.0.qkv.input_scale' is missing"});
  use("tiny_bert_int8s");
  auto m = manifest();
  m["quantization"]["calibration"] = nullptr;
  set_manifest(m);
  expect_error([&] { Engine::load(art_); }, {"static activation scales need a 'calibration' object"});
}

TEST_F(BrokenInt8Artifact, Int8Values) {
  use("tiny_bert_int8");
  const int8_t minus128 = -128;
  poke("layers.3.ffn_out.weight", &minus128, 1);
  expect_error([&] { Engine::load(art_); },
               {"weights.safetensors: tensor 'layers.3.ffn_out.weight' holds -128", "[-127, 127]"});
}

TEST_F(BrokenInt8Artifact, Scales) {
  use("tiny_bert_int8");
  const float neg = -1.f, zero = 0.f, inf = INFINITY;
  poke("layers.0.qkv.weight_scale", &neg, 4);
  expect_error([&] { Engine::load(art_); },
               {"tensor 'layers.0.qkv.weight_scale' must be positive and finite (min -1)"});
  poke("layers.0.qkv.weight_scale", &zero, 4);
  expect_error([&] { Engine::load(art_); }, {"'layers.0.qkv.weight_scale' must be positive and finite (min 0)"});
  poke("layers.0.qkv.weight_scale", &inf, 4);
  expect_error([&] { Engine::load(art_); }, {"'layers.0.qkv.weight_scale' contains NaN or inf"});
  use("tiny_bert_int8s");
  poke("layers.2.o.input_scale", &neg, 4);
  expect_error([&] { Engine::load(art_); }, {"'layers.2.o.input_scale' must be positive and finite (min -1)"});
}

TEST_F(BrokenInt8Artifact, TensorNamesShapesAndDtypes) {
  use("tiny_bert_int8");
  rename("layers.0.o.weight_scale", "layers.0.o.weight_scalx");
  expect_error([&] { Engine::load(art_); }, {"tensor 'layers.0.o.weight_scale' is missing"});
  use("tiny_bert_int8s");  // dynamic manifest over static weights: input scales are unexpected
  auto m = manifest();
  m["quantization"]["activations"] = "dynamic_per_token";
  m["quantization"]["kernels"] = nlohmann::json::array({"int8_gemm_per_token"});
  m["quantization"]["calibration"] = nullptr;
  set_manifest(m);
  expect_error([&] { Engine::load(art_); },
               {"unexpected tensor 'layers.", ".input_scale' (not in the manifest's config and quantization)"});
  use("tiny_bert_int8s");  // zero-width Linears keep their zero dimension: 0 heads -> o.input_scale [0]
  m = manifest();
  m["config"]["ffn"][0] = 51;
  set_manifest(m);
  expect_error([&] { Engine::load(art_); }, {"'layers.0.ffn_in.weight' has shape (50, 96), expected (51, 96)"});
  use("tiny_bert");  // float weights under an int8 manifest
  m = manifest();
  auto q = nlohmann::json::parse(read_file(artifacts_dir() + "/tiny_bert_int8/engine.json"))["quantization"];
  m["format_version"] = 2;
  m["dtype"] = "int8";
  m["quantization"] = q;
  set_manifest(m);
  expect_error([&] { Engine::load(art_); }, {"tensor 'layers.0.qkv.weight_scale' is missing"});
}

TEST_F(BrokenInt8Artifact, ZeroWidthLinearsLoadAndRun) {
  // tiny_bert has a 0-head layer (qkv [0, 96], o [96, 0], o.input_scale [0]) and a 0-FFN layer.
  for (const char* name : {"tiny_bert_int8", "tiny_bert_int8s"}) {
    use(name);
    const auto q = SafetensorsFile::read(art_ + "/weights.safetensors", "w");
    EXPECT_EQ(q.tensors().at("layers.1.o.weight").shape, (std::vector<int64_t>{96, 0}));
    EXPECT_EQ(q.tensors().at("layers.2.ffn_in.weight").shape, (std::vector<int64_t>{0, 96}));
    if (std::string(name) == "tiny_bert_int8s") {
      EXPECT_EQ(q.tensors().at("layers.1.o.input_scale").shape, (std::vector<int64_t>{0}));
    }
    const Engine engine = Engine::load(art_);
    const std::vector<int64_t> ids{2, 5, 6, 3}, types{0, 0, 1, 1};
    const std::vector<int32_t> cu{0, 4};
    const Logits out = engine.forward_packed(ids.data(), types.data(), 4, cu.data(), 1, 4);
    for (float v : out.start) EXPECT_TRUE(std::isfinite(v));
  }
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
