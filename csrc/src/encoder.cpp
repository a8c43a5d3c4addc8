// Weight loading and input validation of the ragged encoder. The forwards: encoder_cpu.cpp, cuda/encoder_cuda.cpp.
#include "encoder.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>

#include "check.h"
#include "cpu/kernels.h"
#include "qaengine/error.h"
#include "safetensors.h"

namespace qaengine {
namespace {

const char* kWeights = "weights.safetensors";
const char* kWord = "embeddings.word.weight";
const char* kWordScale = "embeddings.word.weight_scale";  // int8 word embeddings (format_version 3)

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i)
    out += std::to_string(s[i]) + (s.size() == 1 ? "," : i + 1 < s.size() ? ", " : "");
  return out + ")";
}

std::string list_str(const std::vector<int64_t>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}

std::string safetensors_dtype(const std::string& dtype) {
  return dtype == "float32" ? "F32" : dtype == "bfloat16" ? "BF16" : "F16";
}

const char* const kLinears[] = {"qkv", "o", "ffn_in", "ffn_out"};  // int8 Linears (quantization.linears)

std::string names_str(const std::vector<std::string>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", '" : "'") + v[i] + "'";
  return out + "]";
}

// layers.{l}.{lin}.weight of an int8 Linear: the tensors stored as I8 (engine.artifact.tensor_dtype).
bool is_quantized_weight(const std::string& name) {
  const std::string pre = "layers.";
  if (name.compare(0, pre.size(), pre) != 0) return false;
  const size_t dot = name.find('.', pre.size());
  if (dot == std::string::npos || dot == pre.size()) return false;
  for (size_t i = pre.size(); i < dot; ++i)
    if (name[i] < '0' || name[i] > '9') return false;
  const std::string rest = name.substr(dot + 1);
  for (const char* lin : kLinears)
    if (rest == std::string(lin) + ".weight") return true;
  return false;
}

std::string format_g(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// engine.artifact._check_int8_values: weights in [-127, 127]; scales positive (finite is checked at load).
void check_int8_values(std::map<std::string, at::Tensor>& t, const EncoderConfig& cfg) {
  for (int64_t l = 0; l < cfg.num_layers(); ++l) {
    for (const char* lin : kLinears) {
      const std::string p = "layers." + std::to_string(l) + "." + lin + ".";
      const at::Tensor& w = t.at(p + "weight");
      const int8_t* q = w.data_ptr<int8_t>();
      for (int64_t i = 0, n = w.numel(); i < n; ++i) {
        QAENGINE_CHECK(q[i] != -128, std::string(kWeights) + ": tensor '" + p +
                                         "weight' holds -128; the symmetric int8 scheme uses [-127, 127]");
      }
      for (const char* s : {"weight_scale", "input_scale"}) {
        auto it = t.find(p + s);
        if (it == t.end() || it->second.numel() == 0) continue;
        const float* v = it->second.data_ptr<float>();
        float lo = v[0];
        for (int64_t i = 1, n = it->second.numel(); i < n; ++i) lo = std::min(lo, v[i]);
        QAENGINE_CHECK(lo > 0.f, std::string(kWeights) + ": tensor '" + p + s + "' must be positive and finite (min " +
                                     format_g(lo) + ")");
      }
    }
  }
}

}  // namespace

std::vector<std::pair<std::string, std::vector<int64_t>>> expected_shapes(const EncoderConfig& c,
                                                                          const std::optional<Quantization>& quant,
                                                                          bool int8_embeddings) {
  const int64_t d = c.hidden;
  std::vector<std::pair<std::string, std::vector<int64_t>>> s = {
      {"embeddings.word.weight", {c.vocab_size, d}},
      {"embeddings.position.weight", {c.max_position_embeddings, d}},
      {"embeddings.token_type.weight", {c.type_vocab_size, d}},
      {"embeddings.ln.weight", {d}},
      {"embeddings.ln.bias", {d}},
  };
  for (int64_t l = 0; l < c.num_layers(); ++l) {
    const int64_t w = c.attn_width(l), f = c.ffn[l];
    const std::string p = "layers." + std::to_string(l) + ".";
    s.push_back({p + "qkv.weight", {3 * w, d}});
    s.push_back({p + "qkv.bias", {3 * w}});
    s.push_back({p + "o.weight", {d, w}});
    s.push_back({p + "o.bias", {d}});
    s.push_back({p + "ln1.weight", {d}});
    s.push_back({p + "ln1.bias", {d}});
    s.push_back({p + "ffn_in.weight", {f, d}});
    s.push_back({p + "ffn_in.bias", {f}});
    s.push_back({p + "ffn_out.weight", {d, f}});
    s.push_back({p + "ffn_out.bias", {d}});
    s.push_back({p + "ln2.weight", {d}});
    s.push_back({p + "ln2.bias", {d}});
  }
  s.push_back({"qa.weight", {2, d}});
  s.push_back({"qa.bias", {2}});
  if (int8_embeddings) s.push_back({kWordScale, {c.vocab_size}});  // engine.artifact.artifact_shapes
  if (quant) {  // engine.artifact.artifact_shapes: the scales follow, layer by layer
    const bool is_static = quant->activations == ActivationQuant::StaticPerInputChannel;
    for (int64_t l = 0; l < c.num_layers(); ++l) {
      const int64_t w = c.attn_width(l), f = c.ffn[l];
      const std::string p = "layers." + std::to_string(l) + ".";
      const std::pair<int64_t, int64_t> out_in[] = {{3 * w, d}, {d, w}, {f, d}, {d, f}};  // kLinears order
      for (int i = 0; i < 4; ++i) {
        s.push_back({p + kLinears[i] + ".weight_scale", {out_in[i].first}});
        if (is_static) s.push_back({p + kLinears[i] + ".input_scale", {out_in[i].second}});
      }
    }
  }
  return s;
}

namespace {

// Refuses an int8 artifact before any weight is read when this build lacks one of its kernels on `device`.
void require_kernels(const Quantization& quant, c10::Device device) {
  const auto have = supported_kernels(device);
  std::vector<std::string> missing;
  for (const auto& k : quant.kernels)
    if (std::find(have.begin(), have.end(), k) == have.end()) missing.push_back(k);
  QAENGINE_CHECK(missing.empty(),
                 "engine.json: this int8 artifact needs kernel(s) " + names_str(missing) +
                     ", which libqaengine does not provide on " + device.str() +
                     (device.is_cpu() ? ": this torch build has no working oneDNN int8 linear "
                                        "(onednn::qlinear_pointwise); use a torch with mkldnn enabled"
                                      : ": its int8 GEMMs run on the CPU only (load the artifact on 'cpu', or "
                                        "build a float artifact for CUDA)"));
}

// The weights file holds exactly the tensors `want` names (none missing, none extra).
void check_names(const SafetensorsFile& file, const std::vector<std::pair<std::string, std::vector<int64_t>>>& want,
                 bool int8) {
  const auto& have = file.tensors();
  std::vector<std::string> missing;
  std::set<std::string> wanted;
  for (const auto& [name, shape] : want) {
    wanted.insert(name);
    if (!have.count(name)) missing.push_back(name);
  }
  QAENGINE_CHECK(missing.empty(), std::string(kWeights) + ": tensor '" + (missing.empty() ? "" : missing[0]) +
                                      "' is missing (" + std::to_string(missing.size()) + " missing in all)");
  for (const auto& [name, entry] : have) {
    QAENGINE_CHECK(wanted.count(name) > 0, std::string(kWeights) + ": unexpected tensor '" + name +
                                               "' (not in the manifest's config" + (int8 ? " and quantization" : "") +
                                               ")");
  }
}

// engine.artifact.tensor_dtype: the safetensors dtype of tensor `name`.
std::string tensor_dtype(const std::string& name, const std::string& dtype, bool int8, bool int8_embeddings) {
  if (int8_embeddings && name == kWord) return "I8";
  if (int8_embeddings && name == kWordScale) return "F32";
  return int8 ? (is_quantized_weight(name) ? "I8" : "F32") : safetensors_dtype(dtype);
}

// One tensor with its shape and dtype checked: int8 as stored, every float dtype as fp32 (finite checked).
at::Tensor read_tensor(const SafetensorsFile& file, const std::string& name, const std::vector<int64_t>& shape,
                       const EncoderConfig& cfg, const std::string& dtype, bool int8, bool int8_embeddings) {
  const TensorEntry& e = file.tensors().at(name);
  QAENGINE_CHECK(e.shape == shape, std::string(kWeights) + ": tensor '" + name + "' has shape " + shape_str(e.shape) +
                                       ", expected " + shape_str(shape) + " from engine.json (heads=" +
                                       list_str(cfg.heads) + ", ffn=" + list_str(cfg.ffn) + ")");
  const std::string want_dtype = tensor_dtype(name, dtype, int8, int8_embeddings);
  QAENGINE_CHECK(e.dtype == want_dtype, std::string(kWeights) + ": tensor '" + name + "' has dtype " + e.dtype +
                                            ", expected " + want_dtype + " (manifest dtype " + dtype + ")");
  if (want_dtype == "I8") {
    at::Tensor v = at::empty(shape, at::kChar);
    if (v.numel()) std::memcpy(v.data_ptr<int8_t>(), file.int8_data(name), static_cast<size_t>(v.numel()));
    return v;
  }
  at::Tensor v = at::empty(shape, at::kFloat);
  file.to_float32(name, v.data_ptr<float>());
  const float* p = v.data_ptr<float>();
  for (int64_t i = 0, n = v.numel(); i < n; ++i) {
    QAENGINE_CHECK(std::isfinite(p[i]), std::string(kWeights) + ": tensor '" + name + "' contains NaN or inf");
  }
  return v;
}

// engine.artifact.dequantize_word_embeddings: checks the int8 table (values in [-127, 127], scales positive) and
// replaces it by fp32 q * scale, rounded through the artifact's float dtype (fp32 for int8 artifacts), so the table
// equals the Python loader's bit for bit; the scale tensor is dropped.
void dequantize_word_embeddings(std::map<std::string, at::Tensor>& t, const std::string& dtype) {
  const at::Tensor q = t.at(kWord), s = t.at(kWordScale);
  const int64_t rows = q.size(0), d = q.size(1);
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  at::Tensor w = at::empty({rows, d}, at::kFloat);
  float* wp = w.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    QAENGINE_CHECK(sp[r] > 0.f, std::string(kWeights) + ": tensor '" + kWordScale +
                                    "' must be positive and finite (min " + format_g(s.min().item<float>()) + ")");
    for (int64_t j = 0; j < d; ++j) {
      const int8_t v = qp[r * d + j];
      QAENGINE_CHECK(v != -128, std::string(kWeights) + ": tensor '" + kWord +
                                    "' holds -128; the symmetric int8 scheme uses [-127, 127]");
      wp[r * d + j] = static_cast<float>(v) * sp[r];
    }
  }
  if (dtype == "float16") w = w.to(at::kHalf).to(at::kFloat);
  if (dtype == "bfloat16") w = w.to(at::kBFloat16).to(at::kFloat);
  t[kWord] = w;
  t.erase(kWordScale);
}

}  // namespace

std::map<std::string, at::Tensor> read_weights(const SafetensorsFile& file, const EncoderConfig& cfg,
                                               const std::string& dtype, const std::optional<Quantization>& quant,
                                               bool int8_embeddings) {
  const auto want = expected_shapes(cfg, quant, int8_embeddings);
  check_names(file, want, quant.has_value() || int8_embeddings);
  std::map<std::string, at::Tensor> t;
  for (const auto& [name, shape] : want)
    t[name] = read_tensor(file, name, shape, cfg, dtype, quant.has_value(), int8_embeddings);
  if (quant) check_int8_values(t, cfg);
  if (int8_embeddings) dequantize_word_embeddings(t, dtype);
  return t;
}

Encoder::Encoder(const EncoderConfig& cfg, const SafetensorsFile& file, const std::string& dtype, c10::Device device,
                 GemmBackend gemm, const std::optional<Quantization>& quant, bool int8_embeddings)
    : cfg_(cfg), device_(device) {
  if (quant) require_kernels(*quant, device);
  std::map<std::string, at::Tensor> t = read_weights(file, cfg, dtype, quant, int8_embeddings);
  auto dev = [&](const std::string& name) { return t.at(name).to(device_).contiguous(); };
  word_ = dev("embeddings.word.weight");
  position_ = dev("embeddings.position.weight");
  token_type_ = dev("embeddings.token_type.weight");
  emb_ln_w_ = dev("embeddings.ln.weight");
  emb_ln_b_ = dev("embeddings.ln.bias");
  qa_ = Linear(t.at("qa.weight"), t.at("qa.bias"), std::nullopt, gemm, device_);
  // The encoder Linears' precision: int8 as stored, bf16 compute for bf16 artifacts on the CPU, else fp32.
  const bool is_static = quant && quant->activations == ActivationQuant::StaticPerInputChannel;
  if (quant) {
    precision_ = is_static ? LinearPrecision::Int8Static : LinearPrecision::Int8Dynamic;
  } else if (dtype == "bfloat16" && device_.is_cpu()) {
    precision_ = LinearPrecision::BFloat16;
  }
  auto make_linear = [&](const std::string& p, std::optional<Activation> a) {
    switch (precision_) {
      case LinearPrecision::Int8Static:
      case LinearPrecision::Int8Dynamic:
        return Linear::int8(t.at(p + "weight"), t.at(p + "weight_scale"), t.at(p + "bias"),
                            is_static ? t.at(p + "input_scale") : at::Tensor(), a);
      case LinearPrecision::BFloat16: return Linear::bf16(t.at(p + "weight"), t.at(p + "bias"), a, gemm);
      case LinearPrecision::Float32: break;
    }
    return Linear(t.at(p + "weight"), t.at(p + "bias"), a, gemm, device_);
  };
  auto linear = [&](const std::string& p, std::optional<Activation> a) {
    Linear lin = make_linear(p, a);
    t.erase(p + "weight");  // the Linear keeps its own (prepacked) copy: at most one extra copy alive during the load
    return lin;
  };
  const Activation act = cfg.activation;
  for (int64_t l = 0; l < cfg.num_layers(); ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    LayerWeights L;
    L.heads = cfg.heads[l];
    L.width = cfg.attn_width(l);
    L.ffn = cfg.ffn[l];
    if (L.heads > 0) {
      L.qkv = linear(p + "qkv.", std::nullopt);
      L.o = linear(p + "o.", std::nullopt);
    }
    if (L.ffn > 0) {
      L.ffn_in = linear(p + "ffn_in.", act);
      L.ffn_out = linear(p + "ffn_out.", std::nullopt);
    }
    L.qkv_b = dev(p + "qkv.bias");
    L.o_b = dev(p + "o.bias");
    L.out_b = dev(p + "ffn_out.bias");
    L.ln1_w = dev(p + "ln1.weight");
    L.ln1_b = dev(p + "ln1.bias");
    L.ln2_w = dev(p + "ln2.weight");
    L.ln2_b = dev(p + "ln2.bias");
    layers_.push_back(std::move(L));
  }
}

void packed_position_ids(const int32_t* cu, int64_t batch, int64_t offset, int64_t r0, int64_t r1, int64_t* out) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = std::max<int64_t>(cu[b], r0); t < std::min<int64_t>(cu[b + 1], r1); ++t)
      out[t - r0] = offset + t - cu[b];
}

std::pair<at::Tensor, at::Tensor> Encoder::forward(const at::Tensor& ids, const at::Tensor& types,
                                                   const at::Tensor& cu_seqlens, int64_t max_seqlen) const {
  // Every check names the argument and the fix; inputs are small, so checking on the host costs little.
  auto check_vec = [](const at::Tensor& x, const char* name, at::ScalarType dtype) {
    QAENGINE_CHECK(x.defined(), std::string(name) + " is undefined");
    QAENGINE_CHECK(x.scalar_type() == dtype,
                   std::string(name) + " must be " + c10::toString(dtype) + ", got " + c10::toString(x.scalar_type()));
    QAENGINE_CHECK(x.dim() == 1, std::string(name) + " must be 1-D, got " + std::to_string(x.dim()) + " dims");
    QAENGINE_CHECK(x.is_contiguous(), std::string(name) + " must be contiguous");
  };
  check_vec(ids, "input_ids", at::kLong);
  check_vec(types, "token_type_ids", at::kLong);
  check_vec(cu_seqlens, "cu_seqlens", at::kInt);
  QAENGINE_CHECK(ids.device() == types.device(), "input_ids and token_type_ids must be on the same device");
  const int64_t total = ids.size(0);
  QAENGINE_CHECK(types.size(0) == total, "token_type_ids has " + std::to_string(types.size(0)) +
                                             " tokens but input_ids has " + std::to_string(total));
  QAENGINE_CHECK(cu_seqlens.size(0) >= 1, "cu_seqlens must have batch + 1 >= 1 entries");
  QAENGINE_CHECK(max_seqlen >= 0, "max_seqlen must be >= 0, got " + std::to_string(max_seqlen));
  const at::Tensor cu = cu_seqlens.device().is_cpu() ? cu_seqlens : cu_seqlens.cpu();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t batch = cu.size(0) - 1;
  QAENGINE_CHECK(c[0] == 0, "cu_seqlens[0] must be 0, got " + std::to_string(c[0]));
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    QAENGINE_CHECK(c[b + 1] >= c[b], "cu_seqlens must be non-decreasing, but cu_seqlens[" + std::to_string(b + 1) +
                                         "] = " + std::to_string(c[b + 1]) + " < cu_seqlens[" + std::to_string(b) +
                                         "] = " + std::to_string(c[b]));
    longest = std::max<int64_t>(longest, c[b + 1] - c[b]);
  }
  QAENGINE_CHECK(c[batch] == total, "cu_seqlens must end at the token count " + std::to_string(total) + ", got " +
                                        std::to_string(c[batch]));
  QAENGINE_CHECK(max_seqlen >= longest, "max_seqlen " + std::to_string(max_seqlen) +
                                            " is shorter than the longest sequence (" + std::to_string(longest) + ")");
  QAENGINE_CHECK(cfg_.position_offset + longest <= cfg_.max_position_embeddings,
                 "a sequence of " + std::to_string(longest) + " tokens exceeds the model's " +
                     std::to_string(cfg_.max_position_embeddings - cfg_.position_offset) + " positions");
  if (total > 0) {
    const at::Tensor ids_c = ids.device().is_cpu() ? ids : ids.cpu();
    const at::Tensor types_c = types.device().is_cpu() ? types : types.cpu();
    const int64_t* ip = ids_c.data_ptr<int64_t>();
    const int64_t* tp = types_c.data_ptr<int64_t>();
    for (int64_t i = 0; i < total; ++i) {
      QAENGINE_CHECK(ip[i] >= 0 && ip[i] < cfg_.vocab_size,
                     "input_ids[" + std::to_string(i) + "] = " + std::to_string(ip[i]) +
                         " is outside the vocabulary [0, " + std::to_string(cfg_.vocab_size) + ")");
      QAENGINE_CHECK(tp[i] >= 0 && tp[i] < cfg_.type_vocab_size,
                     "token_type_ids[" + std::to_string(i) + "] = " + std::to_string(tp[i]) + " is outside [0, " +
                         std::to_string(cfg_.type_vocab_size) + ")");
    }
  }
  // Clamp max_seqlen to what the kernels actually need (it only sizes scratch).
  max_seqlen = longest;
  if (device_.is_cpu()) return forward_cpu(ids.cpu(), types.cpu(), cu, max_seqlen);
  return forward_cuda(ids, types, cu_seqlens, max_seqlen);
}

#if !defined(QAENGINE_WITH_CUDA)
std::pair<at::Tensor, at::Tensor> Encoder::forward_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        int64_t) const {
  throw Error("this libqaengine was built without CUDA; rebuild with -DQAENGINE_CUDA=ON");
}
#endif

}  // namespace qaengine
