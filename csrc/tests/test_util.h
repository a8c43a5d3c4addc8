// Helpers shared by the C++ unit tests.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "qaengine/config.h"
#include "qaengine/engine.h"
#include "qaengine/error.h"

namespace qaengine::test {

namespace fs = std::filesystem;

// Int8 artifacts need torch's oneDNN int8 linear; a torch without it makes the engine refuse them (by kernel name).
#define REQUIRE_INT8_KERNELS() \
  if (supported_kernels("cpu").empty()) GTEST_SKIP() << "this torch build has no oneDNN int8 linear"

/// n draws of N(0, scale²) from a seeded generator.
inline std::vector<float> randn(size_t n, uint64_t seed, float scale = 1.f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

/// act(x) in double precision: the reference of every activation kernel.
inline double act_ref(double x, Activation a) {
  switch (a) {
    case Activation::Gelu: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case Activation::GeluTanh: return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    case Activation::Relu: return x > 0 ? x : 0;
  }
  return 0;
}

/// Directory written by make_test_artifacts.py (ctest fixture), or "" when the tests run without it.
inline std::string artifacts_dir() {
  const char* d = std::getenv("QAENGINE_TEST_ARTIFACTS");
  return d && fs::is_directory(d) ? std::string(d) : std::string();
}

#define REQUIRE_ARTIFACT(var, name)                                                                                 \
  const std::string var =                                                                                           \
      ::qaengine::test::artifacts_dir().empty() ? std::string() : ::qaengine::test::artifacts_dir() + "/" + (name); \
  if (var.empty() || !::qaengine::test::fs::is_directory(var))                                                      \
  GTEST_SKIP() << "no test artifact " << (name) << " (set QAENGINE_TEST_ARTIFACTS)"

/// A fresh temporary directory, removed at destruction.
class TempDir {
 public:
  TempDir() {
    static std::mt19937_64 rng{std::random_device{}()};
    path_ = fs::temp_directory_path() / ("qaengine_test_" + std::to_string(rng()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string str() const { return path_.string(); }
  fs::path path() const { return path_; }

 private:
  fs::path path_;
};

inline std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void write_file(const fs::path& p, const std::string& data) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
}

/// Copies an artifact directory into `dst`.
inline void copy_dir(const std::string& src, const fs::path& dst) {
  fs::create_directories(dst);
  for (const auto& e : fs::directory_iterator(src)) fs::copy_file(e.path(), dst / e.path().filename());
}

/// A safetensors file from a header JSON string and a data buffer.
inline std::string safetensors_bytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

/// Runs `f`, expecting qaengine::Error whose message contains every string in `parts`.
template <typename F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected qaengine::Error";
  } catch (const qaengine::Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nmissing: " << p;
  }
}

}  // namespace qaengine::test
