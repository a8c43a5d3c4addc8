// Weight loading and input validation of the ragged encoder. The forwards: encoder_cpu.cpp, cuda/encoder_cuda.cpp.
#include "encoder.h"

#include <ATen/ops/empty.h>

#include <cmath>
#include <map>
#include <set>

#include "check.h"
#include "cpu/kernels.h"
#include "qaengine/error.h"
#include "safetensors.h"

namespace qaengine {
namespace {

const char* kWeights = "weights.safetensors";

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

cpu::Act to_act(Activation a) {
  switch (a) {
    case Activation::Gelu: return cpu::Act::Gelu;
    case Activation::GeluTanh: return cpu::Act::GeluTanh;
    case Activation::Relu: return cpu::Act::Relu;
  }
  return cpu::Act::Gelu;
}

}  // namespace

std::vector<std::pair<std::string, std::vector<int64_t>>> expected_shapes(const EncoderConfig& c) {
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
  return s;
}

Encoder::Encoder(const EncoderConfig& cfg, const SafetensorsFile& file, const std::string& dtype, c10::Device device,
                 GemmBackend gemm)
    : cfg_(cfg), device_(device) {
  const auto want = expected_shapes(cfg);
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
    QAENGINE_CHECK(wanted.count(name) > 0,
                   std::string(kWeights) + ": unexpected tensor '" + name + "' (not in the manifest's config)");
  }
  const std::string want_dtype = safetensors_dtype(dtype);
  std::map<std::string, at::Tensor> t;
  for (const auto& [name, shape] : want) {
    const TensorEntry& e = have.at(name);
    QAENGINE_CHECK(e.shape == shape, std::string(kWeights) + ": tensor '" + name + "' has shape " + shape_str(e.shape) +
                                         ", expected " + shape_str(shape) + " from engine.json (heads=" +
                                         list_str(cfg.heads) + ", ffn=" + list_str(cfg.ffn) + ")");
    QAENGINE_CHECK(e.dtype == want_dtype, std::string(kWeights) + ": tensor '" + name + "' has dtype " + e.dtype +
                                              ", expected " + want_dtype + " (manifest dtype " + dtype + ")");
    at::Tensor v = at::empty(shape, at::kFloat);
    file.to_float32(name, v.data_ptr<float>());
    const float* p = v.data_ptr<float>();
    for (int64_t i = 0, n = v.numel(); i < n; ++i) {
      QAENGINE_CHECK(std::isfinite(p[i]), std::string(kWeights) + ": tensor '" + name + "' contains NaN or inf");
    }
    t[name] = v;
  }
  auto dev = [&](const at::Tensor& x) { return x.to(device_).contiguous(); };
  word_ = dev(t["embeddings.word.weight"]);
  position_ = dev(t["embeddings.position.weight"]);
  token_type_ = dev(t["embeddings.token_type.weight"]);
  emb_ln_w_ = dev(t["embeddings.ln.weight"]);
  emb_ln_b_ = dev(t["embeddings.ln.bias"]);
  qa_ = Linear(t["qa.weight"], t["qa.bias"], std::nullopt, gemm, device_);
  const cpu::Act act = to_act(cfg.activation);
  for (int64_t l = 0; l < cfg.num_layers(); ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    LayerWeights L;
    L.heads = cfg.heads[l];
    L.width = cfg.attn_width(l);
    L.ffn = cfg.ffn[l];
    if (L.heads > 0) {
      L.qkv = Linear(t[p + "qkv.weight"], t[p + "qkv.bias"], std::nullopt, gemm, device_);
      L.o = Linear(t[p + "o.weight"], t[p + "o.bias"], std::nullopt, gemm, device_);
    }
    if (L.ffn > 0) {
      L.ffn_in = Linear(t[p + "ffn_in.weight"], t[p + "ffn_in.bias"], act, gemm, device_);
      L.ffn_out = Linear(t[p + "ffn_out.weight"], t[p + "ffn_out.bias"], std::nullopt, gemm, device_);
    }
    L.qkv_b = dev(t[p + "qkv.bias"]);
    L.o_b = dev(t[p + "o.bias"]);
    L.out_b = dev(t[p + "ffn_out.bias"]);
    L.ln1_w = dev(t[p + "ln1.weight"]);
    L.ln1_b = dev(t[p + "ln1.bias"]);
    L.ln2_w = dev(t[p + "ln2.weight"]);
    L.ln2_b = dev(t[p + "ln2.bias"]);
    layers_.push_back(std::move(L));
  }
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
