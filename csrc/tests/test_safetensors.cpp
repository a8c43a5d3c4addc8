// The safetensors reader: valid files decode; every kind of corruption raises qaengine::Error naming the problem.
#include <cmath>
#include <cstring>

#include "safetensors.h"
#include "test_util.h"

namespace qaengine::test {
namespace {

std::string floats_bytes(std::initializer_list<float> v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(s.data(), v.begin(), s.size());
  return s;
}

SafetensorsFile read_bytes(const TempDir& dir, const std::string& bytes) {
  const auto p = dir.path() / "w.safetensors";
  write_file(p, bytes);
  return SafetensorsFile::read(p.string(), "w.safetensors");
}

TEST(Safetensors, ReadsF32Bf16F16) {
  TempDir dir;
  const std::string data = floats_bytes({1.5f, -2.f}) + std::string("\x80\x3f\x00\xc0", 4) +  // bf16: 1.0, -2.0
                           std::string("\x00\x3c\x01\x00\x00\x7c", 6);                        // f16: 1.0, 2^-24, inf
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]},)"
      R"("c":{"dtype":"F16","shape":[3],"data_offsets":[12,18]},)"
      R"("z":{"dtype":"F32","shape":[0,4],"data_offsets":[18,18]}})";
  const auto f = read_bytes(dir, safetensors_bytes(header, data));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  ASSERT_EQ(f.tensors().size(), 4u);
  float a[2], b[2], c[3];
  f.to_float32("a", a);
  f.to_float32("b", b);
  f.to_float32("c", c);
  EXPECT_EQ(a[0], 1.5f);
  EXPECT_EQ(a[1], -2.f);
  EXPECT_EQ(b[0], 1.f);
  EXPECT_EQ(b[1], -2.f);
  EXPECT_EQ(c[0], 1.f);
  EXPECT_EQ(c[1], std::ldexp(1.f, -24));  // subnormal half
  EXPECT_TRUE(std::isinf(c[2]));
  EXPECT_EQ(f.tensors().at("z").numel(), 0);
}

TEST(Safetensors, HalfConversionIsExactForAllFiniteValues) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if (((h >> 10) & 0x1f) == 0x1f) continue;  // inf / nan
    const int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    const float mag = exp == 0 ? std::ldexp(static_cast<float>(mant), -24) : std::ldexp(1.f + mant / 1024.f, exp - 15);
    ASSERT_EQ(half_to_float(static_cast<uint16_t>(h)), (h & 0x8000) ? -mag : mag) << h;
  }
}

TEST(Safetensors, CorruptFilesRaiseErrors) {
  TempDir dir;
  const std::string ok_data = floats_bytes({1.f, 2.f});
  auto file = [&](const std::string& header, const std::string& data) { return safetensors_bytes(header, data); };
  expect_error([&] { read_bytes(dir, ""); }, {"w.safetensors", "too short"});
  expect_error([&] { read_bytes(dir, std::string("\x05\x00", 2)); }, {"w.safetensors", "too short"});
  expect_error([&] { read_bytes(dir, std::string("\xff\xff\xff\x00\x00\x00\x00\x00{}", 10)); },
               {"header length", "exceeds the file size"});
  expect_error([&] { read_bytes(dir, file("{not json", "")); }, {"not valid JSON"});
  expect_error([&] { read_bytes(dir, file("[1,2]", "")); }, {"JSON object"});
  expect_error([&] { read_bytes(dir, file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", ok_data)); },
               {"tensor 'a'", "dtype, shape and data_offsets"});
  expect_error([&] { read_bytes(dir, file(R"({"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", ok_data)); },
               {"tensor 'a'", "unknown dtype 'Q7'"});
  expect_error([&] { read_bytes(dir, file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", ok_data)); },
               {"tensor 'a'", "non-negative integer"});
  expect_error([&] { read_bytes(dir, file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", ok_data)); },
               {"tensor 'a'", "outside the 8-byte data buffer"});
  expect_error([&] { read_bytes(dir, file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", ok_data)); },
               {"tensor 'a'", "need 12"});
  expect_error([&] { read_bytes(dir, file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", ok_data)); },
               {"tensor 'a'", "data_offsets"});
  expect_error(
      [&] {
        read_bytes(dir, file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                             ok_data));
      },
      {"overlap"});
  expect_error([&] { read_bytes(dir, file(R"({"__metadata__":{"k":1}})", "")); }, {"__metadata__"});
  expect_error([&] { read_bytes(dir, file(R"({"a":{"dtype":"F32","shape":[1e30],"data_offsets":[0,8]}})", ok_data)); },
               {"tensor 'a'"});
  expect_error([&] { SafetensorsFile::read((dir.path() / "missing.safetensors").string(), "x"); }, {"missing"});
}

TEST(Safetensors, EveryTruncationOfARealFileIsAnError) {
  REQUIRE_ARTIFACT(art, "tiny_bert");
  const std::string bytes = read_file(fs::path(art) / "weights.safetensors");
  TempDir dir;
  // Cut the file at many points: header length, inside the header, inside the data, one byte short.
  for (size_t cut : {size_t{0}, size_t{3}, size_t{8}, size_t{20}, size_t{200}, bytes.size() / 3, bytes.size() / 2,
                     bytes.size() - 1}) {
    EXPECT_THROW(read_bytes(dir, bytes.substr(0, cut)), qaengine::Error) << "cut at " << cut;
  }
}

}  // namespace
}  // namespace qaengine::test
