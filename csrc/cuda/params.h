// Torch-free interface of the CUDA kernels (attention.cu, layernorm.cu). Launchers validate their parameters and
// return cudaErrorInvalidValue instead of launching when a limit is violated; ops.cpp (the ATen binding) checks the
// tensors first and turns errors into qaengine::Error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qaengine::cuda {

/// Varlen bidirectional attention, fp32 in and out, fp32 accumulation, exact (non-TF32) products.
///   qkv  [total, ld_qkv]: Q | K | V blocks of heads*head_dim columns each (head j at columns j*head_dim)
///   bias [3*heads*head_dim] or null: added to q, k and v
///   out  [total, ld_out]: softmax(q kᵀ / sqrt(head_dim)) v per head, head j at columns j*head_dim
///   cu_seqlens [batch + 1] int32 on the device; a sequence never attends to another.
/// Limits: head_dim in {32, 64, 128}; max_seqlen >= the longest sequence (it sizes the grid); ld_* multiples of 1.
struct VarlenAttentionParams {
  const float* qkv = nullptr;
  const float* bias = nullptr;
  float* out = nullptr;
  const int32_t* cu_seqlens = nullptr;
  int batch = 0, heads = 0, head_dim = 0, max_seqlen = 0;
  int64_t ld_qkv = 0, ld_out = 0;
};

/// In place: x[r] = LayerNorm(x[r] + residual[r] + bias) * gamma + beta, rows of `cols` floats, fp32.
/// `residual` and `bias` may be null. Limits: cols >= 1.
struct AddLayerNormParams {
  float* x = nullptr;
  const float* residual = nullptr;
  const float* bias = nullptr;
  const float* gamma = nullptr;
  const float* beta = nullptr;
  int64_t rows = 0, cols = 0, ld_x = 0, ld_residual = 0;
  float eps = 1e-12f;
};

bool attention_supports(int head_dim);
cudaError_t launch_varlen_attention(const VarlenAttentionParams& p, cudaStream_t stream);
cudaError_t launch_add_layernorm(const AddLayerNormParams& p, cudaStream_t stream);

}  // namespace qaengine::cuda
