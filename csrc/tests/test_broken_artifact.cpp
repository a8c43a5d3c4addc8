// Broken artifacts, float and int8: every malformed manifest, weights file, tensor and tokenizer is refused by
// Engine::load with an error that names the file, the field and what was expected; zero-width int8 Linears load.
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "qaengine/engine.h"
#include "safetensors.h"
#include "test_util.h"

namespace qaengine::test {
namespace {

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

}  // namespace
}  // namespace qaengine::test
