// The artifact manifest (engine.json, docs/ARTIFACT.md) as plain structs.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace qaengine {

enum class Architecture { Bert, Roberta };
/// The FFN activation, one enum from engine.json to the kernels (Python: engine.config.Activation, whose values are
/// the names here, HF's hidden_act).
enum class Activation { Gelu, GeluTanh, Relu };  // "gelu" (erf), "gelu_new" (tanh), "relu"

/// The Activation called `name` ("gelu", "gelu_new" or "relu"), or nullopt.
inline std::optional<Activation> parse_activation(const std::string& name) {
  if (name == "gelu") return Activation::Gelu;
  if (name == "gelu_new") return Activation::GeluTanh;
  if (name == "relu") return Activation::Relu;
  return std::nullopt;
}

/// How the CPU path runs its fp32 GEMMs: OneDnnDirect ("dnnl" in Python), oneDNN's own library (libdnnl) called
/// directly, writing into the encoder's buffers (Auto picks it when libqaengine was built with it); TorchOneDnn
/// ("onednn"), the oneDNN inside torch through the ATen dispatcher (mkldnn::_linear_pointwise; Auto's second choice);
/// Aten ("aten"), at::addmm (MKL). bf16 and int8 always use torch's oneDNN ops (Aten: at::addmm for bf16). CUDA
/// always uses at::addmm (cuBLAS).
enum class GemmBackend { Auto, TorchOneDnn, Aten, OneDnnDirect };

/// Encoder shape: layer l keeps heads[l] heads of head_dim and ffn[l] FFN units (0 allowed for both).
struct EncoderConfig {
  Architecture architecture = Architecture::Bert;
  int64_t vocab_size = 0, hidden = 0, head_dim = 0;
  std::vector<int64_t> heads, ffn;
  int64_t max_position_embeddings = 0, type_vocab_size = 0;
  double layer_norm_eps = 1e-12;
  Activation activation = Activation::Gelu;
  int64_t pad_token_id = 0;
  int64_t position_offset = 0;  // first position id: 0 for BERT, pad_token_id + 1 for RoBERTa

  int64_t num_layers() const { return static_cast<int64_t>(heads.size()); }
  int64_t attn_width(int64_t layer) const { return heads[layer] * head_dim; }
};

/// Doc-stride window settings (engine/features.py WindowSettings).
struct WindowSettings {
  int64_t max_seq_length = 384, doc_stride = 128, max_query_length = 64;
};

/// How an int8 artifact quantizes the inputs of its Linears (docs/ARTIFACT.md, "Int8 artifacts").
enum class ActivationQuant {
  DynamicPerToken,       // "dynamic_per_token": s_x[t] = max_k |x[t, k]| / 127 at run time; kernel int8_gemm_per_token
  StaticPerInputChannel  // "static_per_input_channel": calibrated `input_scale` per channel; kernel int8_gemm_static
};

/// The `quantization` block of a version-2 (int8) manifest. Weights are always int8 symmetric per output channel;
/// the Linears are qkv, o, ffn_in and ffn_out of every layer; every other tensor is fp32.
struct Quantization {
  ActivationQuant activations = ActivationQuant::DynamicPerToken;
  std::vector<std::string> kernels;  // kernels a backend must provide (validated against `activations`)
};

/// A validated engine.json.
struct Manifest {
  EncoderConfig config;
  int64_t format_version = 1;                // 1: float artifacts, 2: int8, 3: with an `embeddings` block
  std::string dtype;                         // "float32", "bfloat16" or "float16" (version 1); "int8" (version 2)
  std::optional<Quantization> quantization;  // int8 artifacts (version 2, or 3 with dtype int8) only
  bool int8_word_embeddings = false;         // version 3: I8 embeddings.word.weight + F32 per-row weight_scale
  WindowSettings windows;
  bool do_lower_case = true, strip_accents = true;
  std::vector<std::string> tokenizer_files;
  double null_threshold = 0.0;
};

/// Reads and validates ARTIFACT/engine.json (structure, config and window settings). Throws qaengine::Error.
Manifest read_manifest(const std::string& artifact_dir);

}  // namespace qaengine
