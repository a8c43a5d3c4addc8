#include "safetensors.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "qaengine/error.h"

namespace qaengine {
namespace {

using json = nlohmann::json;

// A header larger than this is certainly corrupt (the Rust reader uses the same 100 MB cap).
constexpr uint64_t kMaxHeader = 100ull * 1000 * 1000;

size_t dtype_size(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
      {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4},     {"F64", 8},     {"I64", 8}, {"U64", 8}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

StorageDtype storage_of(const std::string& dtype) {
  if (dtype == "F32") return StorageDtype::F32;
  if (dtype == "BF16") return StorageDtype::BF16;
  if (dtype == "F16") return StorageDtype::F16;
  if (dtype == "I8") return StorageDtype::I8;
  return StorageDtype::Other;
}

uint64_t parse_u64(const json& v, const std::string& where) {
  if (!v.is_number_unsigned()) throw Error(where + " must be a non-negative integer, got " + v.dump());
  return v.get<uint64_t>();
}

}  // namespace

int64_t TensorEntry::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

SafetensorsFile SafetensorsFile::read(const std::string& path, const std::string& display_name) {
  SafetensorsFile f;
  f.name_ = display_name;
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw Error("weights file " + path + " is missing or unreadable");
  const auto file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  if (file_size < 8) {
    throw Error(display_name + ": file is " + std::to_string(file_size) +
                " bytes, too short for a safetensors header (truncated?)");
  }
  uint8_t len_bytes[8];
  in.read(reinterpret_cast<char*>(len_bytes), 8);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  if (header_len > kMaxHeader || header_len > file_size - 8) {
    throw Error(display_name + ": header length " + std::to_string(header_len) + " exceeds the file size " +
                std::to_string(file_size) + " (truncated or not a safetensors file)");
  }
  std::string header(header_len, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_len));
  const uint64_t data_size = file_size - 8 - header_len;
  f.data_.resize(data_size);
  in.read(reinterpret_cast<char*>(f.data_.data()), static_cast<std::streamsize>(data_size));
  if (!in) throw Error(display_name + ": could not read " + std::to_string(file_size) + " bytes");

  json h;
  try {
    h = json::parse(header);
  } catch (const json::exception& e) {
    throw Error(display_name + ": header is not valid JSON (" + e.what() + ")");
  }
  if (!h.is_object()) throw Error(display_name + ": header must be a JSON object");

  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) throw Error(display_name + ": __metadata__ must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) throw Error(display_name + ": __metadata__." + m.key() + " must be a string");
        f.metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = display_name + ": tensor '" + name + "'";
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets")) {
      throw Error(where + " must be an object with dtype, shape and data_offsets");
    }
    TensorEntry e;
    if (!v["dtype"].is_string()) throw Error(where + ": dtype must be a string");
    e.dtype = v["dtype"].get<std::string>();
    const size_t esize = dtype_size(e.dtype);
    if (esize == 0) throw Error(where + ": unknown dtype '" + e.dtype + "'");
    e.storage = storage_of(e.dtype);
    if (!v["shape"].is_array()) throw Error(where + ": shape must be a list of integers");
    uint64_t numel = 1;
    for (const json& s : v["shape"]) {
      const uint64_t dim = parse_u64(s, where + " shape entry");
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / dim)) {
        throw Error(where + ": shape is too large");
      }
      numel *= dim;
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    const json& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2) throw Error(where + ": data_offsets must be [begin, end]");
    e.begin = parse_u64(off[0], where + " data_offsets[0]");
    e.end = parse_u64(off[1], where + " data_offsets[1]");
    if (e.begin > e.end || e.end > data_size) {
      throw Error(where + ": data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                  "] lie outside the " + std::to_string(data_size) + "-byte data buffer (truncated file?)");
    }
    if (numel > std::numeric_limits<uint64_t>::max() / esize || e.end - e.begin != numel * esize) {
      throw Error(where + ": data_offsets span " + std::to_string(e.end - e.begin) + " bytes, but dtype " + e.dtype +
                  " and its shape need " + std::to_string(numel * esize));
    }
    ranges.emplace_back(e.begin, e.end);
    f.tensors_.emplace(name, std::move(e));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) throw Error(display_name + ": tensor data ranges overlap");
  }
  return f;
}

void SafetensorsFile::to_float32(const std::string& name, float* out) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error(name_ + ": tensor '" + name + "' is missing");
  const TensorEntry& e = it->second;
  const uint8_t* src = data_.data() + e.begin;
  const int64_t n = e.numel();
  switch (e.storage) {
    case StorageDtype::F32:
      if (n) std::memcpy(out, src, static_cast<size_t>(n) * 4);
      break;
    case StorageDtype::BF16:
    case StorageDtype::F16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, src + 2 * i, 2);
        out[i] = e.storage == StorageDtype::BF16 ? bf16_to_float(v) : half_to_float(v);
      }
      break;
    default: throw Error(name_ + ": tensor '" + name + "' has dtype " + e.dtype + "; expected F32, BF16 or F16");
  }
}

const int8_t* SafetensorsFile::int8_data(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error(name_ + ": tensor '" + name + "' is missing");
  const TensorEntry& e = it->second;
  if (e.storage != StorageDtype::I8) {
    throw Error(name_ + ": tensor '" + name + "' has dtype " + e.dtype + "; expected I8");
  }
  return reinterpret_cast<const int8_t*>(data_.data() + e.begin);
}

}  // namespace qaengine
