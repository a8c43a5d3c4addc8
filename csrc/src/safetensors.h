// A small, defensive safetensors reader (torch-free).
//
// Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data buffer. The header maps each
// tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data buffer), plus an
// optional "__metadata__" object of strings. Every field is checked; a truncated or inconsistent file raises
// qaengine::Error naming the file and the tensor or field, never a crash.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace qaengine {

enum class StorageDtype { F32, BF16, F16, I8, Other };

struct TensorEntry {
  std::string dtype;  // as written in the header ("F32", "BF16", ...)
  StorageDtype storage = StorageDtype::Other;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range within the data buffer
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  /// Reads and validates the whole file. `display_name` is used in error messages.
  static SafetensorsFile read(const std::string& path, const std::string& display_name);

  const std::map<std::string, TensorEntry>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Converts tensor `name` (F32, BF16 or F16) to float32 into `out` (numel floats).
  void to_float32(const std::string& name, float* out) const;
  /// The stored bytes of I8 tensor `name` (numel values, row-major); throws for another dtype. Valid while the
  /// file object lives.
  const int8_t* int8_data(const std::string& name) const;
  const std::string& display_name() const { return name_; }

 private:
  std::string name_;
  std::vector<uint8_t> data_;  // the data buffer only
  std::map<std::string, TensorEntry> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// Converts one IEEE half (binary16) to float.
float half_to_float(uint16_t h);
/// Converts one bfloat16 to float.
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

}  // namespace qaengine
