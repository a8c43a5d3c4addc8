// The ragged encoder + QA head over packed tokens (ATen). Numerics follow engine/model.py in fp32.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "linear.h"
#include "qaengine/config.h"

namespace qaengine {

class SafetensorsFile;

struct LayerWeights {
  int64_t heads = 0, width = 0, ffn = 0;
  Linear qkv, o, ffn_in, ffn_out;  // bias (and ffn_in's activation) applied inside; unset for 0 heads / 0 units
  at::Tensor qkv_b, o_b, out_b;    // raw biases: b_O and b_2 carry 0-head / 0-unit layers, qkv_b the CUDA path
  at::Tensor ln1_w, ln1_b, ln2_w, ln2_b;
};

class Encoder {
 public:
  /// Validates tensor names, shapes, dtypes and (int8) values against `cfg`, the artifact's `dtype` and its
  /// `quant` block, like engine/artifact.py (errors name the tensor), and builds the Linears of the precision the
  /// artifact asks for (docs/PRECISION.md): fp32; bf16 encoder Linears for bf16 artifacts on the CPU (fp32 on CUDA);
  /// int8 encoder Linears for int8 artifacts (CPU only; `gemm` then applies to the QA head alone). Everything else
  /// is upcast to fp32 and moved to `device`.
  Encoder(const EncoderConfig& cfg, const SafetensorsFile& weights, const std::string& dtype, c10::Device device,
          GemmBackend gemm = GemmBackend::Auto, const std::optional<Quantization>& quant = std::nullopt,
          bool int8_embeddings = false);

  /// Checked entry: dtypes, ranks, contiguity, cu_seqlens, token/type/position ranges. Returns (start, end) [T].
  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& input_ids, const at::Tensor& token_type_ids,
                                            const at::Tensor& cu_seqlens, int64_t max_seqlen) const;

  const EncoderConfig& config() const { return cfg_; }
  GemmBackend gemm_backend() const { return qa_.backend(); }
  /// What the encoder Linears (qkv, o, ffn_in, ffn_out) compute in.
  LinearPrecision linear_precision() const { return precision_; }
  c10::Device device() const { return device_; }

 private:
  std::pair<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& ids, const at::Tensor& types,
                                                const at::Tensor& cu_seqlens, int64_t max_seqlen) const;
  /// The layer stack on one packed batch, writing logits into start/end `[T]`; `threads` > 1 splits the rows.
  void forward_cpu_batch(const int64_t* ids, const int64_t* types, const int32_t* cu_seqlens, int64_t batch,
                         int64_t max_seqlen, float* start, float* end, int threads) const;
  class CpuBatch;  // encoder_cpu.cpp: the buffers and steps of one packed batch on the CPU
  std::pair<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& ids, const at::Tensor& types,
                                                 const at::Tensor& cu_seqlens, int64_t max_seqlen) const;

  EncoderConfig cfg_;
  c10::Device device_;
  LinearPrecision precision_ = LinearPrecision::Float32;
  at::Tensor word_, position_, token_type_, emb_ln_w_, emb_ln_b_;
  Linear qa_;
  std::vector<LayerWeights> layers_;
};

/// Position ids of packed rows [r0, r1) into `out` `[r1 - r0]`: `offset` + each row's index within its sequence
/// (cu_seqlens `cu` `[batch + 1]`).
void packed_position_ids(const int32_t* cu, int64_t batch, int64_t offset, int64_t r0, int64_t r1, int64_t* out);

/// Name -> shape of every tensor the artifact must hold (engine.model.expected_shapes; with `quant`, also the int8
/// scales of engine.artifact.artifact_shapes).
std::vector<std::pair<std::string, std::vector<int64_t>>> expected_shapes(
    const EncoderConfig& cfg, const std::optional<Quantization>& quant = std::nullopt, bool int8_embeddings = false);

/// Every tensor of the artifact, validated like engine/artifact.py (errors name the tensor): int8 Linear weights as
/// stored, everything else as fp32; int8 word embeddings (`int8_embeddings`) come back dequantized, without their
/// scale, rounded through the artifact's float dtype exactly as engine/artifact.py does.
std::map<std::string, at::Tensor> read_weights(const SafetensorsFile& file, const EncoderConfig& cfg,
                                               const std::string& dtype, const std::optional<Quantization>& quant,
                                               bool int8_embeddings = false);

}  // namespace qaengine
